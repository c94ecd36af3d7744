"""Command-line interface. Each stage's commands live in their own module and register on `app`.

Modules are imported in pipeline order, which is the order `vqtok --help` lists the commands in.
"""

from vqtok.cli.app import app
from vqtok.cli import info  # noqa: F401  (registers info)
from vqtok.cli import train_tokenizer  # noqa: F401,E402  (registers train-tokenizer)
from vqtok.cli import encode  # noqa: F401,E402  (registers encode, inspect, demo-data)
from vqtok.cli import train_ar  # noqa: F401,E402  (registers train-ar)
from vqtok.cli import sample  # noqa: F401,E402  (registers sample)
from vqtok.cli import evaluate  # noqa: F401,E402  (registers reconstruct, eval-tokenizer, eval-fid)
from vqtok.cli import convert  # noqa: F401,E402  (registers convert)


def main() -> None:
    app()


__all__ = ["app", "main"]
