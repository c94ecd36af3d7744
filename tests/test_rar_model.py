import json

import pytest
import torch
from torch import nn

from vqtok.ar.checkpoint import load_generator, save_generator
from vqtok.ar.conformance import check_rar_fixture, check_rar_keys, load_rar_fixture
from vqtok.ar.presets import PRESETS, get_preset
from vqtok.ar.rar import RAR, RARConfig, ar_loss
from vqtok.errors import UserError
from vqtok.interop import rar as rar_interop


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> RARConfig:
    base = dict(hidden_size=32, depth=2, num_heads=4, intermediate_size=64, vocab_size=37, seq_len=16,
                num_classes=5, dropout=0.0, attn_dropout=0.0, class_dropout=0.0)
    base.update(kw)
    return RARConfig(**base)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero weights everywhere (the zero adaLN init would hide most of the model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1) + (1.0 if p.ndim == 1 and p.shape[0] < 16 else 0.0))
    return model


# ------------------------------------------------------------------------------- official conformance

def test_fixture_logits_loss_and_guided_probs_match_official(fixtures_dir):
    report = check_rar_fixture(fixtures_dir / "rar.json")
    assert report["raster.labels"] == 0 and report["random_order.labels"] == 0
    assert report["raster.logits"] < 1e-4 and report["random_order.logits"] < 1e-4
    assert report["generate_pow2.75.probs"] < 1e-4 and report["generate_pow0.probs"] < 1e-4


