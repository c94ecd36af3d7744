"""Regenerate the printed outputs in README.md and examples/tiny_cpu_walkthrough.md from a real run.

Runs the demo-sized commands (the settings of examples/demo.py) one by one as a user would, from a scratch
directory so every printed path reads `demo_out/...`, and rewrites the marked regions of the documents
with what the commands printed and with numbers read from the files the run wrote (parameter counts from
the checkpoints, losses from metrics.jsonl, PSNR from metrics.json, times measured here). It also triggers
the user mistakes listed under "Troubleshooting" and copies their real messages.

    python examples/refresh_readme.py            # run everything (minutes on a CPU), rewrite the docs
    python examples/refresh_readme.py --check    # run, then exit 1 if a document would change (CI)
    python examples/refresh_readme.py --keep DIR # keep the run's files in DIR (default: a temporary dir)

A marked region is `<!-- refresh:NAME -->...<!-- /refresh:NAME -->`: a block (the markers on their own
lines around a fenced block) or inline (inside a sentence). A document that names a region this script
does not produce, or the reverse, is an error, so the two cannot drift apart silently.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "examples" / "tiny_cpu_walkthrough.md"]
# every region the run produces; each must appear in at least one document (tests/test_readme.py checks)
REGIONS = frozenset({
    "info", "version", "demo-data", "train-tokenizer", "reconstruct", "eval-tokenizer", "encode", "train-ar", "sample",
    "tok-params", "tok-params-k", "rar-params", "rar-params-k", "tok-l1", "ar-loss", "ar-steps", "tok-steps",
    "recon-mean", "demo-images", "demo-classes", "demo-time", "stage-times",
    "err-config-key", "err-lpips", "err-inception", "err-other-tokenizer", "err-sample-tokenizer", "err-pickle",
    "err-missing-input", "err-resume-past-end", "err-grid",
})
MARKER = re.compile(r"<!-- refresh:(?P<name>[\w.-]+) -->(?P<body>.*?)<!-- /refresh:(?P=name) -->", re.S)


def _demo_settings():
    """The demo's recipe choices (examples/demo.py is the one place they are decided)."""
    spec = importlib.util.spec_from_file_location("vqtok_demo", REPO / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ running


class Runner:
    """Runs `vqtok ...` in `work` (so paths print as demo_out/...), records output and wall time."""

    def __init__(self, work: Path, device: str | None):
        self.work, self.device = work, device
        self.times: dict[str, float] = {}
        self.torch_home = work / "empty-torch-home"  # no weight files: the missing-weights messages
        self.torch_home.mkdir(parents=True, exist_ok=True)

    def run(self, *args: str, name: str | None = None, expect: int = 0, device: bool = True, env: dict | None = None) -> str:
        cmd = ["vqtok", *args] + (["--device", self.device] if device and self.device else [])
        print(f"$ {shlex.join(cmd)}", flush=True)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "100", **(env or {})}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", *cmd], cwd=self.work, env=full_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        elapsed = time.perf_counter() - start
        output = "\n".join(line.rstrip() for line in proc.stdout.rstrip().splitlines())
        print(output, flush=True)
        if proc.returncode != expect:
            raise SystemExit(f"`{shlex.join(cmd)}` exited {proc.returncode}, expected {expect}; its output is above")
        if name:
            self.times[name] = elapsed
        return output

    def error_line(self, *args: str, env: dict | None = None) -> str:
        """The one `error: ...` line a user mistake prints (exit code 2)."""
        output = self.run(*args, expect=2, device=False, env={"TORCH_HOME": str(self.torch_home), **(env or {})})
        lines = [line for line in output.splitlines() if line.startswith("error: ")]
        if len(lines) != 1:
            raise SystemExit(f"expected one error line from `vqtok {shlex.join(args)}`, got: {output!r}")
        return lines[0].replace(str(self.torch_home), "~/.cache/torch").replace(str(self.work) + "/", "")


def shell(cmd: list[str], width: int = 110) -> str:
    """A `$ vqtok ...` line, wrapped with backslashes the way a person would type it."""
    words, lines, line = [shlex.quote(w) for w in cmd], [], "$ vqtok"
    for word in words:
        if len(line) + 1 + len(word) > width:
            lines.append(line + " \\")
            line = "    " + word
        else:
            line += " " + word
    return "\n".join(lines + [line])


def abbreviate(text: str, keep: list[int]) -> str:
    """Keep the lines at the given indices (negative from the end), '...' where lines were left out."""
    lines = text.splitlines()
    chosen = sorted({i % len(lines) for i in keep if -len(lines) <= i < len(lines)})
    out, last = [], -1
    for i in chosen:
        if i != last + 1:
            out.append("...")
        out.append(lines[i])
        last = i
    if last != len(lines) - 1:
        out.append("...")
    return "\n".join(out)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _num_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        total = 0
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            n = 1
            for s in shape:
                n *= s
            total += n
    return total


