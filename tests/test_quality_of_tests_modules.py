"""Modules that the package looks up by name are all present: a renamed or missing one is a failure here,
not a quietly shorter list (`vqtok info` without the generator presets, `convert` without a format)."""

from typer.testing import CliRunner

from vqtok.interop import FORMATS, available_formats


def test_every_listed_interop_format_imports():
    assert [m.__name__ for m in available_formats()] == FORMATS


def test_info_lists_the_presets_of_every_family():
    from vqtok.ar.families import FAMILIES
    from vqtok.cli import app
    from vqtok.tokenizer.presets import PRESETS

    assert set(FAMILIES) == {"rar", "var", "llamagen"}
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    # the table wraps long rows: read each row's names between its label and the next label
    text = " ".join(result.output.split())
    labels = ["tokenizer presets"] + [f"{f.name} presets" for f in FAMILIES.values()] + ["tokenizer recipes"]
    spans = {a: text[text.index(a) + len(a):text.index(b)] for a, b in zip(labels, labels[1:])}
    assert [n.strip() for n in spans["tokenizer presets"].split(",")] == sorted(PRESETS)
    for family in FAMILIES.values():
        assert family.presets, f"{family.name} has no presets"
        names = [n.strip() for n in spans[f"{family.name} presets"].split(",")]
        assert names == list(family.presets), (family.name, names)
