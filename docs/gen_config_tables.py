"""Regenerate the config-key tables of docs/stages.md from the pydantic schemas (the one source
of defaults), between ``<!-- keys:KIND -->`` and ``<!-- /keys -->`` markers.

    python docs/gen_config_tables.py          # rewrite docs/stages.md
    python docs/gen_config_tables.py --check  # exit 1 if it is out of date (a test runs this)
"""

from __future__ import annotations

import re
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from alignkit.config.schema import ModelConfig, TrainConfig
from alignkit.pipeline.schema import SCHEMAS

DOC = Path(__file__).resolve().parent / "stages.md"
MARKER = re.compile(r"(<!-- keys:(\w+) -->\n)(.*?)(<!-- /keys -->)", re.S)
SKIP = {"stage", "output"}  # fixed by the stage kind / set by the pipeline


def _type(annotation) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    if text is None:
        text = str(annotation).replace("typing.", "")
    text = re.sub(r"Literal\[(.*?)\]", lambda m: m.group(1).replace("'", ""), text)
    return text.replace("NoneType", "null").replace("|", "\\|")


def rows(schema: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    out = []
    default_obj = schema()
    for name, field in schema.model_fields.items():
        if not prefix and name in SKIP:
            continue
        key = prefix + name
        ann = field.annotation
        value = getattr(default_obj, name)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += [(f"{key}.{k}", t, d) for k, t, d in _nested(ann, value)]
            continue
        shown = value if not isinstance(value, str) else value or '""'
        out.append((key, _type(ann), "null" if value is None else str(shown)))
    return out


def _nested(schema: type[BaseModel], value: BaseModel) -> list[tuple[str, str, str]]:
    """Keys of a section, with the defaults of this stage's instance (PPO's train differs)."""
    out = []
    for name, field in schema.model_fields.items():
        v = getattr(value, name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += [(f"{name}.{k}", t, d) for k, t, d in _nested(ann, v)]
        else:
            out.append((name, _type(ann), "null" if v is None else str(v)))
    return out


SHARED = {"model": ModelConfig, "train": TrainConfig}


def stage_rows(kind: str) -> list[tuple[str, str, str]]:
    """A stage's own keys; of the shared model and train sections only the defaults this stage
    changes (their other keys are in the shared tables)."""
    shared = {f"{section}.{k}": d for section, schema in SHARED.items()
              for k, _, d in rows(schema)}
    return [(k, t, d) for k, t, d in rows(SCHEMAS[kind])
            if k.split(".")[0] not in SHARED or shared.get(k) != d]


def table(kind: str) -> str:
    found = rows(SHARED[kind]) if kind in SHARED else stage_rows(kind)
    lines = ["| key | type | default |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | {t} | `{d}` |" for k, t, d in found]
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    return MARKER.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(4), text)


if __name__ == "__main__":
    old = DOC.read_text(encoding="utf-8")
    new = render(old)
    if "--check" in sys.argv:
        sys.exit(0 if new == old else 1)
    DOC.write_text(new, encoding="utf-8")
