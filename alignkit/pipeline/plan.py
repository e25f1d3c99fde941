"""A pipeline file → a validated plan: every stage's inputs resolved, every config validated,
the stages in dependency order. Nothing here loads a model.

The file::

    output: runs/demo              # the run folder (``alignkit run -o`` overrides it)
    defaults:                      # merged into every training stage's config (model, train)
      train: {precision: auto}
    stages:
      sft:                         # the stage's name: its folder is <run>/sft
        kind: sft
        model: embedded            # an input: an earlier stage's name, or a model / path
        data: builtin:data/sft_demo.jsonl
        config: {train: {max_steps: 40}}   # the stage's own schema, minus inputs and output
      dpo:
        kind: dpo
        model: sft                 # the sft stage's model
        data: my_prefs.jsonl
        after: [reward]            # optional: wait for stages it takes nothing from

An input value that is a plain word (letters, digits, ``_``, ``-``) names a stage, except
``embedded`` (the embedded model) and ``tiny`` (the test model); write a hub model without an
organisation as ``hub:gpt2``. ``builtin:PATH`` is a file alignkit ships (under
``alignkit/assets``); other paths are relative to the working directory. Every mistake — unknown
key or kind, missing input, a reference to no stage or to one that cannot provide it, a cycle,
a bad config value — raises one :class:`InputError` naming the file, the line, the stage and
the key.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from alignkit.config.load import parse_override, safe_load_yaml, set_dotted
from alignkit.config.schema import ModelConfig, TrainConfig
from alignkit.errors import AlignkitError, InputError
from alignkit.pipeline.schema import (CAI_FILES, INPUTS, KINDS, MODEL_WORDS, PROVIDES, SCHEMAS,
                                      STAGE_KEYS, TOP_KEYS, TRAINING_KINDS, Input)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN = "builtin:"
_WORD = re.compile(r"^[A-Za-z0-9_-]+$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
DONE = "DONE"


@dataclass
class PlannedStage:
    """One stage, resolved: ``inputs`` hold paths (``None`` = the embedded model), ``refs`` the
    stage each input named, ``deps`` every stage that must finish first."""

    name: str
    kind: str
    folder: Path
    config: BaseModel
    inputs: dict[str, Any] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    deps: tuple[str, ...] = ()

    @property
    def done(self) -> bool:
        return (self.folder / DONE).is_file()

    @property
    def label(self) -> str:
        mode = getattr(self.config, "mode", None)
        return f"{self.kind} {mode}" if self.kind == "cai" else self.kind


@dataclass
class Plan:
    path: str
    output: Path
    stages: list[PlannedStage]  # in the order they run
    name: str = ""

    def stage(self, name: str) -> PlannedStage:
        return next(s for s in self.stages if s.name == name)


# ---------------------------------------------------------------------------------------------
# Reading the file


def read_pipeline(path: str | Path) -> tuple[dict, dict[str, int]]:
    """The file's mapping and a field path → line table (``stages.sft.config.train``)."""
    p = Path(path)
    if not p.is_file():
        raise InputError("pipeline file not found", path=str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 (byte {e.start})", path=str(p)) from None
    # safe_load_yaml first: it refuses alias bombs and stack-deep nesting, which the line
    # table's walk below would expand or recurse into
    data = safe_load_yaml(text, str(p))
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        lines = _node_lines(node, str(p))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"invalid YAML: {problem}", path=str(p),
                         line=mark.line + 1 if mark is not None else None) from None
    if not isinstance(data, dict):
        raise InputError("a pipeline file must be a mapping with a 'stages' key", path=str(p))
    return data, lines


def _node_lines(node, path: str, prefix: str = "") -> dict[str, int]:
    """Dotted field path → 1-based line; a key given twice in one mapping is an error (YAML
    would silently keep the last one: a second stage of the same name would vanish)."""
    if node is None:
        return {}
    out = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            where = f"{prefix}.{key.value}" if prefix else key.value
            if key.value in seen:
                raise InputError(f"'{where}' is given twice", path=path,
                                 line=key.start_mark.line + 1)
            seen.add(key.value)
            out |= _node_lines(value, path, where)
            out[where] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out |= _node_lines(item, path, f"{prefix}[{i}]")
    return out


