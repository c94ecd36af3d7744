"""Conformance against the official implementations' fixtures (../shared/fixtures or $VQTOK_FIXTURES).

One test case per fixture JSON (top level and `generators/`), driven by the JSON alone: its `fixture` kind
picks the runner (a generator's harness is tests/conformance_<kind>.py), and sizes, file names, shapes and
tolerances all come from the JSON. Weights go through the same `vqtok.interop` conversion users get. A
second group checks that every full-size key listing in `keys/*.json` and `generators/keys/*.json` maps
exactly (every key used, none missing, shapes equal), on the meta device. The RAR sampling fixtures are
also run through the `vqtok sample` command itself (top-k and top-p on).

Without the fixtures these tests skip; with VQTOK_REQUIRE_FIXTURES=1 (what .ci/run sets) a missing folder
or file, or one whose SHA-256 differs from the folder's SHA256SUMS, is a failure.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("VQTOK_FIXTURES", REPO.parent / "shared" / "fixtures"))
REQUIRED = os.environ.get("VQTOK_REQUIRE_FIXTURES") == "1"


def _params(paths: list[Path], what: str):
    if not paths:
        reason = f"no {what} found under {FIXTURES} (set VQTOK_FIXTURES)"
        # required: one case that fails with the reason instead of a skip
        return [pytest.param(None, id=f"missing-{what.replace(' ', '-')}", marks=() if REQUIRED else pytest.mark.skip(reason=reason))]
    return [pytest.param(p, id=p.stem) for p in paths]


def _present(path: Path | None, what: str) -> Path:
    if path is None:
        pytest.fail(f"no {what} found under {FIXTURES}, and VQTOK_REQUIRE_FIXTURES=1 makes that a failure")
    return path


FIXTURE_JSONS = sorted(FIXTURES.glob("*.json")) if FIXTURES.is_dir() else []
KEY_LISTINGS = sorted((FIXTURES / "keys").glob("*.json")) if (FIXTURES / "keys").is_dir() else []


@pytest.fixture(autouse=True)
def _fp32_exact():
    """fp32 without TF32, as the fixtures were produced."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------------------------------- helpers


class Checker:
    """Compares outputs against the fixture with the JSON's suggested tolerances; collects every failure."""

    def __init__(self, meta: dict, expected: dict):
        self.tolerances = meta["tolerances"]["suggested"]
        self.expected = expected
        self.failures: list[str] = []
        self.checked: set[str] = set()

    def tol(self, name: str) -> dict:
        if name not in self.tolerances:
            raise AssertionError(f"fixture gives no suggested tolerance for {name}")
        return self.tolerances[name]

    def compare(self, name: str, actual, expected=None, tol_name: str | None = None) -> bool:
        expected = self.expected[name] if expected is None else expected
        tol = self.tol(tol_name or name)
        self.checked.add(name.split("[")[0])
        actual = torch.as_tensor(actual).detach().cpu()
        expected = torch.as_tensor(expected)
        if tol.get("exact_match_expected"):
            actual = actual.reshape(expected.shape) if actual.numel() == expected.numel() else actual
            if actual.shape != expected.shape or not torch.equal(actual.long(), expected.long()):
                wrong = (actual.reshape(-1) != expected.reshape(-1)).sum().item() if actual.numel() == expected.numel() else "all"
                self.failures.append(f"{name}: {wrong} of {expected.numel()} indices differ")
                return False
            return True
        try:
            torch.testing.assert_close(actual.float(), expected.float(), atol=tol["atol"], rtol=tol["rtol"])
        except AssertionError as exc:
            diff = (actual.float() - expected.float()).abs().max().item() if actual.shape == expected.shape else "shape"
            self.failures.append(f"{name}: max abs diff {diff} > atol {tol['atol']} ({str(exc).splitlines()[0]})")
            return False
        return True

    def compare_scales(self, name: str, actual: list, expected: list) -> None:
        """Per-scale lists: report the first scale that differs (later ones follow from it)."""
        if len(actual) != len(expected):
            self.failures.append(f"{name}: {len(actual)} scales, expected {len(expected)}")
            return
        for k, (a, e) in enumerate(zip(actual, expected)):
            if not self.compare(f"{name}[{k}]", a, e):
                self.failures[-1] = f"first differing scale {k}: " + self.failures[-1]
                return

    def finish(self) -> None:
        stored = set(self.expected)
        unchecked = stored - self.checked
        assert not unchecked, f"outputs stored in the fixture but not reproduced: {sorted(unchecked)}"
        assert not self.failures, "fixture mismatch:\n  " + "\n  ".join(self.failures)


