"""Command-line interface. Each stage's commands live in their own module and register on `app`."""

from vqtok.cli.app import app
from vqtok.cli import info  # noqa: F401  (registers commands)
from vqtok.cli import convert  # noqa: F401,E402  (registers convert)
from vqtok.cli import encode  # noqa: F401,E402  (registers encode, inspect, demo-data)


def main() -> None:
    app()


__all__ = ["app", "main"]
