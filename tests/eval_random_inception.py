"""Test-only helper: an Inception state dict with RANDOM weights and torch-fidelity's exact key layout.

It exercises the FID/IS pipeline (loading, batching, statistics), never the meaning of the numbers.
The library itself has no random-weights mode.
"""

import math
from unittest import mock

import torch


def random_inception_state_dict() -> dict:
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    # Build the architecture without any weights file: skip the constructor's load step.
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), mock.patch.object(
        fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None
    ):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # He-normal convs (BN running stats stay 0/1): activations keep an O(1) scale through the 90-odd
    # layers, so features differ visibly between images instead of shrinking to 1e-8.
    gen = torch.Generator().manual_seed(0)
    for key, value in state.items():
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=gen) * math.sqrt(2.0 / fan_in)
        elif key == "fc.weight":
            state[key] = torch.randn(value.shape, generator=gen) / math.sqrt(value.shape[1])
    return state


# Inception's smallest workable input is 75 px; the real pipeline resizes to 299. Pipeline tests that
# only check plumbing (batching, caching, statistics) run at this size to cost ~10x less CPU.
TEST_INPUT_SIZE = 96


def use_small_inception_input(monkeypatch) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", TEST_INPUT_SIZE)
