"""The one config system: typed dataclasses, YAML recipes and `a.b=c` overrides.

Every component declares its settings as a dataclass (nested dataclasses for sections). This module
turns plain dicts (from YAML, from `key.sub=value` overrides) into those dataclasses, checking every
key and type on the way, and back into dicts for writing the resolved config next to a run's outputs.

    cfg = load_config(TrainConfig, "vqtok/recipes/tokenizer/tiny-vqgan.yaml", ["optim.lr=1e-4"])
    save_config(cfg, run_dir / "config.yaml")

Unknown keys and wrong types raise `ConfigError` naming the key and the valid keys, which the CLI
prints as one line with exit code 2.

Three hooks a config dataclass may define (all optional):

- `RENAMED_KEYS: ClassVar[dict[str, tuple[str, str]]]`, old key -> (its replacement, a note): a config
  that still uses an old key gets an error naming the replacement instead of "unknown key";
- `section_type(cls, name, data) -> type | None` (classmethod): the type of section `name` when it
  depends on other keys of `data` (the generator's `model` section is typed by its `arch`);
- `build_section(cls, name, value, data, where) -> object | None` (classmethod): builds section `name`
  from its mapping (e.g. starting from a named preset); None: the usual rules apply. Keys such a
  builder reads beyond the section's fields are declared in `SECTION_EXTRA_KEYS: {name: (key, ...)}`
  so that `name.key=value` overrides pass the key check.

`given_keys(obj)` tells which keys a section's mapping set explicitly (the rest are defaults or preset
values), for settings that something else decides unless the user gave them.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from vqtok.errors import ConfigError

T = TypeVar("T")

# Recipes ship inside the package (package data), so an installed wheel finds them the same way a checkout does.
RECIPES_DIR = Path(str(importlib.resources.files("vqtok").joinpath("recipes")))


# --------------------------------------------------------------------------------------------------
# dict -> dataclass


def from_dict(cls: type[T], data: Any, where: str = "", base: Any = None) -> T:
    """Build dataclass `cls` from a plain dict, validating every key and value.

    Keys the dict leaves out keep their defaults, and that holds for nested sections too: a section given
    in part (say `train: {batch_size: 64}`) starts from the default *instance* its parent declares (for
    RAR, `EngineConfig(ema=False)`), not from a fresh instance of the section's class. `base`, when given,
    is that instance for `cls` itself.
    """
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{_name(where) or 'config'} must be a mapping of keys to values, got {_show(data)}")
    hints = _section_hints(cls, data)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise _unknown_key(cls, where, str(unknown[0]), list(fields))
    kwargs = {}
    build = getattr(cls, "build_section", None)
    for name, value in data.items():
        built = build(name, value, data, _join(where, name)) if build is not None else None
        if built is not None:
            kwargs[name] = built
            continue
        default = getattr(base, name) if base is not None else _field_default(fields[name])
        if (dataclasses.is_dataclass(default) and not isinstance(default, type) and isinstance(value, dict)
                and type(default) is _dataclass_of(hints[name])):
            kwargs[name] = from_dict(type(default), value, _join(where, name), base=default)
        else:
            kwargs[name] = _convert(hints[name], value, _join(where, name))
    if base is not None:
        for name in fields:
            if name not in kwargs:
                kwargs[name] = copy.deepcopy(getattr(base, name))
    for name, tp in hints.items():  # a section left out whose type `section_type` changed: that type's defaults
        if name in fields and name not in kwargs and _dataclass_of(tp) is not None:
            default = _field_default(fields[name])
            if dataclasses.is_dataclass(default) and type(default) is not _dataclass_of(tp):
                built = build(name, {}, data, _join(where, name)) if build is not None else None
                kwargs[name] = built if built is not None else from_dict(_dataclass_of(tp), {}, _join(where, name))
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key '{_join(where, missing[0])}'")
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid config{_under(where)}: {exc}") from None
    if hasattr(obj, "check_ranges"):  # numeric ranges, named by key path (vqtok.validation)
        obj.check_ranges(where)
    _record_given(obj, data)
    return obj


def given_keys(obj: Any) -> frozenset[str]:
    """The keys that the mapping `obj` was built from set explicitly (empty for an object built in code)."""
    return obj.__dict__.get(_GIVEN, frozenset()) if hasattr(obj, "__dict__") else frozenset()


def _record_given(obj: Any, data: dict) -> None:
    if hasattr(obj, "__dict__"):
        obj.__dict__[_GIVEN] = frozenset(data)


_GIVEN = "_config_given_keys"


def _section_hints(cls: type, data: dict) -> dict[str, Any]:
    """Field types of `cls`, with the sections whose type depends on `data` resolved (`section_type`)."""
    hints = get_type_hints(cls)
    pick = getattr(cls, "section_type", None)
    if pick is not None:
        for name in list(hints):
            tp = pick(name, data)
            if tp is not None:
                hints[name] = tp
    return hints


def _unknown_key(cls: type, where: str, key: str, valid: list[str]) -> ConfigError:
    renamed = getattr(cls, "RENAMED_KEYS", {})
    if key in renamed:
        new, note = renamed[key]
        return ConfigError(f"config key '{_join(where, key)}' was replaced by '{_join(where, new)}'{note}")
    return ConfigError(f"unknown config key '{_join(where, key)}'; valid keys{_under(where)}: {', '.join(valid)}")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{where}' has an invalid value {_show(value)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"'{where}' must be one of {', '.join(map(str, choices))}; got {_show(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and origin is not None:
            raise ConfigError(f"'{where}' must be a list, got {_show(value)}")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, got {_show(value)}")
        args = get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"'{where}' must have {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {_show(value)}")
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{where}' must be true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{where}' must be an integer, got {_show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"'{where}' must be a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{where}' must be a string, got {_show(value)}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"'{where}' must be a path, got {_show(value)}")
    return value


# --------------------------------------------------------------------------------------------------
# dataclass -> dict


def to_dict(obj: Any) -> Any:
    """Plain, YAML-safe representation of a config dataclass (tuples become lists, paths strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(to_dict(data), sort_keys=False, default_flow_style=None)


def save_config(obj: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: temp file then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_yaml(obj))
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# overrides and loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(cls: type, data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set `key.sub=value` pairs into `data`, checking each key path against the dataclass `cls`."""
    data = _deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node, schema, extra = data, cls, ()
        for depth, part in enumerate(path):
            where = ".".join(path[:depth])
            if schema is not None and dataclasses.is_dataclass(schema):
                names = [f.name for f in dataclasses.fields(schema) if f.init]
                if part not in names and part not in extra:
                    raise _unknown_key(schema, where, part, names)
                extra = getattr(schema, "SECTION_EXTRA_KEYS", {}).get(part, ())
                schema = _dataclass_of(_section_hints(schema, node)[part]) if part in names else None
            last = depth == len(path) - 1
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = {}
                    node[part] = child
                node = child
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def resolve_recipe(name_or_path: str | Path, kind: str) -> Path:
    """A recipe is a YAML path, or a name looked up in recipes/<kind>/<name>.yaml."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = RECIPES_DIR / kind / f"{p.name.removesuffix('.yaml')}.yaml"
    if p.suffix in ("", ".yaml") and len(p.parts) == 1 and candidate.is_file():
        return candidate
    known = ", ".join(list_recipes(kind)) or "none"
    raise ConfigError(f"config {name_or_path} not found (neither a file nor a recipe in vqtok/recipes/{kind}/: {known})")


def list_recipes(kind: str) -> list[str]:
    folder = RECIPES_DIR / kind
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_config(
    cls: type[T],
    config: str | Path | dict | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    kind: str | None = None,
) -> T:
    """Defaults of `cls`, then the YAML file (or recipe name when `kind` is given), then overrides."""
    if isinstance(config, dict):
        data = config
    elif config is None:
        data = {}
    else:
        path = resolve_recipe(config, kind) if kind else Path(config)
        data = load_yaml(path)
    data = apply_overrides(cls, data, list(overrides))
    return from_dict(cls, data)


# --------------------------------------------------------------------------------------------------
# helpers


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        for arg in get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _name(where: str) -> str:
    return f"'{where}'" if where else ""


def _under(where: str) -> str:
    return f" under '{where}'" if where else ""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = [
    "ConfigError",
    "RECIPES_DIR",
    "apply_overrides",
    "dump_yaml",
    "from_dict",
    "given_keys",
    "list_recipes",
    "load_config",
    "load_yaml",
    "parse_override",
    "resolve_recipe",
    "save_config",
    "to_dict",
]