def _k(n: int) -> str:
    return f"{n / 1000:.0f}k"


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------ the run


def run_all(work: Path, device: str | None) -> dict[str, str]:
    """Run the demo-sized commands and the troubleshooting cases; return region name -> new text."""
    demo = _demo_settings()
    r = Runner(work, device)
    out: dict[str, str] = {}
    data, tok, recon, tokens, rar, samples = ("demo_out/data", "demo_out/runs/tok", "demo_out/recon", "demo_out/tokens",
                                              "demo_out/runs/rar", "demo_out/samples")
    load_before = _load()
    start = time.perf_counter()

    info = r.run("info", device=False)
    out["info"] = f"```\n$ vqtok info\n{info}\n```"
    version = r.run("--version", device=False)
    out["version"] = f"```\n$ vqtok --version\n{version}\n```"

    args = ["demo-data", data]
    out["demo-data"] = f"```\n{shell(args)}\n{r.run(*args, name='demo-data', device=False)}\n```"

    args = ["train-tokenizer", data, "--config", demo.TOKENIZER_RECIPE, "--out", tok, *demo.TOKENIZER_OVERRIDES]
    log = r.run(*args, name="train-tokenizer")
    out["train-tokenizer"] = f"```\n{shell(args)}\n{abbreviate(log, [0, -2, -1])}\n```"

    picked = [f"{data}/train/{c}" for c in ("astronaut", "coffee", "motorcycle")]
    args = ["reconstruct", *picked, "--tokenizer", f"{tok}/final", "--out", recon]
    text = r.run(*args, name="reconstruct")
    table = text.splitlines()
    # the title, the header, the first image's row, the mean, the closing line
    keep = [i for i, line in enumerate(table) if not line.startswith(("│", "├")) or "mean of" in line]
    first_row = next(i for i, line in enumerate(table) if line.startswith("│"))
    out["reconstruct"] = f"```\n{shell(args)}\n{abbreviate(text, sorted(set(keep) | {first_row}))}\n```"

    args = ["eval-tokenizer", data, "--tokenizer", f"{tok}/final", "--no-fid", "--no-lpips"]
    out["eval-tokenizer"] = f"```\n{shell(args)}\n{r.run(*args, name='eval-tokenizer')}\n```"

    args = ["encode", data, "--ten-crop", "--tokenizer", f"{tok}/final", "--out", tokens]
    encode_text = r.run(*args, name="encode")
    inspect_text = r.run("inspect", tokens, name="inspect", device=False)
    out["encode"] = f"```\n{shell(args)}\n{encode_text}\n{shell(['inspect', tokens])}\n{inspect_text}\n```"

    args = ["train-ar", tokens, "--tokenizer", f"{tok}/final", "--config", demo.AR_RECIPE, "--epochs", demo.AR_EPOCHS,
            "--anneal", *demo.ANNEAL, "--out", rar, *demo.AR_OVERRIDES]
    log = r.run(*args, name="train-ar")
    out["train-ar"] = f"```\n{shell(args)}\n{abbreviate(log, [0, len(log.splitlines()) // 2, -2, -1])}\n```"

    args = ["sample", "--ckpt", f"{rar}/final", "--tokenizer", f"{tok}/final", *demo.SAMPLE_ARGS, "--per-class", "4",
            "--png", "--npz", "--out", samples]
    out["sample"] = f"```\n{shell(args)}\n{r.run(*args, name='sample')}\n```"
    total = time.perf_counter() - start

    # numbers from the run's files
    w = Path(work)
    tok_params, rar_params = _num_parameters(w / tok / "final"), _num_parameters(w / rar / "final")
    tok_rows, rar_rows = _rows(w / tok / "metrics.jsonl"), _rows(w / rar / "metrics.jsonl")
    recon_metrics = json.loads((w / recon / "metrics.json").read_text())
    manifest = json.loads((w / tokens / "manifest.json").read_text())
    photos = sorted((w / data / "train").glob("*/*"))
    out["tok-params"] = f"{tok_params:,}"
    out["tok-params-k"] = _k(tok_params)
    out["rar-params"] = f"{rar_params:,}"
    out["rar-params-k"] = _k(rar_params)
    out["tok-l1"] = f"{tok_rows[0]['rec_l1']:.2f} -> {tok_rows[-1]['rec_l1']:.2f}"
    out["ar-loss"] = f"{rar_rows[0]['loss']:.1f} to {rar_rows[-1]['loss']:.1f}"
    out["ar-steps"] = str(rar_rows[-1]["step"])
    out["tok-steps"] = str(tok_rows[-1]["step"])
    out["recon-mean"] = f"{recon_metrics['mean_psnr']:.1f} dB / {recon_metrics['mean_ssim']:.2f}"
    out["demo-images"] = str(len(photos))
    out["demo-classes"] = str(len(manifest["classes"]))
    cores = os.cpu_count() or 0
    when = datetime.date.today().isoformat()
    machine = f"{cores}-core {platform.machine()} CPU, load average {load_before} at the start"
    out["demo-time"] = f"{total / 60:.1f} minutes ({machine}, {when})"
    rows = "\n".join(f"| `vqtok {name}` | {seconds:.0f} s |" for name, seconds in r.times.items())
    out["stage-times"] = (f"Measured by `examples/refresh_readme.py` on {when}: {machine} (a shared machine: other jobs "
                          f"change these times severalfold).\n\n| command | wall time |\n|---|---|\n{rows}\n"
                          f"| all of the above | {total:.0f} s |")

    out.update(troubleshooting(r, demo, data, tok, tokens, rar, samples))
    if set(out) != REGIONS:
        raise SystemExit(f"the run produced {sorted(set(out) ^ REGIONS)} unlike REGIONS; update one of them")
    return out


