"""YAML loading with dotted overrides, and errors that name the file and the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from alignkit.errors import InputError

C = TypeVar("C", bound=BaseModel)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Safe-load a YAML mapping; one-line errors for missing files, bad YAML, non-mappings."""
    p = Path(path)
    if not p.is_file():
        raise InputError("config file not found", path=str(p))
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8",
                         path=str(p), line=raw.count(b"\n", 0, e.start) + 1) from None
    data = safe_load_yaml(text, str(p))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError("a config file must be a mapping of keys to values", path=str(p))
    return data


# A config or pipeline file is a few hundred values. Aliases can make a small file stand for
# billions of them ("billion laughs"): PyYAML shares the repeated nodes, but anything that
# walks the result (validation, an error message, a dump) expands them.
MAX_YAML_VALUES = 100_000
# Nesting deeper than this is refused whatever the interpreter's recursion limit (which
# torch.compile raises process-wide, so the parser's own RecursionError cannot be relied on).
MAX_YAML_DEPTH = 100


class _TooDeep(Exception):
    pass


def safe_load_yaml(text: str, path: str) -> Any:
    """``yaml.safe_load`` (plain data only: no tags that build Python objects), with one-line
    errors for bad YAML, nesting deep enough to exhaust the stack, and alias bombs."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"invalid YAML: {problem}", path=path, line=line) from None
    except RecursionError:
        raise InputError("invalid YAML: nested too deeply", path=path) from None
    try:
        size = _expanded_size(data, {})
    except _TooDeep:
        raise InputError(f"invalid YAML: nested too deeply (more than {MAX_YAML_DEPTH} levels)",
                         path=path) from None
    except RecursionError:  # an alias inside the node it names: a value that contains itself
        raise InputError("the YAML refers to itself (an alias inside its own anchor)",
                         path=path) from None
    if size > MAX_YAML_VALUES:
        raise InputError(f"the YAML expands to more than {MAX_YAML_VALUES:,} values (aliases "
                         f"repeating aliases?); a config is far smaller", path=path)
    return data


def _expanded_size(node: Any, seen: dict[int, int], depth: int = 0) -> int:
    """How many values ``node`` stands for with every alias expanded; each shared node is
    counted once per use but visited once (memoised), so this stays linear in the file.
    Raises :class:`_TooDeep` past ``MAX_YAML_DEPTH`` levels of nesting."""
    if not isinstance(node, (dict, list)):
        return 1
    if depth > MAX_YAML_DEPTH:
        raise _TooDeep
    key = id(node)
    if seen.get(key) == -1:  # still being counted: the node contains itself
        raise RecursionError
    if key not in seen:
        seen[key] = -1
        children = node.values() if isinstance(node, dict) else node
        seen[key] = 1 + sum(_expanded_size(c, seen, depth + 1) for c in children)
    return seen[key]


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "train.lr", 1e-4)`` — creates intermediate mappings as needed."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` → ``("train.lr", 1e-4)``; the value is read as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise InputError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string; flags mean the number
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def build_config(schema: type[C], *, path: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> C:
    """Config = schema defaults ← YAML file ← dotted overrides (flags), validated once.

    The layers merge key by key onto the schema's own default instance, so overriding one key
    of a section keeps the stage's defaults for the rest (DPOConfig's train.lr stays 1e-6 when
    only train.max_steps is given)."""
    tree: dict[str, Any] = schema().model_dump(mode="python")
    _merge(tree, read_yaml(path) if path else {})
    for k, v in (overrides or {}).items():
        if v is not None:
            set_dotted(tree, k, v)
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        raise InputError(_describe(e), path=str(path) if path else None) from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> None:
    """Deep-merge ``top`` into ``base`` in place: mappings merge, anything else replaces."""
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _describe(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = f"unknown key '{loc}'"
    else:
        msg = f"key '{loc}': {err['msg']}"
        if "input" in err and kind != "missing":
            msg += f" (got {json.dumps(err['input'], default=str)[:60]})"
    more = len(e.errors()) - 1
    return msg + (f" (+{more} more)" if more else "")


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML, atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    tmp.replace(p)
