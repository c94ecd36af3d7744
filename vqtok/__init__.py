"""vqtok: discrete image tokenizers and the RAR autoregressive generator, end to end."""

__version__ = "0.1.0"
