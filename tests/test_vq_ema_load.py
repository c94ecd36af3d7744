"""An EMA codebook loaded without its running sums (official weights, or a run whose codebook was learned by
gradient) must keep the loaded codes: its sums are derived from them, not left at their init."""

import torch

from vqtok.tokenizer.quantizers.vq import VectorQuantizer


def _ema_vq() -> VectorQuantizer:
    return VectorQuantizer(codebook_size=2, dim=2, ema=True, ema_decay=0.5, ema_eps=0.0).train()


def test_codebook_without_sums_gets_sums_that_reproduce_it():
    trained = torch.tensor([[3.0, -1.0], [-2.0, 4.0]])
    vq = _ema_vq()
    vq.ema_cluster_size.fill_(2.0)
    result = vq.load_state_dict({"embedding.weight": trained}, strict=False)
    assert result.missing_keys == ["ema_embed_sum", "ema_cluster_size"]
    torch.testing.assert_close(vq.embedding.weight, trained)
    torch.testing.assert_close(vq.ema_embed_sum, trained * 2.0)
    # one EMA step on vectors that sit exactly on the codes leaves the codebook where it was
    z = trained.t().reshape(1, 2, 1, 2)
    vq(z)
    vq.update_codebook()
    torch.testing.assert_close(vq.embedding.weight, trained)


def test_without_the_derived_sums_the_first_step_would_move_the_codes():
    # the same step with the sums left at their init (what loading used to do) drags the codes away,
    # which is what the derived sums prevent
    trained = torch.tensor([[3.0, -1.0], [-2.0, 4.0]])
    vq = _ema_vq()
    vq.embedding.weight.data.copy_(trained)  # a plain copy does not touch the sums
    vq(trained.t().reshape(1, 2, 1, 2))
    vq.update_codebook()
    assert (vq.embedding.weight - trained).abs().max() > 0.5


def test_sums_in_the_state_dict_are_loaded_as_they_are():
    vq = _ema_vq()
    state = {"embedding.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
             "ema_embed_sum": torch.tensor([[5.0, 5.0], [6.0, 6.0]]), "ema_cluster_size": torch.tensor([3.0, 4.0])}
    vq.load_state_dict(state)
    torch.testing.assert_close(vq.ema_embed_sum, state["ema_embed_sum"])
    torch.testing.assert_close(vq.ema_cluster_size, state["ema_cluster_size"])


def test_nested_prefix_and_gradient_codebooks_are_untouched():
    # inside a bigger module the keys carry a prefix; a gradient-learned codebook has no sums at all
    outer = torch.nn.Module()
    outer.quantize = _ema_vq()
    trained = torch.tensor([[0.5, 0.5], [-1.0, 2.0]])
    outer.load_state_dict({"quantize.embedding.weight": trained}, strict=False)
    torch.testing.assert_close(outer.quantize.ema_embed_sum, trained * outer.quantize.ema_cluster_size[:, None])
    plain = VectorQuantizer(codebook_size=2, dim=2)
    plain.load_state_dict({"embedding.weight": trained})
    assert "ema_embed_sum" not in plain.state_dict()