def _load(root: Path, rel: str) -> dict:
    return torch.load(root / rel, map_location="cpu", weights_only=True)


def _load_fixture(json_path: Path):
    meta = json.loads(json_path.read_text())
    root = json_path.parent
    state: dict[str, torch.Tensor] = {}
    for shard in meta["weights"]["files"]:
        state.update(_load(root, shard["file"]))
    listed = meta["weights"]["state_dict"]
    assert list(state) == list(listed), "weight shards do not merge into the listed state dict"
    for k, spec in listed.items():
        assert list(state[k].shape) == spec["shape"], k
    inputs = _load(root, meta["inputs"]["file"])
    outputs: dict = {}
    files = meta["outputs"].get("files") or [meta["outputs"]["file"]]
    for rel in files:
        outputs.update(_load(root, rel))
    return meta, state, inputs, outputs


def _tokenizer(module, state, cfg):
    from vqtok.interop.common import convert_state
    from vqtok.tokenizer.tokenizer import Tokenizer

    converted = convert_state(state, cfg, module.rename, module.DESCRIPTION)  # the mapping users get
    tok = Tokenizer(cfg)
    tok.load_state_dict(converted, strict=True)
    return tok.eval()


def _to_unit(tok, x):
    lo, hi = tok.config.value_range
    return (x - lo) / (hi - lo)


def _to_native(tok, y):
    lo, hi = tok.config.value_range
    return y * (hi - lo) + lo


# ------------------------------------------------------------------------------------------- runners


def run_maskgit_vqgan(meta, state, inputs, expected):
    from vqtok.interop import maskgit

    conv = meta["constructor"]["conv_config"]
    quant = meta["constructor"]["quantizer"]
    x = inputs["images"]
    cfg = maskgit.to_config(state, resolution=x.shape[-1])
    ae = cfg.autoencoder
    assert (ae.ch, ae.ch_mult, ae.num_res_blocks, ae.z_channels) == (
        conv["hidden_channels"], conv["channel_mult"], conv["num_res_blocks"], conv["z_channels"]
    ), "architecture detected from the shapes differs from the fixture's constructor"
    cfg.quantizer.params["beta"] = quant["commitment_cost"]
    tok = _tokenizer(maskgit, state, cfg)
    check = Checker(meta, expected)
    with torch.no_grad():
        features = tok.encoder(x)
        check.compare("encoder_features", features)
        indices = tok.encode(_to_unit(tok, x))
        check.compare("indices", indices)
        z_q, _, aux = tok.quantize(features)
        check.compare("quantized", z_q)
        check.compare("quantizer_loss", aux["loss"])
        ref = expected["indices"]
        check.compare("decoded", _to_native(tok, tok.decode(ref)))
        check.compare("decoded_unclamped", tok.decode_latent(tok.codes_from_indices(ref)))
    check.finish()


def run_var_vqvae(meta, state, inputs, expected):
    from vqtok.interop import var
    from vqtok.tokenizer.quantizers.multiscale import phi_ticks

    kw = meta["constructor"]["kwargs"]
    x = inputs["images"]
    cfg = var.to_config(state, resolution=x.shape[-1], patch_nums=kw["v_patch_nums"], quant_resi=kw["quant_resi"])
    ae, params = cfg.autoencoder, cfg.quantizer.params
    assert (ae.ch, ae.z_channels, ae.quant_conv_kernel, params["codebook_size"], params["share_quant_resi"]) == (
        kw["ch"], kw["z_channels"], kw["quant_conv_ks"], kw["vocab_size"], kw["share_quant_resi"]
    ), "architecture detected from the shapes differs from the fixture's constructor"
    fixed = meta["constructor"].get("fixed_inside_VQVAE", {})
    if fixed:
        assert (ae.ch_mult, ae.num_res_blocks) == (fixed["ch_mult"], fixed["num_res_blocks"])
    params.update(beta=kw["beta"], using_znorm=kw["using_znorm"])
    tok = _tokenizer(var, state, cfg)
    ticks = meta["constructor"].get("phi_selection", {}).get("ticks")
    if ticks is not None:
        assert phi_ticks(len(ticks)).tolist() == pytest.approx(ticks, abs=1e-12)
    q = tok.quantize
    check = Checker(meta, expected)
    with torch.no_grad():
        features = tok.encoder(x)
        check.compare("encoder_features", features)
        f = tok.quant_conv(features)
        check.compare("f", f)
        # the facade's path from images to tokens, then split per scale
        idx = q.split_scales(tok.encode(_to_unit(tok, x)))
        check.compare_scales("idx_Bl", idx, expected["idx_Bl"])
        check.compare_scales("f_hat_per_scale", q.f_hat_per_scale(f), expected["f_hat_per_scale"])
        ref = torch.cat(expected["idx_Bl"], 1)
        check.compare("decoder_input_f_hat", tok.codes_from_indices(ref))
        check.compare("image", _to_native(tok, tok.decode(ref)))
        per_scale = [_to_native(tok, img) for img in tok.decode_progressive(ref)]
        check.compare_scales("images_per_scale", per_scale, expected["images_per_scale"])
        check.compare("var_teacher_forcing_input", q.teacher_forcing_input(expected["idx_Bl"]))
        x01 = _to_unit(tok, x)
        check.compare("img_to_reconstructed_img", _to_native(tok, tok.decode(tok.encode(x01))))
        out = tok(x01)
        check.compare("forward_reconstruction", _to_native(tok, out.recon))
        check.compare("forward_vq_loss", out.aux["loss"])
    check.finish()


