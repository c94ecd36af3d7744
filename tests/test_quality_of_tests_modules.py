"""Modules that the package looks up by name are all present: a renamed or missing one is a failure here,
not a quietly shorter list (`vqtok info` without the generator presets, `convert` without a format)."""

from vqtok import registry
from vqtok.interop import FORMATS, available_formats


def test_every_listed_interop_format_imports():
    assert [m.__name__ for m in available_formats()] == FORMATS


def test_every_preset_family_imports():
    presets = registry.list_presets()
    assert set(presets) == set(registry.FAMILIES)
    assert all(presets[kind] for kind in registry.FAMILIES)
