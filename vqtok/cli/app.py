"""The Typer application object and the user-error handling shared by every command."""

from __future__ import annotations

import shlex
import sys
from typing import Optional

import typer
from typer.core import TyperGroup

from vqtok.errors import UserError, one_line
from vqtok.fs_errors import filesystem_error
from vqtok.signals import Interrupted, exit_code_for, raise_on_stop_signals, signal_name

# What an interrupted command leaves behind and how to continue (training saves and says so itself).
_AFTER_INTERRUPT = {
    "encode": "finished shards are kept; rerun the same command to encode the rest",
    "sample": "no outputs were written; rerun the same command",
    "train-tokenizer": "if it saved a checkpoint, continue with --resume auto, else rerun the same command",
    "train-ar": "if it saved a checkpoint, continue with --resume auto, else rerun the same command",
}


class _VqtokGroup(TyperGroup):
    """Turns a `UserError` raised by any command into one line on stderr and exit code 2, and a stop
    signal (SIGINT/SIGTERM) outside training into clean-up (`finally` blocks run) and exit 128 + signal."""

    def invoke(self, ctx):
        try:
            with raise_on_stop_signals():
                return super().invoke(ctx)
        except UserError as exc:
            _error_line(one_line(exc))
            raise typer.Exit(code=exc.exit_code) from None
        except OSError as exc:  # disk full, read-only or not-a-directory destinations: user errors, not bugs
            err = filesystem_error(exc)
            if err is None:
                raise
            _error_line(one_line(err))
            raise typer.Exit(code=err.exit_code) from None
        except (Interrupted, KeyboardInterrupt) as exc:
            import signal

            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            command = ctx.invoked_subcommand or "vqtok"
            hint = _AFTER_INTERRUPT.get(command, "rerun the same command")
            _error_line(f"{command} interrupted by {signal_name(signum)}; {hint}")
            raise typer.Exit(code=exit_code_for(signum)) from None
        finally:
            from vqtok.run_lock import set_cli_command

            set_cli_command(None)


def _error_line(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def resume_command() -> str:
    """The command line of this process with `--resume auto` (what continues an interrupted run)."""
    args = [a for a in sys.argv[1:]]
    if "--resume" not in args:
        args += ["--resume", "auto"]
    return " ".join(shlex.quote(a) for a in ["vqtok", *args])


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

    An interrupted run (SIGINT/SIGTERM) has saved a checkpoint; it exits 128 + the signal number (not 0,
    so schedulers and `train && sample` chains do not take it as finished). Only rank 0 prints.
    """
    import os
    import signal

    from vqtok.distributed import shutdown_distributed

    try:
        result = train()
    finally:
        shutdown_distributed()
    if result.interrupted:
        signum = result.signal or signal.SIGTERM
        if int(os.environ.get("RANK", "0")) == 0:
            _error_line(f"interrupted by {signal_name(signum)} at step {result.step}; to continue: {resume_command()}")
        raise typer.Exit(code=exit_code_for(signum))
    if result.final_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"{what} saved to {result.final_dir}")


def _print_version(value: bool) -> None:
    if value:
        from vqtok import __version__

        typer.echo(f"vqtok {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_print_version, is_eager=True, help="Print the vqtok version and exit."
    ),
) -> None:
    """vqtok: train-tokenizer -> encode -> train-ar -> sample, each stage a file contract."""
    from vqtok.run_lock import set_cli_command

    set_cli_command(ctx.invoked_subcommand)  # run locks name the command the user ran