def run_llamagen_vq(meta, state, inputs, expected):
    from vqtok.interop import llamagen

    args = meta["constructor"]["model_args"]
    x = inputs["images"]
    cfg = llamagen.to_config(state, resolution=x.shape[-1])
    ae, params = cfg.autoencoder, cfg.quantizer.params
    ch = meta["constructor"].get("encoder_decoder_ch", ae.ch)
    assert (ae.ch, ae.ch_mult, ae.z_channels, params["codebook_size"], params["dim"]) == (
        ch, args["encoder_ch_mult"], args["z_channels"], args["codebook_size"], args["codebook_embed_dim"]
    ), "architecture detected from the shapes differs from the fixture's constructor"
    params.update(l2_norm=args["codebook_l2_norm"], beta=args["commit_loss_beta"], entropy_weight=args["entropy_loss_ratio"])
    tok = _tokenizer(llamagen, state, cfg)
    check = Checker(meta, expected)
    with torch.no_grad():
        features = tok.encoder(x)
        check.compare("encoder_features", features)
        z = tok.quant_conv(features)
        check.compare("pre_quant_z", z)
        check.compare("indices", tok.encode(_to_unit(tok, x)).reshape(-1))  # official layout: flat, batch-major
        quant, _, _ = tok.quantize(z)
        check.compare("quant", quant)
        ref = expected["indices"].reshape(x.shape[0], -1)
        codes = tok.codes_from_indices(ref)
        check.compare("codebook_entry", codes)
        check.compare("decode_code", tok.decode_latent(codes))
        check.compare("decode_of_quant", tok.decode_latent(quant))
        check.compare("forward_dec", _to_native(tok, tok(_to_unit(tok, x)).recon))
        trainer = copy.deepcopy(tok.quantize).train()
        _, _, aux = trainer(z)
        check.compare("train_mode_vq_loss", aux["codebook_loss"])
        check.compare("train_mode_commit_loss", params["beta"] * aux["commitment_loss"])
    check.finish()


TOKENIZER_RUNNERS = {"maskgit_vqgan": run_maskgit_vqgan, "var_vqvae": run_var_vqvae, "llamagen_vq": run_llamagen_vq}


