"""`vqtok inspect DIR`: summarise a token directory and check it against its manifest.

Checks: every shard listed exists and holds the count the manifest says; every sample has the
manifest's dtype and (views, tokens) shape; tokens lie in [0, vocab_size); labels lie in
[0, num_classes) (or are -1 for unlabelled inputs); keys are unique; skipped.jsonl has num_skipped
lines; and each shard's sha256 matches the manifest (skipped with `--quick`; manifests written before
checksums existed have none, which the summary says). Reads one sample (tar) or one block of rows
(HDF5) at a time.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vqtok.data.token_shards import H5_NAME, MANIFEST, SKIPPED, file_sha256, iter_tar_samples, read_manifest


@dataclass
class InspectReport:
    manifest: dict
    problems: list[str] = field(default_factory=list)
    samples_seen: int = 0
    token_min: int | None = None
    token_max: int | None = None
    class_counts: dict[int, int] = field(default_factory=dict)
    checksums: str = "not checked (--quick)"

    def summary_lines(self) -> list[str]:
        m, t = self.manifest, self.manifest["tokenizer"]
        geo = m.get("geometry", {})
        lines = [
            f"format        {m['format']} (version {m['version']}), {len(m['shards'])} shard(s)",
            f"tokenizer     {t.get('preset')} hash={t.get('hash')} vocab={t['vocab_size']} scales={t.get('scales')}",
            f"tokens        {len(m['views'])} views x {t['tokens_per_view']} tokens, {m['dtype']}",
            f"views         {', '.join(m['views'])}",
            f"geometry      {geo.get('mode')} crop {geo.get('crop')} from center square {geo.get('center_crop')}",
            f"classes       {len(m.get('classes', []))}",
            f"samples       {m['num_samples']} (seen {self.samples_seen}), skipped {m.get('num_skipped', 0)}",
        ]
        if self.token_min is not None:
            lines.append(f"token range   [{self.token_min}, {self.token_max}]")
        lines.append(f"checksums     {self.checksums}")
        lines.append("status        OK" if not self.problems else f"status        BROKEN ({len(self.problems)} problem(s))")
        return lines


def inspect_token_dir(path: str | Path, max_problems: int = 20, verify_checksums: bool = True) -> InspectReport:
    path = Path(path)
    manifest = read_manifest(path)
    report = InspectReport(manifest)
    if verify_checksums:
        _verify_checksums(path, manifest, report)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    shape = (len(manifest["views"]), int(manifest["tokenizer"]["tokens_per_view"]))
    dtype = np.dtype(manifest["dtype"])
    num_classes = len(manifest.get("classes", []))
    problems = report.problems

    def check(key: str, tokens: np.ndarray, cls: int) -> None:
        if tokens.dtype != dtype or tokens.shape != shape:
            problems.append(f"{key}: tokens are {tokens.dtype}{tokens.shape}, manifest says {dtype}{shape}")
        if tokens.size:
            lo, hi = int(tokens.min()), int(tokens.max())
            report.token_min = lo if report.token_min is None else min(report.token_min, lo)
            report.token_max = hi if report.token_max is None else max(report.token_max, hi)
            if hi >= vocab:
                problems.append(f"{key}: token {hi} is outside the vocabulary of {vocab}")
        if cls < -1 or (num_classes and cls >= num_classes):  # -1 = unlabelled input
            problems.append(f"{key}: class {cls} is outside the {num_classes} classes")
        report.class_counts[cls] = report.class_counts.get(cls, 0) + 1

    keys: set[str] = set()
    if manifest["format"] == "wds":
        for shard in manifest["shards"]:
            file = path / shard["name"]
            if not file.is_file():
                problems.append(f"shard {shard['name']} is missing")
                continue
            n = 0
            try:
                for key, tokens, cls in iter_tar_samples(file):
                    n += 1
                    if key in keys:
                        problems.append(f"{key}: duplicate key")
                    keys.add(key)
                    check(key, tokens, cls)
            except (tarfile.TarError, ValueError, OSError, EOFError, UnicodeDecodeError) as exc:
                problems.append(f"shard {shard['name']} is unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
            report.samples_seen += n
            if n != shard["count"]:
                problems.append(f"shard {shard['name']} holds {n} samples, manifest says {shard['count']}")
            if len(problems) >= max_problems:
                break
    else:
        _inspect_h5(path / H5_NAME, manifest, report, check, keys)
    if report.samples_seen != manifest["num_samples"] and not any("manifest says" in p for p in problems):
        problems.append(f"found {report.samples_seen} samples, manifest says num_samples={manifest['num_samples']}")
    skipped_file = path / SKIPPED
    if skipped_file.is_file():
        lines = [ln for ln in skipped_file.read_text().splitlines() if ln.strip()]
        try:
            [json.loads(ln) for ln in lines]
        except json.JSONDecodeError:
            problems.append(f"{SKIPPED} is not valid JSON lines")
        if len(lines) != manifest.get("num_skipped", 0):
            problems.append(f"{SKIPPED} lists {len(lines)} inputs, manifest says num_skipped={manifest.get('num_skipped')}")
    elif manifest.get("num_skipped", 0):
        problems.append(f"{SKIPPED} is missing")
    return report


def _verify_checksums(path: Path, manifest: dict, report: InspectReport) -> None:
    shards = manifest["shards"]
    listed = [s for s in shards if s.get("sha256")]
    if not listed:
        report.checksums = f"none in {MANIFEST} (written by an older vqtok; re-encode to add them)"
        return
    bad = 0
    for shard in listed:
        file = path / shard["name"]
        if not file.is_file():
            continue  # reported as missing by the sample scan
        try:
            ok = file_sha256(file) == shard["sha256"]
        except OSError as exc:
            report.problems.append(f"shard {shard['name']} is unreadable ({exc.strerror or exc})")
            continue
        if not ok:
            bad += 1
            report.problems.append(f"shard {shard['name']} does not match its sha256 in {MANIFEST} (damaged or changed after encoding)")
    unlisted = len(shards) - len(listed)
    report.checksums = (f"{len(listed) - bad}/{len(listed)} shard(s) match" if bad else f"OK ({len(listed)} shard(s))") + (
        f", {unlisted} without a checksum" if unlisted else "")


def _inspect_h5(file: Path, manifest: dict, report: InspectReport, check, keys: set) -> None:
    import h5py

    if not file.is_file():
        report.problems.append(f"{H5_NAME} is missing")
        return
    try:
        with h5py.File(file, "r") as f:
            for name in ("tokens", "cls", "keys"):
                if name not in f:
                    report.problems.append(f"{H5_NAME} has no '{name}' dataset")
                    return
            n = f["tokens"].shape[0]
            if f["cls"].shape[0] != n or f["keys"].shape[0] != n:
                report.problems.append(f"{H5_NAME}: tokens, cls and keys have different lengths")
                return
            for start in range(0, n, 1024):
                tokens = f["tokens"][start : start + 1024]
                cls = f["cls"][start : start + 1024]
                ks = f["keys"][start : start + 1024]
                for i in range(len(tokens)):
                    key = ks[i].decode() if isinstance(ks[i], bytes) else str(ks[i])
                    if key in keys:
                        report.problems.append(f"{key}: duplicate key")
                    keys.add(key)
                    check(key, tokens[i], int(cls[i]))
            report.samples_seen = n
    except OSError as exc:
        report.problems.append(f"{H5_NAME} is unreadable ({exc})")
