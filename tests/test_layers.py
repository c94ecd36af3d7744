"""The package's layers, enforced by reading every module's imports (ast; nothing is imported).

Layers, lowest first; a module may import its own layer and the layers below it, never above:

  1 base     vqtok/{errors,device,validation,weights,config,fs_errors,signals,run_lock,
             run_dirs,distributed,image_grid,hub,atomic_files}.py and the package itself
  2 models   vqtok.tokenizer, vqtok.ar
  3 support  vqtok.losses, vqtok.eval, vqtok.interop, vqtok.data
  4 train    vqtok.train
  5 app      vqtok.app
  6 cli      vqtok.cli, vqtok.__main__

so models import nothing from losses, eval, interop, data, training, the app layer or the CLI. On top of
the order: vqtok.data imports no generator (vqtok.ar); the training engine (vqtok.train.engine) imports
no model package; nothing outside the CLI imports vqtok.cli. Every import counts: absolute and
relative, at module level or inside functions, and `importlib.import_module("vqtok....")` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "vqtok"

BASE = {"errors", "device", "validation", "weights", "config", "fs_errors", "signals",
        "run_lock", "run_dirs", "distributed", "image_grid", "hub", "atomic_files"}
LAYERS = {"tokenizer": 2, "ar": 2, "losses": 3, "eval": 3, "interop": 3, "data": 3, "train": 4, "app": 5,
          "cli": 6, "__main__": 6}
LAYER_NAMES = {1: "base", 2: "models", 3: "support", 4: "train", 5: "app", 6: "cli"}
MODELS = ("vqtok.tokenizer", "vqtok.ar")
# (importer prefix, forbidden prefixes, why): the rules the plain layer order does not already imply
EXTRA_RULES = [
    ("vqtok.data", ("vqtok.ar",), "data imports no generator code"),
    ("vqtok.train.engine", MODELS, "the training engine imports no model package"),
]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_name(path: Path, root: Path) -> str:
    """vqtok/ar/rar.py -> vqtok.ar.rar; vqtok/ar/__init__.py -> vqtok.ar (root is the package folder)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def vqtok_imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, imported vqtok module) for every import in the file, wherever it stands."""
    module = module_name(path, root)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            # `from vqtok import train` / `from . import rar` import submodules: name them
            for alias in node.names:
                found.append((node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base))
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in found if _within(name, "vqtok")]


def layer_of(name: str) -> int | None:
    """The layer of a vqtok module name (None: a top-level module no layer names)."""
    parts = name.split(".")
    if len(parts) == 1:
        return 1  # the package itself
    top = parts[1]
    if top in BASE:
        return 1
    return LAYERS.get(top)


def layer_violations(root: Path) -> list[str]:
    """Every broken rule, one line each: 'vqtok/x.py:LINE: vqtok.x imports vqtok.y (why)'."""
    problems: list[str] = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        where = path.relative_to(root.parent).as_posix()
        own = layer_of(module)
        if own is None:
            problems.append(f"{where}: module {module} is in no layer; place it in tests/test_layers.py")
            continue
        for line, name in vqtok_imports(path, root):
            target = layer_of(name)  # vqtok.errors.UserError (an attribute) has the layer of vqtok.errors
            if target is None:
                continue  # a top-level name no module holds: the import itself fails elsewhere
            if _within(name, "vqtok.cli") and not (_within(module, "vqtok.cli") or module == "vqtok.__main__"):
                problems.append(f"{where}:{line}: {module} imports {name} (nothing but the CLI imports vqtok.cli)")
                continue
            if target > own:
                problems.append(f"{where}:{line}: {module} imports {name} (layer {LAYER_NAMES[own]} imports "
                                f"no higher layer; {name} is {LAYER_NAMES[target]})")
                continue
            for importer, forbidden, why in EXTRA_RULES:
                if _within(module, importer) and any(_within(name, f) for f in forbidden):
                    problems.append(f"{where}:{line}: {module} imports {name} ({why})")
    return problems


def test_the_package_keeps_its_layers():
    problems = layer_violations(PACKAGE_ROOT)
    assert not problems, "import rules broken:\n" + "\n".join(problems)


def test_every_module_is_read():
    modules = {module_name(p, PACKAGE_ROOT) for p in PACKAGE_ROOT.rglob("*.py")}
    assert {"vqtok.ar.sampling", "vqtok.train.engine", "vqtok.cli.app", "vqtok.distributed"} <= modules
    edges = {name for p in PACKAGE_ROOT.rglob("*.py") for _, name in vqtok_imports(p, PACKAGE_ROOT)}
    assert any(_within(n, "vqtok.errors") for n in edges)  # the walk sees imports at all


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture()
def fake_package(tmp_path: Path) -> Path:
    root = tmp_path / "vqtok"
    for rel in ("__init__.py", "errors.py", "ar/__init__.py", "ar/rar.py", "tokenizer/__init__.py",
                "data/__init__.py", "train/__init__.py", "cli/__init__.py", "cli/app.py", "__main__.py"):
        _write(root, rel, "")
    _write(root, "train/engine.py", "from vqtok.errors import UserError\n")
    _write(root, "__main__.py", "from vqtok.cli.app import main\n")
    _write(root, "cli/app.py", "from vqtok.train import engine\nfrom vqtok.ar import rar\n")
    return root


def test_a_clean_synthetic_package_passes(fake_package):
    assert layer_violations(fake_package) == []


@pytest.mark.parametrize("rel, text, expected", [
    # a model importing training code, inside a function, relative
    ("ar/rar.py", "def f():\n    from ..train import engine\n",
     "vqtok/ar/rar.py:2: vqtok.ar.rar imports vqtok.train.engine (layer models imports no higher layer"),
    ("ar/rar.py", "from vqtok.data import images\n",
     "vqtok/ar/rar.py:1: vqtok.ar.rar imports vqtok.data.images (layer models imports no higher layer"),
    ("data/images.py", "import vqtok.ar.rar\n",
     "vqtok/data/images.py:1: vqtok.data.images imports vqtok.ar.rar (data imports no generator code)"),
    ("train/engine.py", "from vqtok.tokenizer import autoencoder\n",
     "vqtok/train/engine.py:1: vqtok.train.engine imports vqtok.tokenizer.autoencoder (the training engine"),
    ("errors.py", "from .train.engine import Engine\n",
     "vqtok/errors.py:1: vqtok.errors imports vqtok.train.engine.Engine (layer base imports no higher layer"),
    ("train/ar_task.py", "import importlib\nmod = importlib.import_module('vqtok.cli.app')\n",
     "vqtok/train/ar_task.py:2: vqtok.train.ar_task imports vqtok.cli.app (nothing but the CLI imports"),
    ("stray.py", "",
     "vqtok/stray.py: module vqtok.stray is in no layer"),
])
def test_a_synthetic_violation_is_named_with_its_module_and_import(fake_package, rel, text, expected):
    _write(fake_package, rel, text)
    problems = layer_violations(fake_package)
    assert len(problems) == 1 and problems[0].startswith(expected), problems
