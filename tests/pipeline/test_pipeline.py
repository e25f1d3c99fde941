"""Pipeline files: parsing, every mistake as one line naming the stage and the key (before any
work), the plan's order, --only / --from, and on the tiny model: finished stages skipped, an
interrupted stage resumed from its checkpoint, a changed config refused."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from alignkit.cli.main import main
from alignkit.errors import AlignkitError, InputError
from alignkit.pipeline.execute import run_plan
from alignkit.pipeline.plan import load_plan, select

ROOT = Path(__file__).resolve().parents[2]
QUIET = {"log": lambda *_: None}

TINY = """\
output: {out}
defaults:
  train: {{precision: fp32, num_threads: 1, progress: false}}
stages:
  dpo:                       # listed first: the plan must still run sft before it
    kind: dpo
    model: sft
    data: builtin:data/preferences_demo.jsonl
    config:
      data: {{template: inst, max_length: 64, max_examples: 16, eval_fraction: 0.0}}
      train: {{max_steps: 2, batch_size: 4, lr: 1.0e-3}}
  sft:
    kind: sft
    model: tiny
    config:
      data: {{template: inst, max_length: 64, max_examples: 32, eval_fraction: 0.0}}
      train: {{max_steps: 4, batch_size: 4, lr: 1.0e-3, save_every: 2}}
  report:
    kind: report