def _unshare(value):
    """A copy with no shared parts: a YAML alias (``config: *eval``) gives several stages one
    dict, and an override of one stage's key must not change the others."""
    if isinstance(value, dict):
        return {k: _unshare(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshare(v) for v in value]
    return value


def apply_overrides(data: dict, overrides: list[str]) -> None:
    """``--set sft.config.train.max_steps=10`` (a stage's key) or ``--set output=runs/x``,
    ``--set defaults.train.precision=fp32`` (a top-level key), in place."""
    for item in overrides:
        key, value = parse_override(item)
        if key.split(".")[0] not in TOP_KEYS:
            key = "stages." + key
        set_dotted(data, key, value)


# ---------------------------------------------------------------------------------------------
# Errors that name the place


class _Where:
    def __init__(self, path: str, lines: dict[str, int]) -> None:
        self.path, self.lines = path, lines

    def line(self, dotted: str) -> int | None:
        while dotted:
            if dotted in self.lines:
                return self.lines[dotted]
            dotted = dotted.rsplit(".", 1)[0] if "." in dotted else ""
        return None

    def fail(self, dotted: str, message: str, stage: str | None = None):
        """``pipeline.yaml:12: stage 'dpo': key 'config.train.lr': message``."""
        who = f"stage '{stage}': " if stage else ""
        full = f"stages.{stage}.{dotted}" if stage else dotted
        key = f"key '{dotted}': " if dotted else ""
        raise InputError(f"{who}{key}{message}", path=self.path, line=self.line(full))


# ---------------------------------------------------------------------------------------------
# File → plan


def load_plan(path: str | Path, *, output: str | Path | None = None,
              overrides: list[str] | None = None) -> Plan:
    """Read, resolve and validate a pipeline file (see the module docstring)."""
    data, lines = read_pipeline(path)
    data = _unshare(data)
    apply_overrides(data, overrides or [])
    return build_plan(data, path=str(path), lines=lines, output=output)


def build_plan(data: dict, *, path: str, lines: dict[str, int] | None = None,
               output: str | Path | None = None) -> Plan:
    w = _Where(path, lines or {})
    for key in data:
        if key not in TOP_KEYS:
            w.fail(str(key), f"unknown key; expected {', '.join(TOP_KEYS)}")
    stages = data.get("stages")
    if not isinstance(stages, dict) or not stages:
        w.fail("stages", "expected a mapping of stage names to stages")
    root = Path(output or data.get("output") or Path("runs") / Path(path).stem)
    defaults = _defaults(data.get("defaults"), w)
    names = [str(n) for n in stages]
    for name in names:
        if not _WORD.match(name) or name in MODEL_WORDS + TOP_KEYS:
            w.fail(f"stages.{name}", "a stage name is a plain word (letters, digits, _ and -), "
                                     f"not one of {', '.join(MODEL_WORDS + TOP_KEYS)}")
    raw = {str(k): v for k, v in stages.items()}
    kinds = {n: _kind(raw[n], n, w) for n in names}
    planned = {n: _stage(n, raw[n], kinds, root, defaults, w) for n in names}
    order = _order(planned, names, w)
    return Plan(path=path, output=root, stages=[planned[n] for n in order],
                name=str(data.get("name") or Path(path).stem))


def _defaults(value, w: _Where) -> dict:
    """``defaults``: ``model`` and ``train`` sections, the two every training schema shares."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        w.fail("defaults", "expected a mapping with model and/or train")
    for key, schema in (("model", ModelConfig), ("train", TrainConfig)):
        section = value.get(key, {})
        try:
            schema.model_validate(section)
        except ValidationError as e:
            dotted, message = _describe(e)
            w.fail(f"defaults.{key}.{dotted}".rstrip("."), message)
    for key in value:
        if key not in ("model", "train"):
            w.fail(f"defaults.{key}", "unknown key; defaults holds model and train (the "
                                      "sections every training stage shares)")
    return value


def _kind(stage, name: str, w: _Where) -> str:
    if not isinstance(stage, dict):
        w.fail("", "a stage must be a mapping with at least 'kind'", name)
    kind = stage.get("kind")
    if kind is None:
        w.fail("kind", f"missing; one of {', '.join(KINDS)}", name)
    if kind not in KINDS:
        w.fail("kind", f"unknown stage kind '{kind}'; one of {', '.join(KINDS)}", name)
    return kind


def _stage(name: str, stage: dict, kinds: dict[str, str], root: Path, defaults: dict,
           w: _Where) -> PlannedStage:
    kind = kinds[name]
    spec = INPUTS[kind]
    for key in stage:
        if key not in STAGE_KEYS and key not in spec:
            allowed = ", ".join(list(STAGE_KEYS) + list(spec))
            w.fail(str(key), f"unknown key for a {kind} stage; expected {allowed}", name)
    inputs, refs = {}, {}
    for key, inp in spec.items():
        if stage.get(key) is None:
            if inp.required:
                w.fail(key, f"missing input: a {kind} stage needs '{key}' "
                            f"({_DESCRIBE[inp.what]})", name)
            continue
        inputs[key], found = _resolve(stage[key], inp, key, name, kinds, root, w)
        refs |= {key if len(found) == 1 else f"{key}.{k}": v for k, v in found.items()}
    after = stage.get("after") or []
    if isinstance(after, str):
        after = [after]
    if not isinstance(after, list):
        w.fail("after", "expected a list of stage names", name)
    for other in after:
        if other not in kinds:
            w.fail("after", f"no stage named '{other}'", name)
    deps = list(dict.fromkeys(list(refs.values()) + [str(a) for a in after]))
    if kind == "report" and not after:  # a report covers everything else in the run
        deps = [n for n, k in kinds.items() if k != "report"]
    folder = root / name
    config = _config(kind, name, stage.get("config"), inputs, folder, defaults, w)
    return PlannedStage(name, kind, folder, config, inputs, refs, tuple(deps))


_DESCRIBE = {"model": "a model or a pretrain/sft/dpo/ppo stage",
             "reward_model": "a reward-model folder or a reward stage",
             "sft_data": "a data file or a cai revise stage",
             "preference_data": "a preference file or a cai stage",
             "prompt_data": "a prompt or preference file, or a cai stage",
             "file": "a file", "files": "a file or a list of files",
             "models": "a mapping name: model"}


def _resolve(value, inp: Input, key: str, name: str, kinds: dict[str, str], root: Path,
             w: _Where) -> tuple[Any, dict[str, str]]:
    """(resolved value, {input: stage it names})."""
    if inp.what == "models":
        if not isinstance(value, dict) or not value:
            w.fail(key, "expected a mapping of names to models (name: model)", name)
        out, refs = {}, {}
        for label, v in value.items():
            if not _WORD.match(str(label)):
                w.fail(f"{key}.{label}", "a model's name is a plain word", name)
            out[str(label)], found = _resolve(v, Input("model"), f"{key}.{label}", name, kinds,
                                              root, w)
            refs |= {str(label): s for s in found.values()}
        return out, refs
    if inp.what == "files":
        items = value if isinstance(value, list) else [value]
        return [_resolve(v, Input("file"), key, name, kinds, root, w)[0] for v in items], {}
    if not isinstance(value, str) or not value.strip():
        w.fail(key, f"expected {_DESCRIBE[inp.what]}", name)
    value = value.strip()
    if value in MODEL_WORDS and inp.what == "model":
        return (None if value in ("embedded", "default") else value), {}
    if _WORD.match(value) and not (inp.what == "file" and os.path.exists(value)):
        return _stage_output(value, inp, key, name, kinds, root, w), {key: value}
    if value.startswith(BUILTIN):
        value = str(ASSETS / value[len(BUILTIN):])
    _check_exists(value, inp, key, name, w)
    if inp.what in ("model", "reward_model") and value.startswith("hub:"):
        value = value[len("hub:"):]
    return value, {}


def _stage_output(ref: str, inp: Input, key: str, name: str, kinds: dict[str, str],
                  root: Path, w: _Where) -> str:
    if ref not in kinds:
        w.fail(key, f"no stage named '{ref}' (stages: {', '.join(kinds)}; a path in the "
                    f"working folder is written ./{ref})", name)
    if ref == name:
        w.fail(key, f"cycle: {name} → {name}", name)
    providers = PROVIDES.get(inp.what, ())
    if kinds[ref] not in providers:
        what = "no stage" if not providers else "a " + "/".join(providers) + " stage"
        w.fail(key, f"'{ref}' is a {kinds[ref]} stage; this input takes {what} "
                    f"({_DESCRIBE[inp.what]})", name)
    if kinds[ref] == "cai":
        return str(root / ref / CAI_FILES[inp.what])
    return str(root / ref)


def _check_exists(value: str, inp: Input, key: str, name: str, w: _Where) -> None:
    """A local path must be there now (stage outputs are never checked: they come later)."""
    if value.startswith(("hub:", "http://", "https://")):
        return
    if inp.what in ("model", "reward_model"):
        local = (value.startswith(("./", "../", "/", "~")) or value.endswith(".gguf")
                 or not _HUB_ID.match(value))
        if local and not os.path.exists(os.path.expanduser(value)):
            w.fail(key, f"missing input: model path not found: {value}", name)
        return
    if glob.has_magic(value) and not os.path.exists(value):
        if not glob.glob(value):
            w.fail(key, f"missing input: no file matches {value}", name)
        return
    if not os.path.exists(os.path.expanduser(value)):
        w.fail(key, f"missing input: file not found: {value}", name)


def _config(kind: str, name: str, given, inputs: dict, folder: Path, defaults: dict,
            w: _Where) -> BaseModel:
    """The stage's schema ← defaults (training kinds) ← its ``config`` ← its inputs, validated."""
    schema = SCHEMAS[kind]
    if given is None:
        given = {}
    if not isinstance(given, dict):
        w.fail("config", "expected a mapping of the stage's settings", name)
    tree = schema().model_dump(mode="python")
    if kind in TRAINING_KINDS:
        _merge(tree, {k: v for k, v in defaults.items()})
        for key, inp in INPUTS[kind].items():
            if _get(given, inp.key) is not None:
                w.fail(f"config.{inp.key}", f"set by the pipeline: give it as the stage's "
                                            f"'{key}' input", name)
        if "output" in given:
            w.fail("config.output", f"set by the pipeline ({folder})", name)
    _merge(tree, given)
    if kind in TRAINING_KINDS:
        for key, inp in INPUTS[kind].items():
            if key in inputs:
                set_dotted(tree, inp.key, inputs[key])
        tree["output"] = str(folder)
    try:
        cfg = schema.model_validate(tree)
    except ValidationError as e:
        dotted, message = _describe(e)
        w.fail(f"config.{dotted}".rstrip("."), message, name)
    _check_stage(kind, cfg, inputs, name, w)
    return cfg


def _check_stage(kind: str, cfg, inputs: dict, name: str, w: _Where) -> None:
    """The stages' own checks that need no model: the loss settings, the reward, the
    constitution and prompt files."""
    try:
        match kind:
            case "dpo":
                from alignkit.stages.dpo import check_loss_config
                check_loss_config(cfg)
            case "ppo":
                if cfg.reward_model is None and cfg.reward_fn is None:
                    w.fail("reward_model", "missing input: a ppo stage needs 'reward_model' "
                                           "(a reward stage or folder) or config.reward_fn", name)
                from alignkit.stages.ppo import check_config
                check_config(cfg)
            case "cai":
                from alignkit.stages.cai.constitution import load_constitution
                from alignkit.stages.cai.revise import load_prompts
                load_constitution(inputs.get("constitution")).select(cfg.tags or None)
                load_prompts(inputs.get("prompts"), max_prompts=cfg.max_prompts)
                if cfg.mode == "feedback" and cfg.sampling_temperature <= 0:
                    w.fail("config.temperature", "feedback samples two answers: it must be > 0",
                           name)
    except InputError as e:
        if e.message.startswith("stage '"):  # ours: already names the stage and the line
            raise
        raise InputError(f"stage '{name}': {e}") from None
    except AlignkitError as e:
        w.fail("config", str(e), name)


def _get(tree: dict, dotted: str | None):
    node: Any = tree
    for k in (dotted or "").split("."):
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def _merge(base: dict, top: dict) -> None:
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _describe(e: ValidationError) -> tuple[str, str]:
    err = e.errors()[0]
    dotted = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        return dotted, "unknown key"
    message = err["msg"]
    if "input" in err and err["type"] != "missing" and not isinstance(err["input"], dict):
        message += f" (got {str(err['input'])[:60]!r})"
    return dotted, message


# ---------------------------------------------------------------------------------------------
# Order


def _order(stages: dict[str, PlannedStage], names: list[str], w: _Where) -> list[str]:
    """Topological order, ties broken by the file's order; a cycle is named."""
    done: list[str] = []
    left = list(names)
    while left:
        ready = [n for n in left if all(d in done for d in stages[n].deps)]
        if not ready:
            cycle = _find_cycle(stages, left)
            w.fail("", "cycle: " + " → ".join(cycle), cycle[0])
        done.append(ready[0])
        left.remove(ready[0])
    return done


def _find_cycle(stages: dict[str, PlannedStage], left: list[str]) -> list[str]:
    path: list[str] = [left[0]]
    while True:  # every stage left waits for another one left: walk until one repeats
        nxt = next(d for d in stages[path[-1]].deps if d in left)
        if nxt in path:
            return path[path.index(nxt):] + [nxt]
        path.append(nxt)


def select(plan: Plan, *, only: list[str] | None = None,
           start: str | None = None) -> list[PlannedStage]:
    """The stages to run: all, ``only`` these, or ``start`` and every stage after it."""
    names = [s.name for s in plan.stages]
    if only and start:
        raise InputError("give --only or --from, not both")
    for n in (only or []) + ([start] if start else []):
        if n not in names:
            raise InputError(f"no stage named '{n}' in this pipeline (stages: "
                             f"{', '.join(names)})", path=plan.path)
    if only:
        return [s for s in plan.stages if s.name in only]
    if start:
        return plan.stages[names.index(start):]
    return list(plan.stages)
