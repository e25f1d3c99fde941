import errno
import json

import pytest
import torch

from alignkit.engine import checkpoint
from alignkit.errors import AlignkitError


def _model_opt(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    return m, opt


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    m, opt = _model_opt()
    torch.manual_seed(123)
    checkpoint.save(tmp_path, 5, m, opt, {"note": 1}, keep=2)
    expected_draw = torch.rand(3)
    m2, opt2 = _model_opt(seed=9)
    ck = checkpoint.latest_good(tmp_path)
    assert ck.step == 5 and ck.state["note"] == 1
    checkpoint.load(ck, m2, opt2)
    assert torch.equal(m.weight, m2.weight) and torch.equal(m.bias, m2.bias)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"])
    assert torch.equal(torch.rand(3), expected_draw)


def test_keeps_only_newest(tmp_path):
    m, opt = _model_opt()
    for s in (1, 2, 3, 4):
        checkpoint.save(tmp_path, s, m, opt, {}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest"])
def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, damage):
    m, opt = _model_opt()
    checkpoint.save(tmp_path, 1, m, opt, {}, keep=3)
    checkpoint.save(tmp_path, 2, m, opt, {}, keep=3)
    newest = tmp_path / "step-000002"
    f = newest / "trainable.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:20])
    elif damage == "flip":
        b = bytearray(f.read_bytes())
        b[-1] ^= 0xFF
        f.write_bytes(bytes(b))
    else:
        (newest / "manifest.json").unlink()
    said = []
    ck = checkpoint.latest_good(tmp_path, log=said.append)
    assert ck.step == 1
    assert said and "unusable" in said[0]


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    m, opt = _model_opt()
    checkpoint.save(tmp_path, 1, m, opt, {}, keep=3)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", no_space)
    with pytest.raises(AlignkitError) as e:
        checkpoint.save(tmp_path, 2, m, opt, {}, keep=3)
    assert "No space left on device" in str(e.value) and "step-000001 is intact" in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]
    assert checkpoint.verify(tmp_path / "step-000001") is None


def test_optimizer_state_loads_with_weights_only(tmp_path):
    m, opt = _model_opt()
    checkpoint.save(tmp_path, 1, m, opt, {}, keep=1)
    torch.load(tmp_path / "step-000001" / "optimizer.pt", weights_only=True)
    manifest = json.loads((tmp_path / "step-000001" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"trainable.safetensors", "optimizer.pt", "rng.pt", "state.json"}
