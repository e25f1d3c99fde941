"""Constitution files: the principles that steer Constitutional AI (Bai et al. 2022).

A constitution is a YAML mapping::

    version: 1                      # optional; 1 is the only version
    name: my-constitution           # optional; default: the file's stem
    description: ...                # optional
    principles:                     # at least one
      - name: privacy               # a word: letters, digits, _ and -; unique
        tags: [harmless]            # optional; any of harmless, honest, helpful
        critique: ...               # the critique request (supervised CAI)
        revision: ...               # the revision request (supervised CAI)
        choice: ...                 # optional: the question put to the feedback model (RLAIF),
                                    # default "Choose the response that is most helpful while
                                    # being harmless."
    examples:                       # optional few-shot examples for critique and revision
      - principle: privacy          # the name of a principle above
        prompt: ...
        response: ...
        critique: ...
        revision: ...

Every problem is one line naming the file, the line and the field, e.g.
``my.yaml:12: field 'principles[3].revision': missing``. The default constitution ships with
alignkit (``alignkit/assets/constitution_v1.yaml``); its principles are our own wording.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from alignkit.errors import InputError
from alignkit.assets import ASSETS_DIR

DEFAULT_CONSTITUTION = ASSETS_DIR / "constitution_v1.yaml"
DEFAULT_CHOICE = "Choose the response that is most helpful while being harmless."
TAGS = ("harmless", "honest", "helpful")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_TOP_KEYS = ("version", "name", "description", "principles", "examples")
_PRINCIPLE_KEYS = ("name", "critique", "revision", "choice", "tags")
_EXAMPLE_KEYS = ("principle", "prompt", "response", "critique", "revision")


@dataclass(frozen=True)
class Principle:
    """One principle: how to critique and revise a reply, and how to ask which of two replies
    is better (``choice``)."""

    name: str
    critique: str
    revision: str
    choice: str = DEFAULT_CHOICE
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Example:
    """A worked critique and revision of ``response`` under the principle named ``principle``."""

    principle: str
    prompt: str
    response: str
    critique: str
    revision: str


@dataclass(frozen=True)
class Constitution:
    """Validated principles (at least one, unique names) and few-shot examples."""

    name: str
    principles: tuple[Principle, ...]
    examples: tuple[Example, ...] = ()
    description: str = ""
    source: str = ""

    def principle(self, name: str) -> Principle:
        """The principle called ``name`` (KeyError if there is none)."""
        for p in self.principles:
            if p.name == name:
                return p
        raise KeyError(name)

    def select(self, tags: list[str] | tuple[str, ...] | None) -> Constitution:
        """Only the principles carrying at least one of ``tags`` (all of them for no tags);
        examples whose principle is left out are dropped too."""
        if not tags:
            return self
        unknown = [t for t in tags if t not in TAGS]
        if unknown:
            raise InputError(f"unknown tag '{unknown[0]}'; expected one of {', '.join(TAGS)}",
                             field="tags")
        kept = tuple(p for p in self.principles if set(p.tags) & set(tags))
        if not kept:
            raise InputError(f"no principle of this constitution is tagged "
                             f"{' or '.join(tags)}", path=self.source or None, field="tags")
        names = {p.name for p in kept}
        return replace(self, principles=kept,
                       examples=tuple(e for e in self.examples if e.principle in names))

    def fingerprint(self) -> str:
        """A short hash of the principles and examples (not of the file's layout)."""
        payload = json.dumps([[asdict(p) for p in self.principles],
                              [asdict(e) for e in self.examples]], sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def sample_principles(constitution: Constitution, k: int, *, seed: int, key: str
                      ) -> list[Principle]:
    """``k`` distinct principles (all of them when ``k`` is larger), drawn by a generator
    seeded from ``(seed, key)`` alone: the same prompt gets the same principles on a rerun,
    whatever else is in the run (Python seeds ``random`` from a string by SHA-512, not by the
    per-process ``hash``)."""
    rng = random.Random(f"alignkit-cai:{seed}:{key}")
    return rng.sample(list(constitution.principles), min(k, len(constitution.principles)))


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read and validate a constitution file (default: the shipped one)."""
    import yaml

    from alignkit.data.sources import read_text
    p = Path(path) if path is not None else DEFAULT_CONSTITUTION
    if not p.is_file():
        raise InputError("constitution file not found", path=str(p))
    text = read_text(str(p))
    try:
        data = yaml.safe_load(text)
        lines = _node_lines(yaml.compose(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"invalid YAML: {problem}", path=str(p),
                         line=mark.line + 1 if mark is not None else None) from None
    return parse_constitution(data, path=str(p), lines=lines, default_name=p.stem)


def parse_constitution(data: object, *, path: str | None = None,
                       lines: dict[str, int] | None = None,
                       default_name: str = "constitution") -> Constitution:
    """Validate an already-parsed constitution; errors name ``path`` and the line of the field
    where ``lines`` (field path → line, from :func:`_node_lines`) knows it."""
    reader = _Reader(path, lines or {})
    top = reader.mapping(data, "", _TOP_KEYS, what="a constitution")
    if top.get("version", 1) != 1:
        reader.fail("version", f"unsupported version {top['version']!r}; expected 1")
    principles = reader.items(top, "principles", required=True)
    parsed = tuple(_principle(reader, item, f"principles[{i}]")
                   for i, item in enumerate(principles))
    _unique_names(reader, parsed)
    names = {p.name for p in parsed}
    examples = tuple(_example(reader, item, f"examples[{i}]", names)
                     for i, item in enumerate(reader.items(top, "examples", required=False)))
    name = reader.text(top, "name", "", required=False) or default_name
    description = reader.text(top, "description", "", required=False) or ""
    return Constitution(name, parsed, examples, description, path or "")


def _principle(reader: _Reader, item: object, where: str) -> Principle:
    data = reader.mapping(item, where, _PRINCIPLE_KEYS, what="a principle")
    name = reader.text(data, "name", where)
    if not _NAME.match(name):
        reader.fail(f"{where}.name", f"'{name}' is not a plain name (letters, digits, _ and -)")
    tags = data.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        reader.fail(f"{where}.tags", "expected a list of tags")
    for k, tag in enumerate(tags):
        if tag not in TAGS:
            reader.fail(f"{where}.tags[{k}]", f"unknown tag '{tag}'; expected {', '.join(TAGS)}")
    choice = reader.text(data, "choice", where, required=False) or DEFAULT_CHOICE
    return Principle(name, reader.text(data, "critique", where),
                     reader.text(data, "revision", where), choice, tuple(tags))


def _unique_names(reader: _Reader, principles: tuple[Principle, ...]) -> None:
    seen: set[str] = set()
    for i, p in enumerate(principles):
        if p.name in seen:
            reader.fail(f"principles[{i}].name", f"a second principle named '{p.name}'")
        seen.add(p.name)


def _example(reader: _Reader, item: object, where: str, names: set[str]) -> Example:
    data = reader.mapping(item, where, _EXAMPLE_KEYS, what="an example")
    values = {key: reader.text(data, key, where) for key in _EXAMPLE_KEYS}
    if values["principle"] not in names:
        reader.fail(f"{where}.principle", f"no principle is named '{values['principle']}'")
    return Example(**values)


class _Reader:
    """Type checks that fail as one line naming the file, the line and the field path."""

    def __init__(self, path: str | None, lines: dict[str, int]) -> None:
        self.path, self.lines = path, lines

    def fail(self, field: str, message: str):
        raise InputError(message, path=self.path, line=self._line(field), field=field or None)

    def _line(self, field: str) -> int | None:
        while True:  # the field's own line, else its nearest ancestor's
            if field in self.lines:
                return self.lines[field]
            if not field:
                return None
            parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", field)
            field = parent if parent != field else ""  # a top-level key: the file's start

    def mapping(self, value: object, where: str, keys: tuple[str, ...], *, what: str) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"{what} must be a mapping of keys to values")
        for key in value:
            if key not in keys:
                self.fail(_join(where, str(key)), f"unknown key; expected {', '.join(keys)}")
        return value

    def items(self, data: dict, key: str, *, required: bool) -> list:
        value = data.get(key)
        if value is None and not required:
            return []
        if not isinstance(value, list) or (required and not value):
            self.fail(key, "missing" if value is None else "expected a non-empty list")
        return value

    def text(self, data: dict, key: str, where: str, *, required: bool = True) -> str | None:
        field = _join(where, key)
        value = data.get(key)
        if value is None:
            if required:
                self.fail(field, "missing")
            return None
        if not isinstance(value, str):
            self.fail(field, f"expected a string, got {type(value).__name__}")
        if not value.strip():
            self.fail(field, "is empty")
        return value.strip()


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _node_lines(node, prefix: str = "") -> dict[str, int]:
    """Field path (``principles[3].critique``) → 1-based line, from a composed YAML tree."""
    import yaml
    if node is None:
        return {}
    out = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                field = _join(prefix, key.value)
                out |= _node_lines(value, field)
                out[field] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out |= _node_lines(item, f"{prefix}[{i}]")
    return out