def _check_sums(folder: Path) -> None:
    """Every file `folder/SHA256SUMS` lists is present with that SHA-256 (paths relative to `folder`)."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        if REQUIRED:
            pytest.fail(f"{sums} not found, and VQTOK_REQUIRE_FIXTURES=1 makes that a failure (set VQTOK_FIXTURES)")
        pytest.skip(f"no fixtures at {folder} (set VQTOK_FIXTURES)")
    listed = [line.split(maxsplit=1) for line in sums.read_text().splitlines() if line.strip()]
    assert listed, f"{sums} lists no files"
    bad = []
    for digest, name in listed:
        path = folder / name.strip().lstrip("*")
        if not path.is_file():
            bad.append(f"{name}: missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad.append(f"{name}: SHA-256 differs from SHA256SUMS")
    assert not bad, f"fixture files under {folder}:\n  " + "\n  ".join(bad)


def test_every_listed_fixture_file_is_present_and_intact():
    _check_sums(FIXTURES)
    # every fixture the runners below know must be there (a missing JSON would otherwise just not be collected)
    kinds = {json.loads(p.read_text()).get("fixture") for p in FIXTURE_JSONS}
    assert {"rar", *TOKENIZER_RUNNERS} <= kinds, f"fixture kinds found: {sorted(kinds)}"


@pytest.mark.parametrize("json_path", _params(FIXTURE_JSONS, "fixture JSONs"))
def test_fixture(json_path: Path):
    json_path = _present(json_path, "fixture JSONs")
    kind = json.loads(json_path.read_text()).get("fixture")
    if kind == "rar":
        from conformance_rar import check_rar_fixture  # an ImportError here is a failure, not a skip

        check_rar_fixture(json_path)
        return
    assert kind in TOKENIZER_RUNNERS, f"{json_path.name}: unknown fixture kind {kind!r}"
    TOKENIZER_RUNNERS[kind](*_load_fixture(json_path))


# ------------------------------------------------------------------------------------------- key listings


@pytest.mark.parametrize("json_path", _params(KEY_LISTINGS, "key listings"))
def test_key_listing_maps_exactly(json_path: Path):
    json_path = _present(json_path, "key listings")
    from vqtok.interop import detect
    from vqtok.tokenizer.tokenizer import Tokenizer

    listing = json.loads(json_path.read_text())
    shapes = listing["state_dict"]
    assert len(shapes) == listing["num_state_dict_entries"]
    # meta tensors: shapes without memory, so the full-size models cost nothing
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    module = detect(state)
    if hasattr(module, "save_converted"):  # a generator format (RAR): its own exact-mapping check
        converted = module.convert(state)
        assert {k: list(v.shape) for k, v in converted.items()} == dict(shapes.items())
        return
    cfg, converted = module.convert(state)  # raises on an unused key, a missing key or a wrong shape
    assert {k: list(v.shape) for k, v in converted.items()} == {module.rename(k): list(s) for k, s in shapes.items()}
    with torch.device("meta"):
        model = Tokenizer(cfg)
    assert sum(p.numel() for p in model.parameters()) == listing["num_parameters"]
    table = listing.get("phi_index_used_at_each_scale")
    if table is not None:
        assert model.quantize.phi_table == table, "VAR's scale -> Phi table (exact float64 ties) differs"


# ------------------------------------------------------------------------------ generator fixtures

GENERATORS = FIXTURES / "generators"
GENERATOR_JSONS = sorted(GENERATORS.glob("*.json")) if GENERATORS.is_dir() else []
GENERATOR_LISTINGS = sorted((GENERATORS / "keys").glob("*.json")) if (GENERATORS / "keys").is_dir() else []
# fixture kind -> the conformance harness under tests/ (check(json) and check_keys(listing))
GENERATOR_HARNESSES = {"var_gpt": "conformance_var_gpt", "llamagen_gpt": "conformance_llamagen_gpt"}
# a full-size key listing's family, from its file name
LISTING_HARNESS = {"var_d": "conformance_var_gpt", "llamagen_gpt_": "conformance_llamagen_gpt"}


def _harness(module: str):
    import importlib

    return importlib.import_module(module)  # an ImportError is a failure, not a skip


def test_every_generator_fixture_file_is_present_and_intact():
    _check_sums(GENERATORS)
    kinds = {json.loads(p.read_text()).get("fixture") for p in GENERATOR_JSONS}
    assert set(GENERATOR_HARNESSES) <= kinds, f"generator fixture kinds found: {sorted(kinds)}"


@pytest.mark.parametrize("json_path", _params(GENERATOR_JSONS, "generator fixture JSONs"))
def test_generator_fixture(json_path: Path):
    json_path = _present(json_path, "generator fixture JSONs")
    kind = json.loads(json_path.read_text()).get("fixture")
    assert kind in GENERATOR_HARNESSES, f"{json_path.name}: unknown generator fixture kind {kind!r}"
    report = _harness(GENERATOR_HARNESSES[kind]).check(json_path)
    assert report, f"{json_path.name}: the harness compared nothing"


@pytest.mark.parametrize("json_path", _params(GENERATOR_LISTINGS, "generator key listings"))
def test_generator_key_listing_maps_exactly(json_path: Path):
    json_path = _present(json_path, "generator key listings")
    (module,) = [m for prefix, m in LISTING_HARNESS.items() if json_path.stem.startswith(prefix)] or [None]
    assert module is not None, f"{json_path.name}: no generator family claims this key listing"
    _harness(module).check_keys(json_path)


# ------------------------------------------------------------------------- RAR through `vqtok sample`

# top-k / top-p where the fixture's distributions leave a margin (checked below): the 8th and 9th
# probabilities differ by >= 2.2e-4 in log space and no cumulative mass of the top 8 lies within 6e-4 of
# 0.571, against a float32 log-prob error of ~3e-5, so an exact match of the kept sets is meaningful
CLI_TOP_K, CLI_TOP_P = 8, 0.571


def expected_filtered(probs: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, float, float]:
    """The official per-step distributions after top-k then top-p (kept mass reaching top_p), renormalised;
    written here from the definition, with the decision margins (log gap at k, cumulative distance to p)."""
    vals, idx = probs.double().sort(dim=-1, descending=True)
    k_gap = float((vals[..., top_k - 1].log() - vals[..., top_k].log()).min())
    top = vals[..., :top_k] / vals[..., :top_k].sum(-1, keepdim=True)
    before = top.cumsum(-1) - top
    p_margin = float((before - top_p).abs().min())
    kept = torch.zeros_like(vals)
    kept[..., :top_k] = top * (before < top_p)
    kept = kept / kept.sum(-1, keepdim=True)
    return torch.zeros_like(kept).scatter(-1, idx, kept), k_gap, p_margin


class RecordingForcedDraw:
    """The draw `vqtok sample` uses, replaced by teacher forcing that records each step's distribution."""

    def __init__(self, tokens: torch.Tensor, record: list):
        self.tokens, self.record = tokens, record

    def __call__(self, probs: torch.Tensor, step: int, offset: int) -> torch.Tensor:
        self.record.append((step, probs[:, 0].clone()))
        return self.tokens[:, offset:offset + 1]


