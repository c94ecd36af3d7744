import argparse

import pytest
import torch

from vqtok.errors import UserError
from vqtok.weights import atomic_dir, load_state_dict_file, read_model_dir, save_model_dir


def test_safe_loading_refuses_pickle(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(UserError, match="--trust-pickle"):
        load_state_dict_file(path, trust_pickle=False)
    sd = load_state_dict_file(path, trust_pickle=True)
    assert torch.equal(sd["w"], torch.ones(2))


def test_nested_and_plain(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "plain.bin")
    torch.save({"model": {"a": torch.zeros(1)}, "steps": 5}, tmp_path / "nested.pt")
    assert list(load_state_dict_file(tmp_path / "plain.bin")) == ["a"]
    assert list(load_state_dict_file(tmp_path / "nested.pt")) == ["a"]


@pytest.mark.parametrize("content", [b"", b"not a torch file at all"])
def test_bad_files(tmp_path, content):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(UserError):
        load_state_dict_file(path)
    with pytest.raises(UserError, match="does not exist"):
        load_state_dict_file(tmp_path / "nope.pt")


def test_atomic_dir_keeps_old_on_failure(tmp_path):
    dest = tmp_path / "ckpt"
    save_model_dir(dest, {"w": torch.ones(3)}, "a: 1\n", "tokenizer.json", {"vocab_size": 4})
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("crash")
    sd, cfg, ident = read_model_dir(dest, "tokenizer.json")
    assert torch.equal(sd["w"], torch.ones(3)) and cfg == "a: 1\n" and ident["vocab_size"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_tokenizer_checkpoint_with_the_earlier_hash_form_still_loads_and_matches(tmp_path):
    """Tokenizer checkpoints written before the one weights hash recorded a bytes-only sha256; they load, and
    token shards or generators that recorded that hash still match the loaded tokenizer."""
    import json

    from vqtok.tokenizer.tokenizer import build_tokenizer, load_tokenizer
    from vqtok.weights import same_weights, tensor_bytes_sha256

    tok = build_tokenizer("tiny-fsq")
    tok.save(tmp_path / "tok")
    ident_path = tmp_path / "tok" / "tokenizer.json"
    identity = json.loads(ident_path.read_text())
    old = tensor_bytes_sha256(tok.state_dict())
    assert old != identity["hash"]
    identity["hash"] = old
    ident_path.write_text(json.dumps(identity))
    loaded = load_tokenizer(tmp_path / "tok")
    now = loaded.identity()
    assert now["legacy_hash"] == old and same_weights(old, now) and same_weights(now["hash"], now)
    assert not same_weights("0" * 64, now)
    identity["hash"] = "0" * 64  # a damaged file still fails
    ident_path.write_text(json.dumps(identity))
    with pytest.raises(UserError, match="modified after saving"):
        load_tokenizer(tmp_path / "tok")