def troubleshooting(r: Runner, demo, data: str, tok: str, tokens: str, rar: str, samples: str) -> dict[str, str]:
    """Trigger each listed mistake and take its real message."""
    w = r.work
    other = "demo_out/runs/other-tok"
    r.run("train-tokenizer", data, "--config", "tiny-vqgan", "--out", other, "train.steps=1", "train.num_workers=0",
          device=True)
    import torch

    torch.save({"args": argparse.Namespace(lr=1e-4), "model": {"w": torch.zeros(2)}}, w / "pickled.pt")
    cases = {
        "err-config-key": ("train-tokenizer", data, "--config", "tiny-fsq", "--out", "demo_out/runs/x", "train.stepz=10"),
        "err-lpips": ("train-tokenizer", data, "--config", "tiny-fsq", "--out", "demo_out/runs/x",
                      "loss.perceptual_weight=1.0"),
        "err-inception": ("eval-fid", f"{samples}/samples.npz", "--ref", f"{samples}/samples.npz"),
        "err-other-tokenizer": ("train-ar", tokens, "--tokenizer", f"{other}/final", "--config", "rar-tiny",
                                "--out", "demo_out/runs/x"),
        "err-sample-tokenizer": ("sample", "--ckpt", f"{rar}/final", "--tokenizer", f"{other}/final", "--out",
                                 "demo_out/x"),
        "err-pickle": ("convert", "pickled.pt", "--out", "demo_out/x"),
        "err-missing-input": ("encode", "nonexistent", "--tokenizer", f"{tok}/final", "--out", "demo_out/x"),
        "err-resume-past-end": ("train-ar", tokens, "--tokenizer", f"{tok}/final", "--config", demo.AR_RECIPE,
                                "--out", rar, "--resume", "auto", "--epochs", "1", *demo.AR_OVERRIDES),
        "err-grid": ("encode", data, "--tokenizer", f"{tok}/final", "--out", "demo_out/x", "--size", "256"),
    }
    found = {name: f"`{r.error_line(*args)}`" for name, args in cases.items()}
    shutil.rmtree(w / other, ignore_errors=True)
    return found


# ----------------------------------------------------------------------------------------- rewriting


def rewrite(text: str, values: dict[str, str], where: str = "document") -> tuple[str, set[str]]:
    """Replace every marked region's body; returns (new text, names used). Unknown names are errors."""
    used: set[str] = set()

    def replace(m: re.Match) -> str:
        name = m["name"]
        if name not in values:
            raise SystemExit(f"{where} has a region '{name}' that refresh_readme.py does not produce")
        used.add(name)
        body = values[name]
        if m["body"].startswith("\n"):  # a block: markers on their own lines
            body = f"\n{body}\n"
        return f"<!-- refresh:{name} -->{body}<!-- /refresh:{name} -->"

    return MARKER.sub(replace, text), used


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if a document would change; write nothing")
    p.add_argument("--keep", type=Path, help="run in this directory and keep its files (default: a temporary one)")
    p.add_argument("--device", default=None, help="passed to the commands that take it (default: what vqtok picks)")
    args = p.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        if any(args.keep.iterdir()):
            raise SystemExit(f"--keep {args.keep} must be empty or new")
        work = args.keep.resolve()
        values = run_all(work, args.device)
    else:
        with tempfile.TemporaryDirectory(prefix="vqtok-refresh-") as tmp:
            values = run_all(Path(tmp), args.device)
    used: set[str] = set()
    changed = []
    for doc in DOCS:
        old = doc.read_text()
        new, names = rewrite(old, values, str(doc.relative_to(REPO)))
        used |= names
        if new != old:
            changed.append(doc)
            if not args.check:
                doc.write_text(new)
    unused = sorted(set(values) - used)
    if unused:
        raise SystemExit(f"no document has a region for: {', '.join(unused)}")
    for doc in changed:
        print(f"{'would update' if args.check else 'updated'} {doc.relative_to(REPO)}")
    if not changed:
        print("the documents match this run")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
