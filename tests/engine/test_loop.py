"""The engine's invariants on a toy task: schedule, accumulation, normalisation, NaN guard, resume."""

import math
from pathlib import Path

import pytest
import torch

from alignkit.config.schema import TrainConfig
from alignkit.engine.device import Runtime
from alignkit.engine.loop import Batch, fit, lr_factor
from alignkit.errors import AlignkitError, TrainingError

CPU32 = Runtime(torch.device("cpu"), None)


class ToyTask:
    """Linear regression with examples of different 'lengths' (unit counts), so the global-count
    normalisation is visible: the loss is Σ over units / Σ units, not a mean of batch means."""

    def __init__(self, n=32, d=4, seed=0, bad_at=None):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, d, generator=g)
        self.y = torch.randn(n, 6, generator=g)
        self.units = torch.randint(1, 7, (n,), generator=g)  # example i counts units[i] targets
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(d, 1)
        self.bad_at = bad_at

    def num_examples(self, split):
        return len(self.x) if split == "train" else 0

    def collate(self, indices, split):
        idx = torch.tensor(indices)
        mask = torch.arange(6)[None, :] < self.units[idx][:, None]
        x = self.x[idx].clone()
        if self.bad_at is not None and self.bad_at in indices:
            x[:] = float("nan")
        return Batch({"x": x, "y": self.y[idx], "mask": mask}, count=int(mask.sum()),
                     tokens=int(mask.sum()), ids=list(indices))

    def module(self):
        model = self.model

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, x, y, mask):
                err = (self.m(x).squeeze(-1) - y) ** 2
                return (err * mask).sum(), {"units": mask.sum().float()}

        return M()


def cfg(**kw):
    base = dict(batch_size=8, lr=0.05, max_steps=6, progress=False, warmup_steps=0,
                schedule="constant", max_grad_norm=None, seed=3)
    return TrainConfig(**(base | kw))


