"""The Typer application object and the user-error handling shared by every command."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from vqtok.errors import UserError, one_line
from vqtok.fs_errors import filesystem_error


class _VqtokGroup(TyperGroup):
    """Turns a `UserError` raised by any command into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            sys.stderr.write(f"error: {one_line(exc)}\n")
            sys.stderr.flush()
            raise typer.Exit(code=exc.exit_code) from None
        except OSError as exc:  # disk full, read-only or not-a-directory destinations: user errors, not bugs
            err = filesystem_error(exc)
            if err is None:
                raise
            sys.stderr.write(f"error: {one_line(err)}\n")
            sys.stderr.flush()
            raise typer.Exit(code=err.exit_code) from None


app = typer.Typer(
    name="vqtok",
    cls=_VqtokGroup,
    help="Discrete image tokenizers and the RAR autoregressive generator, end to end.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def run_training(train, what: str) -> None:
    """Run a trainer entry point (`train()` -> RunResult), tear down torch.distributed, report the result.

    An interrupted run (SIGINT/SIGTERM) has already saved a checkpoint, so it exits 0; only rank 0 prints.
    """
    import os

    from vqtok.train.distributed import shutdown_distributed

    try:
        result = train()
    finally:
        shutdown_distributed()
    if result.interrupted:
        raise typer.Exit(code=0)
    if result.final_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"{what} saved to {result.final_dir}")


@app.callback()
def _root() -> None:
    """vqtok: train-tokenizer -> encode -> train-ar -> sample, each stage a file contract."""
