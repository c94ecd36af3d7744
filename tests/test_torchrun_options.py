"""No option of any vqtok command is taken by torchrun's own argument parser.

`torchrun [its options] -m vqtok COMMAND [vqtok options]` parses the whole command line with argparse,
which classifies every `--word` even after the module name and fails on one that abbreviates several of
its own options (`--num` -> "ambiguous option: --num could match --numa-binding"). The check runs
torchrun's real parser (torch.distributed.run.get_args_parser) over every option of every command.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import typer.main

from vqtok.cli import app

# torchrun claims --help/-h for itself, whatever follows the module name; `vqtok CMD --help` is run without it
NOT_UNDER_TORCHRUN = {"--help", "-h"}


def vqtok_options() -> list[tuple[str, str]]:
    group = typer.main.get_command(app)
    found = []
    for name, command in group.commands.items():
        for param in command.params:
            for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]:
                if opt.startswith("-") and opt not in NOT_UNDER_TORCHRUN:
                    found.append((name, opt))
    return found


def torchrun_passes_through(command: str, words: list[str]) -> bool:
    """True when torchrun's parser leaves `words` after `-m vqtok COMMAND` untouched for vqtok."""
    from torch.distributed.run import get_args_parser

    argv = ["--standalone", "--nproc-per-node=2", "-m", "vqtok", command, *words]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except SystemExit:
        return False
    return args.training_script == "vqtok" and args.training_script_args == [command, *words] and args.nnodes == "1:1"


def test_the_check_catches_the_option_torchrun_rejected():
    assert not torchrun_passes_through("sample", ["--num", "5"])  # the bug this guards against
    assert torchrun_passes_through("sample", ["--num-samples", "5"])


def test_every_command_has_options_to_check():
    commands = {name for name, _ in vqtok_options()}
    assert {"sample", "encode", "train-ar", "train-tokenizer", "eval-tokenizer"} <= commands


@pytest.mark.parametrize("command, option", vqtok_options(), ids=lambda v: v)
def test_torchrun_leaves_the_option_to_vqtok(command, option):
    for words in ([option, "1"], [f"{option}=1"] if option.startswith("--") else [option]):
        assert torchrun_passes_through(command, words), (
            f"torchrun's parser takes `vqtok {command} {' '.join(words)}` for itself (an abbreviation of one of its "
            "own options); rename the option")
