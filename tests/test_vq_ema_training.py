"""An EMA codebook (`ema: true`) inside a real training run: the codebook is not trained by the optimizer,
restarted codes restart their running sums too, and final/ exports the live codebook."""

import pytest
import torch

from vqtok.train.tokenizer_task import train_tokenizer
from vqtok.weights import load_state_dict_file

from test_train_tokenizer import FAST

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ema_codebook_restarts_and_export_in_a_real_run(photos, tmp_path):
    # every code is dead at every step (threshold 1e9): at the last step all rows were just re-seeded
    threshold = 1e9
    over = FAST + ["train.steps=3", "train.ckpt_every=3", "train.ema_decay=0.999", "loss.disc_start=100",
                   "model.quantizer.params.ema=true",
                   "model.quantizer.params.kmeans_init=false", f"model.quantizer.params.dead_code_threshold={threshold}"]
    result = train_tokenizer(photos, "tiny-vqgan", tmp_path / "run", over)
    state = torch.load(result.last_checkpoint / "state.pt", weights_only=True)
    gen = state["modules"]["generator"]
    live, sums, sizes = gen["quantize.embedding.weight"], gen["quantize.ema_embed_sum"], gen["quantize.ema_cluster_size"]
    # restarted: size = threshold and sum = new code x threshold, so the code the sums give is the live one
    torch.testing.assert_close(sizes, torch.full_like(sizes, threshold))
    torch.testing.assert_close(sums / sizes[:, None], live)
    # the restarted rows are encoder vectors (unit norm under l2_norm), not the uniform init
    torch.testing.assert_close(live.norm(dim=1), torch.ones(live.shape[0]), atol=1e-4, rtol=0)
    # the weight EMA follows the EMA codebook (not averaged with stale rows) and final/ exports it
    torch.testing.assert_close(state["ema"]["generator"]["quantize.embedding.weight"], live)
    final = load_state_dict_file(result.final_dir / "model.safetensors")
    torch.testing.assert_close(final["quantize.embedding.weight"], live)
    # the optimizer holds moments for every weight except the codebook (and the guards' buffers)
    not_optimized = {"quantize.embedding.weight", "quantize.ema_embed_sum", "quantize.ema_cluster_size",
                     "quantize.codebook_updates"}
    assert not_optimized <= set(gen)
    assert len(state["optimizers"]["generator"]["state"]) == len(gen) - len(not_optimized)
