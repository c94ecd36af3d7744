import lpips as lpips_pkg
import pytest
import torch
import torchvision
from torch import nn

from vqtok.errors import UserError
from vqtok.losses import lpips as vl


@pytest.fixture(scope="module")
def random_lpips():
    return vl.LPIPS(vl.RANDOM_FOR_TESTS)


@pytest.fixture
def hub_with_vgg16(tmp_path, monkeypatch):
    """A torch hub dir holding a (random) VGG16 features state dict under the official file name."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(1)
    features = torchvision.models.vgg16(weights=None).features  # only the trunk: the classifier is 120M params
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    path = vl.hub_vgg16_path()
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path, state


def test_loads_trunk_from_hub_cache_and_heads_from_wheel(hub_with_vgg16):
    path, state = hub_with_vgg16
    assert path == vl.hub_vgg16_path()
    m = vl.LPIPS()
    trunk = m.net.net
    assert torch.equal(getattr(trunk.slice1, '0').weight, state["features.0.weight"])
    assert torch.equal(getattr(trunk.slice3, '12').bias, state["features.12.bias"])
    assert torch.equal(getattr(trunk.slice5, '28').weight, state["features.28.weight"])
    heads = torch.load(vl.lpips_head_file(), map_location="cpu", weights_only=True)
    assert torch.equal(m.net.lin0.model[1].weight, heads["lin0.model.1.weight"])
    assert not m.random_trunk
    assert all(not p.requires_grad for p in m.parameters())


def test_explicit_path_and_missing_file_error(hub_with_vgg16, tmp_path, monkeypatch):
    path, _ = hub_with_vgg16
    moved = tmp_path / "elsewhere.pth"
    path.rename(moved)
    with pytest.raises(UserError, match="vgg16-397923af.pth") as err:
        vl.LPIPS()
    assert str(vl.hub_vgg16_path()) in str(err.value)
    assert not vl.LPIPS(moved).random_trunk


def test_random_trunk_only_when_asked(tmp_path, monkeypatch, random_lpips):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(UserError):
        vl.LPIPS(None)  # no file: an error, never a silent random trunk
    assert random_lpips.random_trunk


def test_head_check_catches_the_use_dropout_false_trap():
    m = vl.LPIPS.__new__(vl.LPIPS)
    nn.Module.__init__(m)
    # use_dropout=False renames the head keys, so strict=False loading silently leaves them random
    m.net = lpips_pkg.LPIPS(net="vgg", pnet_rand=True, use_dropout=False, verbose=False)
    with pytest.raises(RuntimeError, match="did not load"):
        m._check_heads_loaded()


def test_stays_in_eval_mode_frozen_and_deterministic(random_lpips):
    m = random_lpips
    parent = nn.Sequential(m)
    parent.train()
    assert not m.training and not any(mod.training for mod in m.modules())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_()
    d1, d2 = m(x, y), m(x, y)
    assert d1.shape == (2,) and torch.equal(d1, d2)  # dropout off
    assert m(x, x).abs().max() < 1e-6
    d1.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_key_mapping_covers_all_conv_layers():
    state = {f"features.{i}.weight": torch.zeros(1) for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}
    state["classifier.0.weight"] = torch.zeros(1)
    mapped = vl.vgg16_features_to_lpips(state)
    assert "slice1.2.weight" in mapped and "slice2.5.weight" in mapped and "slice5.28.weight" in mapped
    assert len(mapped) == 13
