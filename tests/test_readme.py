"""The README is true: its Python API snippet runs, every flag it shows exists on the command it shows it
with, its links point at files of the repository, `vqtok --version` works, and its refreshed regions are
exactly those examples/refresh_readme.py produces."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from vqtok import __version__
from vqtok.cli import app

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "examples").glob("*.md"))]
runner = CliRunner()


def _refresh_module():
    spec = importlib.util.spec_from_file_location("refresh_readme", REPO / "examples" / "refresh_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fenced(text: str, lang: str | None = None) -> list[str]:
    """The bodies of the fenced blocks (of one language, or all)."""
    blocks, current, kind = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, kind = [], line[3:].strip()
            else:
                if lang is None or kind == lang:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_version_flag_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"vqtok {__version__}"


def test_python_api_snippet_runs(tmp_path, monkeypatch):
    from vqtok.ar.checkpoint import save_generator
    from vqtok.ar.rar import RAR, RARConfig
    from vqtok.tokenizer.tokenizer import build_tokenizer

    (snippet,) = [s for s in _fenced(README.read_text(), "python") if "load_generator" in s]
    torch.manual_seed(0)
    tok = build_tokenizer("tiny-fsq")
    tok.save(tmp_path / "demo_out" / "runs" / "tok" / "final")
    cfg = RARConfig(hidden_size=32, depth=2, num_heads=2, intermediate_size=64, vocab_size=tok.vocab_size,
                    seq_len=tok.tokens_per_image, num_classes=8)
    save_generator(tmp_path / "demo_out" / "runs" / "rar" / "final", RAR(cfg), cfg, tok.identity())
    monkeypatch.chdir(tmp_path)
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    side = tok.resolution
    assert f"torch.Size([4, {tok.tokens_per_image}]) torch.Size([4, 3, {side}, {side}]) torch.Size([3, 3, {side}, {side}])" in proc.stdout


def _commands() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    out = {}
    for name, command in group.commands.items():
        out[name] = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    out[""] = {opt for param in group.params for opt in param.opts}
    return out


def _command_lines(text: str) -> list[list[str]]:
    """Each `vqtok CMD ...` (or `-m vqtok CMD ...`) in the fenced blocks, continuation lines joined."""
    found = []
    for block in _fenced(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines = joined.splitlines()
        if any(line.startswith("$ ") for line in lines):  # a transcript: commands are the prompted lines
            lines = [line for line in lines if line.startswith("$ ")]
        for line in lines:
            line = line.strip().removeprefix("$ ")
            m = re.search(r"(?:^|-m )vqtok(\s.*)?$", line)
            if m and not line.startswith("#"):
                found.append(shlex.split(m.group(1) or "", comments=True))
    return found


def test_every_flag_shown_exists_on_its_command():
    commands = _commands()
    checked = 0
    for doc in DOCS:
        for words in _command_lines(doc.read_text()):
            if not words or words[0].startswith("-"):
                flags = [w for w in words if w.startswith("--")]
                assert set(f.split("=")[0] for f in flags) <= commands[""], (doc.name, words)
                continue
            name = words[0]
            assert name in commands, f"{doc.name} shows `vqtok {name}`, which is no command"
            for word in words[1:]:
                if word.startswith("--"):
                    assert word.split("=")[0] in commands[name], f"{doc.name}: `vqtok {name}` has no {word}"
                    checked += 1
    assert checked > 40


def test_device_claim_matches_the_commands():
    text = README.read_text()
    m = re.search(r"The commands that run a model \((.*?)\) take `--device", text, re.S)
    assert m, "the README states which commands take --device"
    claimed = set(re.findall(r"`([a-z-]+)`", m.group(1)))
    commands = _commands()
    with_device = {name for name, opts in commands.items() if "--device" in opts}
    assert claimed == with_device
    m = re.search(r"else CPU\); (.*?) need no device", text, re.S)
    assert set(re.findall(r"`([a-z-]+)`", m.group(1))) == set(commands) - with_device - {""}


def test_links_point_inside_the_repository():
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(REPO) and path.exists(), f"{doc.name} links to {target}"
        assert "../shared" not in text and "shared/reference" not in text, doc.name


def test_refreshed_regions_match_the_script():
    refresh = _refresh_module()
    names = set()
    for doc in refresh.DOCS:
        text = doc.read_text()
        for m in refresh.MARKER.finditer(text):
            names.add(m["name"])
        opened = re.findall(r"<!-- refresh:([\w.-]+) -->", text)
        closed = re.findall(r"<!-- /refresh:([\w.-]+) -->", text)
        assert sorted(opened) == sorted(closed), doc.name
    assert names == set(refresh.REGIONS)


def test_rewrite_replaces_blocks_and_inline_regions_and_refuses_unknown_ones():
    refresh = _refresh_module()
    text = "a <!-- refresh:n -->1<!-- /refresh:n --> b\n<!-- refresh:blk -->\nold\n<!-- /refresh:blk -->\n"
    new, used = refresh.rewrite(text, {"n": "42", "blk": "```\nnew\n```"})
    assert new == "a <!-- refresh:n -->42<!-- /refresh:n --> b\n<!-- refresh:blk -->\n```\nnew\n```\n<!-- /refresh:blk -->\n"
    assert used == {"n", "blk"}
    assert refresh.rewrite(new, {"n": "42", "blk": "```\nnew\n```"})[0] == new  # idempotent
    with pytest.raises(SystemExit, match="'n'"):
        refresh.rewrite(text, {"blk": "x"})
    assert refresh.abbreviate("a\nb\nc\nd\ne", [0, -1]) == "a\n...\ne"
    assert refresh.abbreviate("a\nb\nc", [0, 1]) == "a\nb\n..."
