"""Crash safety (issue 8, part 1): SFT, reward, DPO and PPO runs of the CLI are SIGKILLed at
three moments — mid-step, mid-checkpoint-write and mid-eval (PPO has no eval split: mid-rollout
instead) — each rerun of the same command resumes, and the last one ends with weights and
metrics bit-identical to an uninterrupted run of that command.

How the kills happen. Each run is a real process that dies by a real SIGKILL, sent to itself
at a hook point (monkeypatched in that process only: no hook in the library). The moment is drawn
with a fixed seed among the points where a kill leaves different things on disk:

- mid-step: after backward, before the optimizer update; or right after the step's metrics
  line was appended (before eval and save),
- mid-checkpoint: after a part-written weights file, after the weights file, at the k-th
  checksum of the manifest, before the temp folder's rename, or after it (before pruning),
- mid-eval: before the b-th eval micro-batch of the eval at step e (the final eval included),
- mid-rollout (PPO): after generation and scoring, after the rollout's log lines (buffer not
  yet saved), or after the buffer was saved (before pruning).

The three kills are chained on one run folder (kill, rerun, kill, rerun, kill, rerun to the
end), so a resume from a resumed run is covered too, and each rerun must name the checkpoint
the kill left as the newest good one. A second test SIGKILLs the runs from outside at times
drawn (fixed seed) over the uninterrupted run's duration, whatever they are doing then.

Speed: importing torch + transformers costs ~4 s a process. The runs are forked from one
"zygote" process that imported everything once (``serve``); each fork runs
``alignkit.cli.main.main(argv)`` as a separate process would. tests/stages/test_sft.py keeps a
plain ``python -m alignkit.cli.main`` SIGKILL test beside this one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import PYTHON, ROOT, cli_env

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the runs are forked (POSIX)")

STEPS, SAVE_EVERY, EVAL_EVERY = 12, 3, 4
CHECKPOINTS = [s for s in range(SAVE_EVERY, STEPS, SAVE_EVERY)]  # 3, 6, 9 (none at the end)
PPO_UPDATES_PER_ROLLOUT = 2  # rollout.prompts 4 × 1 sample / batch 4 × ppo_epochs 2


def letter_a(prompts: list[str], responses: list[str]) -> list[float]:
    """PPO's reward: the share of ASCII lowercase letters (signal on a random byte model)."""
    return [sum("a" <= c <= "z" for c in r) / (len(r) + 1) for r in responses]


# ---------------------------------------------------------------------------------------------
# The zygote (runs in its own process) and the kill hooks (in each forked run)


def serve() -> None:
    """Read one JSON request a line on stdin ({"argv", "plan", "log", "kill_after"}), fork,
    run the CLI in the child with the plan's kill hook (or SIGKILL it from here ``kill_after``
    seconds in), answer {"rc": exit code or -signal} on stdout."""
    import importlib
    for name in ("cli.main", "cli.reward", "cli.dpo", "cli.ppo", "models.load", "models.heads",
                 "models.reference", "stages.sft", "stages.reward", "stages.dpo", "stages.ppo"):
        importlib.import_module(f"alignkit.{name}")  # what every run would import again
    from alignkit.models.tiny import tiny_model, tiny_tokenizer
    tiny_model(), tiny_tokenizer()  # resolves transformers' lazy imports once
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req)  # never returns
        rc = _wait(pid, timeout=240, kill_after=req.get("kill_after"))
        sys.stdout.write(json.dumps({"rc": rc}) + "\n")
        sys.stdout.flush()


def _wait(pid: int, timeout: float, kill_after: float | None = None) -> int:
    t0 = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if kill_after is not None and time.monotonic() - t0 > kill_after:
            os.kill(pid, signal.SIGKILL)
            kill_after = None  # the next waitpid reaps it
        if time.monotonic() - t0 > timeout:  # a hung run must not hang the suite
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return 999
        time.sleep(0.002)