def test_fixture_check_fails_when_final_layer_order_is_swapped(fixtures_dir, monkeypatch):
    # the conformance check must be able to fail: DiT's (shift, scale) order in the head is a classic slip
    from vqtok.ar import rar as rar_module

    def dit_order(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return rar_module.modulate(self.norm_final(x), shift, scale)

    monkeypatch.setattr(rar_module.FinalLayer, "forward", dit_order)
    with pytest.raises(AssertionError, match="logits"):
        check_rar_fixture(fixtures_dir / "rar.json")


@pytest.mark.parametrize("size", ["b", "l", "xl", "xxl"])
def test_full_size_key_listings_map_exactly(fixtures_dir, size):
    out = check_rar_keys(fixtures_dir / "keys" / f"rar_{size}.json")
    listing = json.loads((fixtures_dir / "keys" / f"rar_{size}.json").read_text())
    assert out["num_parameters"] == listing["num_parameters"]
    assert out["config"].seq_len == 256 and out["config"].vocab_size == 1024


def test_presets_have_the_official_parameter_counts():
    counts = {"rar-b": 260_923_648, "rar-l": 461_668_352, "rar-xl": 955_425_024, "rar-xxl": 1_498_520_704}
    for name, n in counts.items():
        with torch.device("meta"):
            assert RAR(get_preset(name)).num_parameters() == n
    assert 100_000 < RAR(PRESETS["rar-tiny"]()).num_parameters() < 1_000_000


def test_interop_rejects_incomplete_or_misshapen_weights(fixtures_dir):
    _, sd = load_rar_fixture(fixtures_dir / "rar.json")
    assert rar_interop.matches(sd)
    broken = dict(sd)
    del broken["blocks.1.mlp.fc2.bias"]
    with pytest.raises(UserError, match="missing"):
        rar_interop.convert(broken)
    broken = dict(sd)
    broken["blocks.0.attn.proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(UserError, match="shape"):
        rar_interop.convert(broken)
    with pytest.raises(UserError, match="unexpected"):
        rar_interop.convert({**sd, "extra.weight": torch.zeros(1)})
    assert not rar_interop.matches({"encoder.conv_in.weight": torch.zeros(1)})


def test_converted_checkpoint_round_trips(fixtures_dir, tmp_path):
    meta, sd = load_rar_fixture(fixtures_dir / "rar.json")
    out = rar_interop.save_converted(sd, tmp_path / "gen")
    model, identity = load_generator(out)
    assert identity["tokenizer"]["preset"] == "maskgit-vqgan-f16"
    assert identity["vocab_size"] == 1024 and identity["seq_len"] == 256
    inputs = torch.load(fixtures_dir / meta["inputs"]["file"], weights_only=True)
    ref = torch.load(fixtures_dir / "rar" / "forward_raster.pt", weights_only=True)
    with torch.no_grad():
        logits, _ = model(inputs["tokens"], inputs["class_labels"])
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=1e-5)


def test_generator_checkpoint_errors(tmp_path):
    cfg = tiny()
    save_generator(tmp_path / "g", RAR(cfg), cfg, {"vocab_size": 37, "tokens_per_image": 16})
    (tmp_path / "g" / "config.yaml").write_text("hidden_size: 48\nnum_heads: 4\n")
    with pytest.raises(UserError, match="does not match"):
        load_generator(tmp_path / "g")
    with pytest.raises(UserError):
        load_generator(tmp_path / "nowhere")


def test_generator_checkpoint_records_its_family(tmp_path):
    import json

    cfg = tiny()
    save_generator(tmp_path / "g", RAR(cfg), cfg, None)
    ident_path = tmp_path / "g" / "generator.json"
    identity = json.loads(ident_path.read_text())
    assert identity["family"] == "rar"
    model, _ = load_generator(tmp_path / "g")
    assert isinstance(model, RAR)
    identity["family"] = "maskgit"
    ident_path.write_text(json.dumps(identity))
    with pytest.raises(UserError, match="unknown generator architecture 'maskgit'"):
        load_generator(tmp_path / "g")


# ------------------------------------------------------------------------------- model behaviour

def test_target_aware_shift_each_slot_sees_the_position_it_must_predict():
    cfg = tiny()
    model = RAR(cfg)
    N = cfg.seq_len
    orders = torch.stack([torch.randperm(N), torch.arange(N)])
    tokens = torch.randint(0, cfg.vocab_size, (2, N))
    rows = torch.arange(model.pos_embed.shape[1], dtype=torch.float32)[:, None].expand(-1, cfg.hidden_size)
    with torch.no_grad():
        model.embeddings.weight.zero_()
        model.cls_token.zero_()
        model.pos_embed.zero_()
        model.target_aware_pos_embed.copy_(rows[None])  # row r holds the value r
        x, _ = model.prefix_embeddings(model.condition_ids(torch.tensor([1, 2])), orders)
        x = torch.cat([x, model.token_embeddings(tokens.gather(1, orders), 0, orders)], dim=1)
        target = x[..., 0]
        # slot k >= 1 holds the token to predict at output k-1... i.e. the position of generated token k-1
        assert torch.equal(target[:, 0], torch.zeros(2))
        assert torch.equal(target[:, 1:N + 1], (2 + orders).float())
        assert torch.equal(target[:, N + 1], torch.zeros(2))  # the last token predicts nothing
        # and each token carries its own position in pos_embed
        model.target_aware_pos_embed.zero_()
        model.pos_embed.copy_(rows[None])
        x, _ = model.prefix_embeddings(model.condition_ids(torch.tensor([1, 2])), orders)
        x = torch.cat([x, model.token_embeddings(tokens.gather(1, orders), 0, orders)], dim=1)
        assert torch.equal(x[:, :2, 0], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        assert torch.equal(x[:, 2:, 0], (2 + orders).float())


def test_labels_follow_the_order_and_permuting_changes_the_logits():
    cfg = tiny()
    model = randomize(RAR(cfg)).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    orders = torch.stack([torch.randperm(cfg.seq_len) for _ in range(2)])
    logits, labels = model(tokens, torch.tensor([0, 4]), orders)
    assert logits.shape == (2, cfg.seq_len + 1, cfg.vocab_size)
    assert torch.equal(labels, tokens.gather(1, orders))
    raster_logits, raster_labels = model(tokens, torch.tensor([0, 4]))
    assert torch.equal(raster_labels, tokens)
    assert not torch.allclose(logits, raster_logits)


def test_init_is_adaln_zero_with_zero_cls_token():
    model = RAR(tiny())
    assert torch.count_nonzero(model.cls_token) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
        assert block.norm1.eps == 1e-6 and block.attn.q_norm.eps == 1e-6
        assert block.mlp.act.approximate == "none"  # exact erf GELU
    assert torch.count_nonzero(model.adaln_before_head.adaLN_modulation[1].weight) == 0
    assert not model.adaln_before_head.norm_final.elementwise_affine
    std = model.blocks[0].attn.qkv.weight.std().item()
    assert 0.015 < std < 0.025
    # adaLN-Zero: every block starts as the identity
    x, c = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    torch.testing.assert_close(model.blocks[0](x, c), x)


def test_loss_is_mean_cross_entropy_of_all_but_the_last_slot():
    logits = torch.randn(3, 9, 11)
    labels = torch.randint(0, 11, (3, 8))
    loss, acc = ar_loss(logits, labels)
    manual = -logits[:, :-1].log_softmax(-1).gather(-1, labels[..., None]).mean()
    torch.testing.assert_close(loss, manual)
    assert acc == (logits[:, :-1].argmax(-1) == labels).float().mean()


def test_bad_inputs_are_user_errors():
    model = RAR(tiny())
    with pytest.raises(UserError, match="class id 5"):
        model(torch.zeros(1, 16, dtype=torch.long), torch.tensor([5]))
    with pytest.raises(UserError, match="expects 16"):
        model(torch.zeros(1, 15, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(UserError, match="divisible"):
        tiny(hidden_size=30)
    with pytest.raises(UserError, match="grid"):
        tiny(grid=[3, 4])
    with pytest.raises(UserError, match="scan order"):
        tiny(order="hilbert")
    with pytest.raises(UserError, match="one order per sample"):
        model(torch.zeros(2, 16, dtype=torch.long), torch.tensor([0, 1]), torch.arange(16)[None])


def test_class_dropout_uses_the_null_row_in_training_only():
    cfg = tiny(class_dropout=0.5)
    model = RAR(cfg)
    classes = torch.zeros(2000, dtype=torch.long)
    ids = model.condition_ids(classes, cfg.class_dropout)
    frac = (ids == cfg.null_class_id).float().mean().item()
    assert 0.45 < frac < 0.55
    assert set(ids.tolist()) == {cfg.class_offset, cfg.null_class_id}
    assert cfg.null_class_id == cfg.vocab_size + 1 + cfg.num_classes == cfg.embedding_rows - 1


def test_grad_checkpointing_gives_the_same_gradients():
    cfg = tiny()
    plain = randomize(RAR(cfg)).train()
    ckpt = RAR(tiny(grad_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    classes = torch.tensor([1, 3])
    orders = torch.stack([torch.randperm(cfg.seq_len) for _ in range(2)])
    for m in (plain, ckpt):
        loss, _ = ar_loss(*m(tokens, classes, orders))
        loss.backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert plain.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_overfitting_four_sequences_drives_the_loss_near_zero():
    torch.manual_seed(0)
    cfg = tiny(hidden_size=64, intermediate_size=128)
    model = RAR(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len))
    classes = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(150):
        loss, acc = ar_loss(*model(tokens, classes))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 and acc.item() == 1.0


def test_any_vocabulary_and_rectangular_grid():
    cfg = tiny(vocab_size=11, seq_len=12, grid=[3, 4], order="spiral-in", num_classes=3)
    model = randomize(RAR(cfg))
    logits, labels = model(torch.randint(0, 11, (2, 12)), torch.tensor([0, 2]))
    assert logits.shape == (2, 13, 11)
    assert model.embeddings.weight.shape[0] == 11 + 1 + 3 + 1
    assert model.pos_embed.shape[1] == 12 + 1024 and model.timesteps_embeddings.shape[1] == 12 + 100
