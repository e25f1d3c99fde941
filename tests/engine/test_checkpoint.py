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


# ------------------------------------------------------------------ write failures (full disk)
# What each writer really raises when the disk fills (measured on a 64 KiB tmpfs):
# safetensors' Rust writer a SafetensorError, torch.save's zip writer a RuntimeError with a
# cryptic position message, Python's own writes (and fsync, rename) an OSError.

def _safetensors_full(*a, **k):
    from safetensors import SafetensorError
    raise SafetensorError("Error while serializing: I/O error: No space left on device "
                          "(os error 28)")


def _torch_save_full_on(call):
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == call:
            with open(f, "wb") as fh:  # half a file, as a filling disk leaves it
                fh.write(b"PK\x03\x04" + b"\0" * 64)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "576 vs 534")
        return real(obj, f, *a, **k)
    return save


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _manifest_full():
    real = checkpoint.Path.write_text

    def write_text(self, text, *a, **k):
        if self.name == "manifest.json":
            real(self, text[:len(text) // 2], *a, **k)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *a, **k)
    return write_text


FAILURES = {
    "safetensors": lambda mp: mp.setattr(checkpoint, "save_file", _safetensors_full),
    "optimizer": lambda mp: mp.setattr(checkpoint.torch, "save", _torch_save_full_on(1)),
    "rng": lambda mp: mp.setattr(checkpoint.torch, "save", _torch_save_full_on(2)),
    "manifest": lambda mp: mp.setattr(checkpoint.Path, "write_text", _manifest_full()),
    "fsync": lambda mp: mp.setattr(checkpoint.os, "fsync", _enospc),
    "rename": lambda mp: mp.setattr(checkpoint.os, "rename", _enospc),
}


@pytest.mark.parametrize("where", sorted(FAILURES))
def test_a_failed_write_anywhere_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    m, opt = _model_opt()
    checkpoint.save(tmp_path, 1, m, opt, {}, keep=3)
    before = {f.name: f.read_bytes() for f in (tmp_path / "step-000001").iterdir()}
    with monkeypatch.context() as mp:
        FAILURES[where](mp)
        with pytest.raises(AlignkitError) as e:
            checkpoint.save(tmp_path, 2, m, opt, {}, keep=3)
    msg = str(e.value)
    assert "\n" not in msg and "could not write checkpoint" in msg and "step-000002" in msg
    assert "step-000001 is intact" in msg and "MiB free there" in msg
    # nothing half-written is left, and the previous checkpoint is byte for byte as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]
    assert {f.name: f.read_bytes() for f in (tmp_path / "step-000001").iterdir()} == before
    assert checkpoint.latest_good(tmp_path).step == 1
    # once there is room again, the same save succeeds
    checkpoint.save(tmp_path, 2, m, opt, {}, keep=3)
    assert checkpoint.latest_good(tmp_path).step == 2


def test_a_real_write_limit_mid_file_keeps_the_previous_checkpoint(tmp_path):
    """Not a mock: the kernel refuses writes past RLIMIT_FSIZE (EFBIG, like ENOSPC a short
    write) while optimizer.pt is being written, after trainable.safetensors went through."""
    resource = pytest.importorskip("resource")
    import signal

    m, opt = _model_opt()
    checkpoint.save(tmp_path, 1, m, opt, {}, keep=3)
    sizes = {f.name: f.stat().st_size for f in (tmp_path / "step-000001").iterdir()}
    limit = sizes["trainable.safetensors"] + 16
    assert sizes["optimizer.pt"] > limit  # so the failure lands in the middle of the set
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        with pytest.raises(AlignkitError) as e:
            checkpoint.save(tmp_path, 2, m, opt, {}, keep=3)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert "step-000001 is intact" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]
    assert checkpoint.latest_good(tmp_path).step == 1


def test_a_full_disk_with_no_earlier_checkpoint_says_so(tmp_path, monkeypatch):
    m, opt = _model_opt()
    monkeypatch.setattr(checkpoint, "save_file", _safetensors_full)
    with pytest.raises(AlignkitError, match="no earlier checkpoint exists"):
        checkpoint.save(tmp_path, 1, m, opt, {}, keep=3)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ integrity on resume

def _two(tmp_path):
    m, opt = _model_opt()
    checkpoint.save(tmp_path, 1, m, opt, {}, keep=3)
    checkpoint.save(tmp_path, 2, m, opt, {}, keep=3)
    return tmp_path / "step-000002"


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


DAMAGE = {
    "optimizer_truncated": lambda p: (p / "optimizer.pt").write_bytes(
        (p / "optimizer.pt").read_bytes()[:100]),
    "rng_deleted": lambda p: (p / "rng.pt").unlink(),
    "state_edited": lambda p: (p / "state.json").write_text('{"step": 7}'),
    "manifest_truncated": lambda p: (p / "manifest.json").write_text(
        (p / "manifest.json").read_text()[:30]),
    "manifest_empty": lambda p: (p / "manifest.json").write_text("{}"),
    "manifest_not_an_object": lambda p: (p / "manifest.json").write_text("[1, 2]"),
    "folder_renamed": lambda p: (p.rename(p.with_name("step-000003")),
                                 p.with_name("step-000003").mkdir(exist_ok=True)),
    "zero_byte_weights": lambda p: (p / "trainable.safetensors").write_bytes(b""),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_more_damage_is_detected_and_skipped(tmp_path, damage):
    newest = _two(tmp_path)
    DAMAGE[damage](newest)
    said = []
    ck = checkpoint.latest_good(tmp_path, log=said.append)
    assert ck.step == 1 and ck.path.name == "step-000001"
    assert len(said) == 1 and "\n" not in said[0] and "falling back" in said[0]


def test_no_usable_checkpoint_starts_over_with_a_message(tmp_path):
    newest = _two(tmp_path)
    (newest / "state.json").write_text("{}")
    (tmp_path / "step-000001" / "manifest.json").unlink()
    said = []
    assert checkpoint.latest_good(tmp_path, log=said.append) is None
    assert "none of the 2 checkpoints" in said[-1] and "starting from the beginning" in said[-1]


def test_half_written_folders_are_ignored_and_cleaned_up(tmp_path):
    m, opt = _model_opt()
    checkpoint.save(tmp_path, 1, m, opt, {}, keep=3)
    # a process killed mid-save leaves its hidden folder, complete-looking or not
    stale = tmp_path / ".tmp-step-000002"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"partial")
    assert checkpoint.latest_good(tmp_path).step == 1
    checkpoint.save(tmp_path, 3, m, opt, {}, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000003"]


def test_saving_a_step_again_replaces_it(tmp_path):
    # after a fallback the run replays and saves the corrupt step's number again
    newest = _two(tmp_path)
    (newest / "rng.pt").write_bytes(b"junk")
    m, opt = _model_opt(seed=4)
    checkpoint.save(tmp_path, 2, m, opt, {"again": True}, keep=3)
    ck = checkpoint.latest_good(tmp_path)
    assert ck.step == 2 and ck.state["again"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002"]


def test_steps_are_ordered_by_number_not_by_name(tmp_path):
    m, opt = _model_opt()
    checkpoint.save(tmp_path, 999_999, m, opt, {}, keep=3)
    checkpoint.save(tmp_path, 1_000_000, m, opt, {}, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-1000000"]
    assert checkpoint.latest_good(tmp_path).step == 1_000_000


def test_a_pickle_that_would_run_code_is_refused_even_with_a_matching_manifest(tmp_path):
    """Someone who can write the run folder can rewrite the manifest too: the checksums catch
    accidents, weights_only=True is what stops code execution."""
    import hashlib
    import pickle

    m, opt = _model_opt()
    path = checkpoint.save(tmp_path, 1, m, opt, {}, keep=1)
    marker = tmp_path / "owned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / "optimizer.pt").write_bytes(pickle.dumps({"state": Evil()}, protocol=2))
    manifest = _manifest(path)
    manifest["files"]["optimizer.pt"] = hashlib.sha256(
        (path / "optimizer.pt").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    ck = checkpoint.latest_good(tmp_path)
    with pytest.raises(AlignkitError, match="cannot be restored"):
        checkpoint.load(ck, *_model_opt())
    assert not marker.exists()


def test_a_checkpoint_of_another_optimizer_setup_is_a_clear_error(tmp_path):
    m, opt = _model_opt()
    path = checkpoint.save(tmp_path, 1, m, opt, {}, keep=1)
    m2, _ = _model_opt()
    two_groups = torch.optim.AdamW([{"params": [m2.weight]}, {"params": [m2.bias]}])
    with pytest.raises(AlignkitError, match="cannot be restored") as e:
        checkpoint.load(checkpoint.latest_good(tmp_path), m2, two_groups)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    m, opt = _model_opt()
    checkpoint.save(tmp_path, 1, m, opt, {}, keep=1)
    other = torch.nn.Linear(3, 5)
    with pytest.raises(AlignkitError, match="does not match the model"):
        checkpoint.load(checkpoint.latest_good(tmp_path), other,
                        torch.optim.AdamW(other.parameters()))


# ------------------------------------------------------------------ through the training loop

def _fit(out, said=None, **kw):
    from alignkit.engine.loop import fit
    from tests.engine.test_loop import CPU32, ToyTask, cfg
    task = ToyTask()
    log = said.append if said is not None else (lambda *_: None)
    result = fit(task, task.model, cfg(**({"max_steps": 10, "save_every": 4} | kw)), CPU32,
                 output=out, log=log)
    return task.model, result


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_run_resumes_from_the_previous_good_checkpoint_and_ends_bit_identical(tmp_path,
                                                                                damage):
    full, _ = _fit(tmp_path / "full", save_every=None)
    _fit(tmp_path / "run")  # leaves step-000004 and step-000008
    f = tmp_path / "run" / "checkpoints" / "step-000008" / "trainable.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:len(raw) // 2] if damage == "truncate"
                  else raw[:-1] + bytes([raw[-1] ^ 1]))
    said = []
    again, result = _fit(tmp_path / "run", said)
    assert result.resumed_from == 4
    unusable = [s for s in said if "unusable" in s]
    assert len(unusable) == 1 and "step-000008" in unusable[0] and "checksum" in unusable[0]
    for a, b in zip(full.parameters(), again.parameters()):
        assert torch.equal(a, b)


def _second_save_fills_the_disk(monkeypatch) -> None:
    """The second checkpoint write of the run meets a full disk."""
    real, calls = checkpoint.save_file, []

    def second_save_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            _safetensors_full()
        return real(*a, **k)

    monkeypatch.setattr(checkpoint, "save_file", second_save_fails)


def test_a_full_disk_mid_run_stops_with_a_clear_error_and_the_rerun_resumes(tmp_path,
                                                                           monkeypatch):
    full, _ = _fit(tmp_path / "full", save_every=None)
    _second_save_fills_the_disk(monkeypatch)
    with pytest.raises(AlignkitError) as e:
        _fit(tmp_path / "run")
    assert "step-000008" in str(e.value) and "step-000004 is intact" in str(e.value)
    monkeypatch.undo()
    again, result = _fit(tmp_path / "run")
    assert result.resumed_from == 4
    for a, b in zip(full.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    from alignkit.cli.main import main
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "response": f"{i}."}) + "\n"
                            for i in range(8)))
    _second_save_fills_the_disk(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(["sft", "--model", "tiny", "--data", str(data), "--output", str(tmp_path / "o"),
              "--max-steps", "5", "--batch-size", "2", "--set", "train.save_every=2",
              "--set", "train.progress=false", "--set", "data.eval_fraction=0"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith("error: could not write checkpoint") and "No space left" in err
    assert "step-000002 is intact" in err
    assert not (tmp_path / "o" / "DONE").exists()