"""


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def tiny_file(tmp_path: Path) -> Path:
    return write(tmp_path, TINY.format(out=tmp_path / "run"))


# --- parsing and the plan ---------------------------------------------------------------------


def test_plan_resolves_inputs_and_orders_by_dependency(tmp_path):
    plan = load_plan(tiny_file(tmp_path))
    assert [s.name for s in plan.stages] == ["sft", "dpo", "report"]
    sft, dpo, report = plan.stages
    assert dpo.deps == ("sft",) and dpo.refs == {"model": "sft"}
    assert dpo.config.model.name_or_path == str(tmp_path / "run" / "sft")
    assert dpo.config.output == str(tmp_path / "run" / "dpo")
    assert dpo.config.data.path.endswith("alignkit/assets/data/preferences_demo.jsonl")
    # defaults reach every training stage; the stage's own keys win; schema defaults fill in
    assert sft.config.train.precision == dpo.config.train.precision == "fp32"
    assert sft.config.train.lr == 1e-3 and dpo.config.beta == 0.1
    assert set(report.deps) == {"sft", "dpo"}  # a report waits for everything else


def test_embedded_is_the_default_model_and_overrides_do_not_leak_through_aliases(tmp_path):
    path = write(tmp_path, """\
        stages:
          a: {kind: sft, model: embedded, config: &c {train: {max_steps: 3}}}
          b: {kind: sft, config: *c}
        """)
    plan = load_plan(path, overrides=["a.config.train.max_steps=7", "b.model=tiny"])
    a, b = plan.stages
    assert a.config.model.name_or_path is None and b.config.model.name_or_path == "tiny"
    assert (a.config.train.max_steps, b.config.train.max_steps) == (7, 3)
    assert plan.output == Path("runs/p")  # no output key: runs/<file name>


def test_select_only_and_from(tmp_path):
    plan = load_plan(tiny_file(tmp_path))
    assert [s.name for s in select(plan, only=["dpo"])] == ["dpo"]
    assert [s.name for s in select(plan, start="dpo")] == ["dpo", "report"]
    with pytest.raises(InputError, match="no stage named 'nope'"):
        select(plan, only=["nope"])
    with pytest.raises(InputError, match="not both"):
        select(plan, only=["dpo"], start="sft")
    # dpo alone needs sft's model, which is not there yet: refused before any work
    with pytest.raises(InputError, match="stage 'dpo' needs 'sft', which has not finished"):
        run_plan(plan, only=["dpo"], **QUIET)
    assert not (tmp_path / "run" / "dpo").exists()


BAD = {
    "unknown kind": ("stages:\n  a: {kind: rlhf}\n",
                     ["p.yaml:2:", "stage 'a'", "key 'kind'", "unknown stage kind 'rlhf'"]),
    "no kind": ("stages:\n  a: {model: tiny}\n", ["stage 'a'", "key 'kind'", "missing"]),
    "unknown stage key": ("stages:\n  a:\n    kind: sft\n    modle: tiny\n",
                          ["p.yaml:4:", "stage 'a'", "key 'modle'", "unknown key"]),
    "unknown config key": ("stages:\n  a:\n    kind: sft\n    config:\n      train:\n"
                           "        lrr: 0.1\n",
                           ["p.yaml:6:", "stage 'a'", "key 'config.train.lrr'", "unknown key"]),
    "bad value": ("stages:\n  a:\n    kind: dpo\n    data: builtin:data/preferences_demo.jsonl\n"
                  "    config: {beta: -1}\n", ["stage 'a'", "key 'config.beta'", "greater than 0"]),
    "missing input": ("stages:\n  a: {kind: dpo, model: tiny}\n",
                      ["stage 'a'", "key 'data'", "missing input"]),
    "missing reward": ("stages:\n  a: {kind: ppo, data: builtin:data/preferences_demo.jsonl}\n",
                       ["stage 'a'", "key 'reward_model'", "missing input"]),
    "missing file": ("stages:\n  a: {kind: sft, data: ./nowhere.jsonl}\n",
                     ["stage 'a'", "key 'data'", "file not found"]),
    "unknown stage": ("stages:\n  a: {kind: sft}\n  b: {kind: dpo, model: sfft, data: a}\n",
                      ["p.yaml:3:", "stage 'b'", "key 'model'", "no stage named 'sfft'"]),
    "wrong provider": ("stages:\n  a: {kind: sft}\n  b: {kind: ppo, model: a, reward_model: a,"
                       " data: builtin:data/preferences_demo.jsonl}\n",
                       ["stage 'b'", "key 'reward_model'", "'a' is a sft stage"]),
    "cycle": ("stages:\n  a: {kind: sft, model: c}\n  b: {kind: sft, model: a}\n"
              "  c: {kind: sft, model: b}\n", ["stage 'a'", "cycle: a → c → b → a"]),
    "after unknown": ("stages:\n  a: {kind: sft, after: [zz]}\n",
                      ["stage 'a'", "key 'after'", "no stage named 'zz'"]),
    "input in config": ("stages:\n  a:\n    kind: sft\n    config: {data: {path: x.jsonl}}\n",
                        ["stage 'a'", "key 'config.data.path'", "'data' input"]),
    "twice": ("stages:\n  a: {kind: sft}\n  a: {kind: dpo}\n",
              ["p.yaml:3:", "'stages.a' is given twice"]),
    "top key": ("stage:\n  a: {kind: sft}\n", ["key 'stage'", "unknown key"]),
    "defaults": ("defaults: {train: {lr: 0}}\nstages:\n  a: {kind: sft}\n",
                 ["key 'defaults.train.lr'", "greater than 0"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_mistake_is_one_line_naming_stage_and_key(case, tmp_path, capsys, monkeypatch):
    text, expected = BAD[case]
    path = write(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "p.yaml", "--dry-run"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    for part in expected:
        assert part in err, (part, err)
    assert path.is_file() and not (tmp_path / "runs").exists()  # nothing was made


# --- dry run ---------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_loads_no_model(tmp_path, capsys, monkeypatch):
    import alignkit.models.load as load

    def no_model(*a, **k):
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr(load, "load_causal_lm", no_model)
    monkeypatch.setattr(load, "load_tokenizer", no_model)
    main(["run", str(tiny_file(tmp_path)), "--dry-run"])
    out = capsys.readouterr().out
    assert " 1. sft [sft]" in out and " 2. dpo [dpo]" in out and "model: " in out
    assert "(stage sft)" in out and "3 stages valid" in out
    assert not (tmp_path / "run").exists()


def test_gpu_pipeline_validates_offline(capsys, monkeypatch):
    import socket

    def no_network(*a, **k):
        raise AssertionError("the dry run reached the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    main(["run", str(ROOT / "configs" / "pipeline_gpu.yaml"), "--dry-run", "-o", "unused"])
    out = capsys.readouterr().out
    assert "Qwen/Qwen2.5-0.5B-Instruct" in out and "11 stages valid" in out
    plan = load_plan(ROOT / "configs" / "pipeline_gpu.yaml")
    assert plan.stage("dpo").config.model.lora.enabled  # defaults.model reached it
    assert plan.stage("ppo").config.reward_model == "runs/gpu/reward"


# --- running: skip finished, resume interrupted, refuse a changed config ----------------------


def test_interrupted_stage_resumes_and_finished_stages_are_skipped(tmp_path, monkeypatch):
    from alignkit.stages.sft import TokenTask
    path = tiny_file(tmp_path)
    run = tmp_path / "run"
    real, calls = TokenTask.collate, []

    def interrupt(self, indices, split):  # one batch per step (no eval split, no accumulation)
        calls.append(split)
        if len(calls) == 3:  # sft saved step 2; Ctrl-C during step 3
            raise KeyboardInterrupt
        return real(self, indices, split)

    monkeypatch.setattr(TokenTask, "collate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_plan(load_plan(path), **QUIET)
    assert (run / "sft" / "checkpoints").is_dir() and not (run / "sft" / "DONE").exists()
    assert not (run / "dpo").exists()
    monkeypatch.setattr(TokenTask, "collate", real)

    logged: list[str] = []
    timings = run_plan(load_plan(path), log=logged.append)
    assert any("resuming from" in m and "step-000002" in m for m in logged)
    assert [t["status"] for t in timings] == ["ran", "ran", "ran"]
    assert all((run / n / "DONE").is_file() for n in ("sft", "dpo", "report"))
    html = (run / "report" / "report.html").read_text()
    assert "sft — sft" in html and "dpo — dpo" in html

    logged.clear()
    timings = run_plan(load_plan(path), log=logged.append)
    assert [t["status"] for t in timings] == ["skipped"] * 3
    assert sum("already done, skipped" in m for m in logged) == 3

    # a finished stage whose file now says something else is refused, not silently kept
    with pytest.raises(AlignkitError, match=r"stage 'sft' finished with another config "
                                            r"\(first difference: 'train.lr'\)"):
        run_plan(load_plan(path, overrides=["sft.config.train.lr=0.5"]), **QUIET)
    # --overwrite with --only redoes just that stage
    timings = run_plan(load_plan(path, overrides=["report.after=[sft]"]), only=["report"],
                       overwrite=True, **QUIET)
    assert timings == [{"stage": "report", "kind": "report", "status": "ran",
                        "wall_s": timings[0]["wall_s"]}]


def test_docs_key_tables_match_the_schemas():
    """docs/stages.md's key tables are generated from the schemas; regenerate them with
    `python docs/gen_config_tables.py` when a schema changes."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen", ROOT / "docs" / "gen_config_tables.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = (ROOT / "docs" / "stages.md").read_text(encoding="utf-8")
    assert gen.render(text) == text, "run: python docs/gen_config_tables.py"
    for kind in ("pretrain", "sft", "reward", "dpo", "ppo", "cai", "eval", "compare"):
        assert f"<!-- keys:{kind} -->" in text