RAR_JSONS = [p for p in FIXTURE_JSONS if json.loads(p.read_text()).get("fixture") == "rar"]


@pytest.mark.parametrize("json_path", _params(RAR_JSONS, "RAR fixture JSONs"))
def test_rar_fixture_through_the_sample_command_at_temperature_1_with_top_k_and_top_p(json_path, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import vqtok.app.sample as generate
    from conformance_rar import load_rar_fixture
    from vqtok.cli import app
    from vqtok.interop.rar import save_converted

    meta, state = load_rar_fixture(_present(json_path, "RAR fixture JSONs"))
    save_converted(state, tmp_path / "gen")  # what `vqtok convert` writes
    stems = [Path(f).stem for f in meta["outputs"] if Path(f).stem.startswith("generate")]
    assert stems, "the RAR fixture has no sampling outputs"
    for stem in stems:
        ref = torch.load(json_path.parent / "rar" / f"{stem}.pt", map_location="cpu", weights_only=True)
        forced, classes = ref["forced_tokens"], ref["class_labels"]  # raster = the generation order here
        assert float(ref["randomize_temperature"]) == 1.0
        record: list = []

        def forced_draw(seed, first, count, num_tokens, rows):
            assert rows == count == len(classes)  # one batch, eager decoder
            return RecordingForcedDraw(forced[first:first + count], record)

        monkeypatch.setattr(generate, "batch_draw", forced_draw)
        out = tmp_path / stem
        result = CliRunner().invoke(app, [
            "sample", "--ckpt", str(tmp_path / "gen"), "--classes", ",".join(map(str, classes.tolist())),
            "--cfg", str(float(ref["guidance_scale"])), "--cfg-power", str(float(ref["guidance_scale_pow"])),
            "--temperature", "1", "--top-k", str(CLI_TOP_K), "--top-p", str(CLI_TOP_P),
            "--batch-size", str(len(classes)), "--tokens-only", "--device", "cpu", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert f"top-k {CLI_TOP_K}; top-p {CLI_TOP_P}" in result.output
        assert [s for s, _ in record] == list(range(forced.shape[1]))  # one draw per token, in order
        got = torch.stack([p for _, p in record], dim=1)
        want, k_gap, p_margin = expected_filtered(ref["probs"], CLI_TOP_K, CLI_TOP_P)
        assert k_gap > 1e-4 and p_margin > 2e-4, f"{stem}: the fixture leaves no margin at these settings"
        assert torch.equal(got > 0, want > 0), f"{stem}: the kept token sets differ"
        tol = meta["tolerances"][stem]["suggested"]
        torch.testing.assert_close(got.double(), want, atol=tol["probs"]["atol"], rtol=tol["probs"]["rtol"])
        kept = want > 0
        log_tol = tol["log_probs_derived_not_saved"]
        torch.testing.assert_close(got.double()[kept].log(), want[kept].log(), atol=log_tol["atol"], rtol=log_tol["rtol"])
        tokens = np.load(out / "tokens.npy")
        assert np.array_equal(tokens.reshape(len(classes), -1), forced.numpy())
        assert np.array_equal(np.load(out / "labels.npy"), classes.numpy())
