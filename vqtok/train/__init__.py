"""The one training engine (engine.py) and the trainers that plug into it (tokenizer_task.py)."""