def test_lr_schedule_closed_form():
    # warmup 4 of 10: steps 0..3 → 1/4, 2/4, 3/4, 1; cosine from step 4: progress (s-4)/6
    assert [lr_factor(s, 10, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert lr_factor(7, 10, 4, "linear") == pytest.approx(1 - 3 / 6)
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_grad_accumulation_1x8_equals_8x1(tmp_path):
    a, b = ToyTask(), ToyTask()
    ra = fit(a, a.model, cfg(grad_accum=1), CPU32, output=tmp_path / "a", log=lambda *_: None)
    rb = fit(b, b.model, cfg(grad_accum=8), CPU32, output=tmp_path / "b", log=lambda *_: None)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert ra.last["loss"] == pytest.approx(rb.last["loss"], rel=1e-6)


def test_loss_is_normalised_by_global_unit_count(tmp_path):
    t = ToyTask()
    order_idx = []
    orig = t.collate
    t.collate = lambda idx, split: (order_idx.append(list(idx)), orig(idx, split))[1]
    before = [p.detach().clone() for p in t.model.parameters()]
    r = fit(t, t.model, cfg(max_steps=1, grad_accum=4, lr=1e-9), CPU32, output=tmp_path,
            log=lambda *_: None)
    ids = sum(order_idx, [])
    with torch.no_grad():
        t.model.weight.copy_(before[0]), t.model.bias.copy_(before[1])
        full = orig(ids, "train")
        total, _ = t.module()(**full.inputs)
    assert r.last["loss"] == pytest.approx((total / full.count).item(), rel=1e-5)


def test_nan_stops_with_step_examples_and_checkpoint(tmp_path):
    t = ToyTask(bad_at=5)
    with pytest.raises(TrainingError) as e:
        fit(t, t.model, cfg(max_steps=8, save_every=1), CPU32, output=tmp_path,
            log=lambda *_: None)
    msg = str(e.value)
    assert "non-finite loss at step" in msg and "5" in msg and "was not applied" in msg
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_too_few_examples_is_a_clear_error(tmp_path):
    t = ToyTask(n=4)
    with pytest.raises(AlignkitError, match="fewer than one global batch"):
        fit(t, t.model, cfg(), CPU32, output=tmp_path, log=lambda *_: None)


def test_resume_in_process_equals_uninterrupted(tmp_path):
    full = ToyTask()
    fit(full, full.model, cfg(max_steps=10), CPU32, output=tmp_path / "full", log=lambda *_: None)
    part = ToyTask()
    fit(part, part.model, cfg(max_steps=10, save_every=4), CPU32, output=tmp_path / "p",
        log=lambda *_: None)
    # a fresh process would rebuild the model from scratch and find step-000008
    again = ToyTask()
    r = fit(again, again.model, cfg(max_steps=10, save_every=4), CPU32, output=tmp_path / "p",
            log=lambda *_: None)
    assert r.resumed_from == 8
    for pa, pb in zip(full.model.parameters(), again.model.parameters()):
        assert torch.equal(pa, pb)


def test_eval_on_start_logs_a_step_zero_baseline(tmp_path):
    from alignkit.engine.metrics import read_metrics

    class WithEval(ToyTask):
        def num_examples(self, split):
            return len(self.x) if split == "train" else 8

    t = WithEval()
    fit(t, t.model, cfg(max_steps=2, eval_on_start=True), CPU32, output=tmp_path,
        log=lambda *_: None)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 2] and evals[1]["eval/loss"] < evals[0]["eval/loss"]


def test_lr_groups_train_at_their_own_peak_under_the_same_schedule(tmp_path):
    # Adam's first step moves every weight by its lr (|m̂ / √v̂| = 1), so each group's step size
    # is visible in the weights: the weight at 0.05, the bias at its own 0.5.
    task = ToyTask()
    w0, b0 = task.model.weight.detach().clone(), task.model.bias.detach().clone()
    fit(task, task.model, cfg(max_steps=1), CPU32, output=tmp_path / "a", log=lambda *_: None,
        lr_groups=[([task.model.bias], 0.5)])
    assert torch.allclose((task.model.weight - w0).abs(), torch.full_like(w0, 0.05), atol=1e-5)
    assert torch.allclose((task.model.bias - b0).abs(), torch.tensor([0.5]), atol=1e-5)
    # The schedule scales both peaks alike and a resumed run keeps the group's peak.
    from alignkit.engine.loop import build_optimizer
    opt = build_optimizer(task.model, cfg(lr=0.05), torch.device("cpu"),
                          [([task.model.bias], 0.5)])
    assert [(g["base_lr"], len(g["params"])) for g in opt.param_groups] == [(0.05, 1), (0.5, 1)]
    full, part = ToyTask(), ToyTask()
    c = dict(max_steps=6, schedule="cosine", warmup_steps=2)
    fit(full, full.model, cfg(**c), CPU32, output=tmp_path / "f", log=lambda *_: None,
        lr_groups=[([full.model.bias], 0.5)])
    fit(part, part.model, cfg(**c, save_every=3), CPU32, output=tmp_path / "p",
        log=lambda *_: None, lr_groups=[([part.model.bias], 0.5)])
    again = ToyTask()
    r = fit(again, again.model, cfg(**c, save_every=3), CPU32, output=tmp_path / "p",
            log=lambda *_: None, lr_groups=[([again.model.bias], 0.5)])
    assert r.resumed_from == 3
    assert torch.equal(full.model.bias, again.model.bias)


# ------------------------------------------------------------------ length-grouped batches


def test_length_grouped_order_sees_every_example_once_an_epoch_and_cuts_padding():
    from alignkit.engine.loop import _Order
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 500, (1003,), generator=rng).tolist()
    g = 8
    plain, grouped = _Order(1003, g, seed=1), _Order(1003, g, seed=1, lengths=lengths)
    steps = grouped.steps_per_epoch
    for epoch in range(2):
        batches = [grouped.indices(epoch * steps + s, 0, g) for s in range(steps)]
        seen = [i for b in batches for i in b]
        assert len(seen) == len(set(seen)) == steps * g  # full batches only, no repeats
        assert all(len(b) == g for b in batches)
        def padding(bs):  # pad tokens: rows padded to their batch's longest
            return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                       for b in bs)

        plain_batches = [plain.indices(epoch * steps + s, 0, g) for s in range(steps)]
        # far less padding: sorted chunks of 50 batches leave a few tokens per row
        assert padding(batches) < 0.15 * padding(plain_batches)
        # ranks split each global batch: rank r's slice of step s
        assert grouped.indices(epoch * steps + 5, 1, 4) == batches[5][4:8]
    # batches are not in length order across the epoch (shuffled after sorting)
    first = [max(lengths[i] for i in grouped.indices(s, 0, g)) for s in range(steps)]
    assert first != sorted(first, reverse=True)
    # a function of (seed, epoch): a fresh order (a resumed run) gives the same batches
    again = _Order(1003, g, seed=1, lengths=lengths)
    assert again.indices(steps + 7, 0, g) == grouped.indices(steps + 7, 0, g)


def test_group_by_length_trains_and_resumes_like_any_run(tmp_path):
    class Lengths(ToyTask):
        def lengths(self, split):
            return self.units.tolist()

    full = Lengths()
    fit(full, full.model, cfg(max_steps=10, group_by_length=True), CPU32,
        output=tmp_path / "full", log=lambda *_: None)
    part = Lengths()
    fit(part, part.model, cfg(max_steps=10, save_every=4, group_by_length=True), CPU32,
        output=tmp_path / "p", log=lambda *_: None)
    again = Lengths()
    r = fit(again, again.model, cfg(max_steps=10, save_every=4, group_by_length=True), CPU32,
            output=tmp_path / "p", log=lambda *_: None)
    assert r.resumed_from == 8
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(),
                                                 again.model.parameters()))
    t = ToyTask()  # no lengths(): a clear error, not a silent plain order
    with pytest.raises(AlignkitError, match="group_by_length is not supported"):
        fit(t, t.model, cfg(group_by_length=True), CPU32, output=tmp_path / "x",
            log=lambda *_: None)


def test_compile_without_a_cxx_compiler_is_a_one_line_error(monkeypatch):
    import alignkit.engine.loop as loop
    from alignkit.models.tiny import tiny_model
    monkeypatch.setattr(loop, "cxx_compiler", lambda: None)
    with pytest.raises(AlignkitError, match="needs a C\\+\\+ compiler"):
        loop.compile_layers(tiny_model(seed=0), log=lambda *_: None)
    monkeypatch.undo()
    if loop.cxx_compiler() is None:
        return
    model = tiny_model(seed=0)
    layers = loop.compile_layers(model, log=lambda *_: None)  # in place, nothing run yet
    assert len(layers) == model.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    loop.uncompile(layers)
    assert all(layer._compiled_call_impl is None for layer in layers)