def _child(req: dict) -> None:
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    # Line-buffered: what was printed before the SIGKILL must be in the log.
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    code = 1
    try:
        if req["plan"]:
            _install(req["plan"])
        from alignkit.cli.main import main
        main(req["argv"])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _die(where: str) -> None:
    print(f"KILLED {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _install(plan: dict) -> None:
    """Patch the hook points this plan kills at (this process only)."""
    import alignkit.engine.loop as loop
    from alignkit.engine import checkpoint, metrics
    kind, point = plan["kind"], plan.get("point")
    seen = {"step": 0}  # the last optimizer step started (1-based)
    real_guard = loop._guard

    def guard(loss, grad_norm, step, *a, **k):
        seen["step"] = step
        if (kind, point) == ("step", "before-update") and step == plan["step"]:
            _die(f"step {step} before its update")
        return real_guard(loss, grad_norm, step, *a, **k)

    loop._guard = guard
    if (kind, point) == ("step", "after-log"):
        real_write = metrics.MetricsLog.write

        def write(self, record):
            real_write(self, record)
            if record.get("step") == plan["step"] and "loss" in record:
                _die(f"step {plan['step']} after its metrics line")

        metrics.MetricsLog.write = write
    elif kind == "checkpoint":
        real_save = checkpoint.save

        def save(root, step, *a, **k):
            if step == plan["step"]:
                _arm_checkpoint(checkpoint, point, step)
            return real_save(root, step, *a, **k)

        checkpoint.save = save
    elif kind == "eval":
        real_eval = loop.evaluate

        def evaluate(task, net, cfg, rt):
            if seen["step"] == plan["step"]:
                real_collate, n = task.collate, [0]

                def collate(indices, split):
                    n[0] += 1
                    if n[0] == plan["batch"]:
                        _die(f"eval at step {plan['step']} before batch {n[0]}")
                    return real_collate(indices, split)

                task.collate = collate
            return real_eval(task, net, cfg, rt)

        loop.evaluate = evaluate
    elif kind == "rollout":
        _arm_rollout(plan["rollout"], point)


def _arm_checkpoint(checkpoint, point: str, step: int) -> None:
    where = f"checkpoint {step}: {point}"
    if point in ("weights", "weights-partial"):
        real = checkpoint.save_file

        def save_file(tensors, filename, *a, **k):
            real(tensors, filename, *a, **k)
            if point == "weights-partial":  # as if the kill came mid-write
                os.truncate(filename, os.path.getsize(filename) // 2)
            _die(where)

        checkpoint.save_file = save_file
    elif point.startswith("checksum-"):
        real, nth, n = checkpoint.sha256_file, int(point.split("-")[1]), [0]

        def sha(path):
            n[0] += 1
            if n[0] == nth:
                _die(where)
            return real(path)

        checkpoint.sha256_file = sha
    elif point == "before-rename":
        checkpoint._replace_dir = lambda tmp, final: _die(where)
    elif point == "after-rename":
        checkpoint._fsync_dir = lambda root: _die(where)


def _arm_rollout(index: int, point: str) -> None:
    from alignkit.stages import ppo
    where = f"rollout {index}: {point}"
    if point == "generated":
        real_new, real_make = ppo.PPOTask._new_rollout, ppo.make_rollout

        def make(*a, **k):
            real_make(*a, **k)
            _die(where)

        def new_rollout(self, step):
            if self.index + 1 == index:
                ppo.make_rollout = make
            return real_new(self, step)

        ppo.PPOTask._new_rollout = new_rollout
    else:
        name = "_save_buffer" if point == "logged" else "_prune"  # before / after the save
        real = getattr(ppo.PPOTask, name)

        def hooked(self):
            if self.index == index:
                _die(where)
            return real(self)

        setattr(ppo.PPOTask, name, hooked)


# ---------------------------------------------------------------------------------------------
# Drawing the three moments and the checkpoint each leaves as the newest good one


def _last_checkpoint_at_or_before(step: int) -> int:
    return max([c for c in CHECKPOINTS if c <= step], default=0)


def draw_plans(stage: str, seed: int, eval_batches: int) -> list[tuple[dict, int]]:
    """Three kills in run order, each with the step the following rerun resumes from."""
    rng = random.Random(seed)
    s = rng.randrange(2, 6)  # a step before the 2nd checkpoint
    step_plan = {"kind": "step", "step": s,
                 "point": rng.choice(["before-update", "after-log"])}
    done = s - 1  # after-log too: the save of step s comes after its log line
    plans = [(step_plan, _last_checkpoint_at_or_before(done))]
    c = rng.choice([c for c in CHECKPOINTS if c > done])  # a save the rerun will reach
    point = rng.choice(["weights-partial", "weights", "checksum-1", "checksum-3",
                        "before-rename", "after-rename"])
    resume = c if point == "after-rename" else _last_checkpoint_at_or_before(c - 1)
    plans.append(({"kind": "checkpoint", "step": c, "point": point}, resume))
    if stage == "ppo":  # no eval split: the third kill falls in a rollout
        r = rng.choice([r for r in range(STEPS // PPO_UPDATES_PER_ROLLOUT)
                        if r * PPO_UPDATES_PER_ROLLOUT > c])
        point = rng.choice(["generated", "logged", "saved"])
        # killed at the start of update r·2 (0-based): r·2 updates were done
        plans.append(({"kind": "rollout", "rollout": r, "point": point},
                      _last_checkpoint_at_or_before(r * PPO_UPDATES_PER_ROLLOUT)))
    else:  # evals at 4, 8 and the final one at 12 (before any save of the same step)
        e = rng.choice([e for e in (*range(EVAL_EVERY, STEPS, EVAL_EVERY), STEPS) if e > c])
        plans.append(({"kind": "eval", "step": e, "batch": rng.randrange(1, eval_batches + 1)},
                      _last_checkpoint_at_or_before(e - 1)))
    return plans


# ---------------------------------------------------------------------------------------------
# The four stages' commands


WORDS = "apple river stone cloud paper music green quiet table window light over".split()


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _pairs(n: int) -> list[dict]:
    rng = random.Random(0)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"prompt": f"Question {i}: {words(3)}?", "chosen": f"{words(3)} thank you",
             "rejected": words(4)} for i in range(n)]


COMMON = {"model.name_or_path": "tiny", "train.precision": "fp32", "train.device": "cpu",
          "train.num_threads": 1, "train.progress": False, "train.max_steps": STEPS,
          "train.save_every": SAVE_EVERY, "train.batch_size": 4, "train.lr": 3e-3,
          "train.warmup_steps": 2, "train.schedule": "cosine"}


def stage_command(stage: str, data_dir: Path) -> tuple[list[str], dict]:
    """(argv without --output, stage keys) for ``stage``."""
    if stage == "sft":
        data = _jsonl(data_dir / "sft.jsonl", [
            {"instruction": f"Add {a} and {b}.", "response": f"{a} plus {b} is {a + b}."}
            for a in range(8) for b in range(5)])  # 40: 32 train, 8 eval = 2 eval batches
        keys = {"data.template": "inst", "data.eval_fraction": 0.2}
    elif stage == "reward":  # LoRA: checkpoints hold adapters and the head only
        data = _jsonl(data_dir / "pairs.jsonl", _pairs(40))
        keys = {"data.template": "plain", "data.max_length": 64, "data.eval_fraction": 0.25,
                "model.lora.enabled": True}
    elif stage == "dpo":  # the reference precomputed (cached under $ALIGNKIT_CACHE)
        data = _jsonl(data_dir / "dpo.jsonl", _pairs(40))
        keys = {"data.template": "plain", "data.max_length": 64, "data.eval_fraction": 0.2,
                "beta": 0.5}
    else:
        data = _jsonl(data_dir / "prompts.jsonl",
                      [{"prompt": f"Say something about {w}."} for w in WORDS[:8]])
        keys = {"reward_fn": "tests.test_crash_safety:letter_a", "rollout.prompts": 4,
                "rollout.max_new_tokens": 8, "ppo_epochs": 2, "kl_target": 0.01,
                "kl_coef": 0.2}  # the adaptive β must come back from disk too
    over = COMMON | {"data.path": str(data)} | keys
    if stage != "ppo":
        over["train.eval_every"] = EVAL_EVERY
    argv = [stage]
    for k, v in over.items():
        argv += ["--set", f"{k}={json.dumps(v) if isinstance(v, bool) else v}"]
    return argv, over


EVAL_BATCHES = {"sft": 2, "reward": 3, "dpo": 2, "ppo": 0}  # eval examples / batch 4


# ---------------------------------------------------------------------------------------------
# The test


class Zygote:
    def __init__(self, env: dict) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-c", "from tests.test_crash_safety import serve; serve()"],
            env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n", "the zygote did not start"

    def run(self, argv: list[str], log: Path, plan: dict | None = None,
            kill_after: float | None = None) -> tuple[int, str]:
        req = {"argv": argv, "plan": plan, "log": str(log), "kill_after": kill_after}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the zygote died"
        return json.loads(answer)["rc"], log.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    env = cli_env() | {"ALIGNKIT_CACHE": str(tmp_path_factory.mktemp("cache"))}
    z = Zygote(env)
    yield z
    z.close()


@pytest.fixture(scope="module")
def baseline(zygote, tmp_path_factory):
    """stage -> (its command less --output, the uninterrupted run, that run's wall seconds);
    one uninterrupted run per stage, shared by the tests."""
    root, cache = tmp_path_factory.mktemp("baseline"), {}

    def get(stage: str) -> tuple[list[str], Path, float]:
        if stage not in cache:
            argv, _ = stage_command(stage, root)
            whole = root / f"{stage}-whole"
            t0 = time.monotonic()
            rc, text = zygote.run(argv + ["--output", str(whole)], root / f"{stage}.log")
            assert rc == 0, text
            cache[stage] = argv, whole, time.monotonic() - t0
        return cache[stage]

    return get


def final_outputs(run: Path, stage: str) -> dict[str, dict[str, torch.Tensor]]:
    out = {"model": load_file(str(run / "model.safetensors"))}
    if stage == "ppo":
        out["critic"] = load_file(str(run / "critic" / "model.safetensors"))
    if stage == "reward":
        out["adapter"] = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    return out


def logs(run: Path, stage: str) -> dict[str, list[dict]]:
    """Every log a run keeps, less wall-clock timings."""
    names = ["metrics.jsonl"] + (["rollouts.jsonl", "samples.jsonl"] if stage == "ppo" else [])

    def clean(row):
        return {k: v for k, v in row.items() if not (k.endswith("_s") or k == "tokens_per_s")}

    return {n: [clean(json.loads(x)) for x in (run / n).read_text().splitlines()]
            for n in names}


def assert_same_run(whole: Path, cut: Path, stage: str) -> None:
    a, b = final_outputs(whole, stage), final_outputs(cut, stage)
    for part in a:
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert logs(whole, stage) == logs(cut, stage)
    # Half-written checkpoint folders of the kills are gone by the end.
    assert not [p.name for p in (cut / "checkpoints").iterdir() if p.name.startswith(".")]


STAGES = [("sft", 1), ("reward", 2), ("dpo", 3), ("ppo", 4)]  # (stage, seed of its moments)


@pytest.mark.parametrize("stage, seed", STAGES)
def test_three_sigkills_then_resume_equal_the_uninterrupted_run(stage, seed, baseline, zygote,
                                                                tmp_path):
    from alignkit.engine.checkpoint import latest_good
    argv, whole, _ = baseline(stage)
    cut = tmp_path / "cut"
    previous_resume = 0
    for i, (plan, resume) in enumerate(draw_plans(stage, seed, EVAL_BATCHES[stage])):
        rc, text = zygote.run(argv + ["--output", str(cut)], tmp_path / f"kill{i}.log", plan)
        assert rc == -signal.SIGKILL, f"{plan} was never reached:\n{text}"
        assert "KILLED" in text and not (cut / "DONE").exists()
        _assert_resumed_from(text, previous_resume)
        # What the kill left: the newest checkpoint that verifies is the one expected (a
        # part-written one is never taken for complete).
        good = latest_good(cut / "checkpoints", quiet=True)
        assert (good.step if good else 0) == resume, plan
        previous_resume = resume
    rc, text = zygote.run(argv + ["--output", str(cut)], tmp_path / "last.log")
    assert rc == 0, text
    _assert_resumed_from(text, previous_resume)
    assert json.loads((cut / "DONE").read_text())["resumed_from"] == previous_resume
    assert_same_run(whole, cut, stage)


@pytest.mark.parametrize("stage, seed", STAGES)
def test_sigkills_at_random_times_then_resume_equal_the_uninterrupted_run(stage, seed, baseline,
                                                                         zygote, tmp_path):
    """Kills from outside at times drawn over the uninterrupted run's duration, whatever the
    process is doing then (tokenising, a forward, a torch.save, a metrics line, the final
    save …); rerun until the run completes."""
    argv, whole, wall = baseline(stage)
    rng, cut = random.Random(seed), tmp_path / "cut"
    kills = 0
    for i in range(8):
        # The first run from scratch takes about ``wall``: early enough a kill lands in it. The
        # baseline paid for first-time work (tokenised data cached, lazy imports), so a run can
        # finish before its kill: then it is thrown away and redone with earlier kills, so that
        # at least one kill always lands (a finished run proves nothing about resuming).
        rc, text = zygote.run(argv + ["--output", str(cut)], tmp_path / f"{i}.log",
                              kill_after=rng.uniform(0.2, 0.7) * wall)
        if rc == 0 and kills == 0:
            shutil.rmtree(cut)
            wall *= 0.5
            continue
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, text
        kills += 1
    else:
        rc, text = zygote.run(argv + ["--output", str(cut)], tmp_path / "last.log")
        assert rc == 0, text
    assert kills >= 1 and (cut / "DONE").is_file()
    assert_same_run(whole, cut, stage)


def _assert_resumed_from(text: str, step: int) -> None:
    found = re.findall(r"resuming from \S*step-(\d+)", text)
    if step == 0:
        assert not found, text
    else:
        assert found and int(found[0]) == step, text


def test_the_drawn_moments_cover_every_kind():
    kinds = [p["kind"] for s, seed in STAGES for p, _ in draw_plans(s, seed, EVAL_BATCHES[s])]
    assert kinds.count("step") == kinds.count("checkpoint") == 4
    assert kinds.count("eval") == 3 and kinds.count("rollout") == 1
