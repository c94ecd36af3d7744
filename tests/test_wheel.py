"""The built wheel is a working install: every recipe is package data and loads by name from a
non-editable copy (built offline with the venv's setuptools, installed with `pip --target`)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CHECK = r"""
import json, sys
import vqtok
from vqtok.config import RECIPES_DIR, list_recipes
from vqtok.train.ar_task import load_run_config as ar_config
from vqtok.train.tokenizer_task import load_run_config as tokenizer_config
loaded = {}
for kind, load in (("tokenizer", tokenizer_config), ("ar", ar_config)):
    loaded[kind] = []
    for name in list_recipes(kind):
        load(name)
        loaded[kind].append(name)
print(json.dumps({"file": vqtok.__file__, "recipes_dir": str(RECIPES_DIR), "loaded": loaded,
                  "version": vqtok.__version__}))
"""


def test_wheel_ships_every_recipe_and_an_installed_copy_loads_them(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    # build from a copy, so the checkout gets no build/ or *.egg-info
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "vqtok", src / "vqtok", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    env.pop("PYTHONPATH", None)
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dist), str(src)],
                           capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = dist.glob("vqtok-*.whl")

    expected = sorted(str(p.relative_to(REPO)) for p in (REPO / "vqtok" / "recipes").rglob("*.yaml"))
    assert len(expected) >= 10
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert [p for p in expected if p not in names] == []

    site = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    assert not list(site.glob("__editable__*")) and (site / "vqtok" / "recipes").is_dir()

    # the installed copy first on the path (the shared venv still supplies torch etc.), run from elsewhere
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(site.resolve())
    assert Path(report["recipes_dir"]).resolve().is_relative_to(site.resolve())
    loaded = sorted(f"vqtok/recipes/{kind}/{name}.yaml" for kind, names in report["loaded"].items() for name in names)
    assert loaded == expected

    from vqtok import __version__

    assert report["version"] == __version__ and wheel.name.startswith(f"vqtok-{__version__}-")
    # the console entry point of the installed copy finds its recipes by name too
    info = subprocess.run([sys.executable, "-m", "vqtok", "info"], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert info.returncode == 0 and "tiny-fsq" in info.stdout and "rar-tiny" in info.stdout, info.stderr[-2000:]
