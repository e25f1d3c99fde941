"""Security audit, as tests: nothing a user points alignkit at can make it run code, and nothing
secret leaves the process.

- Weights are written only as safetensors; any other saved state (optimizer, RNG, PPO rollout
  buffers) is read back with ``torch.load(weights_only=True)``; no pickle, marshal or unsafe
  YAML anywhere in the package (an AST scan, so a new call site fails here).
- ``trust_remote_code`` is off unless the user sets ``model.trust_remote_code``; remote code in
  a model folder is not run, and a pickled weights file that holds objects is refused.
- ``alignkit serve`` binds 127.0.0.1 by default, checks its API key with
  ``hmac.compare_digest`` and never logs keys or bodies (size and token limits:
  tests/models/test_serve.py).
- API keys and hub tokens never reach run folders, saved configs or the log.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib

import pytest
import torch

from alignkit.errors import AlignkitError, InputError

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "alignkit"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _calls():
    """(file, ast.Call, dotted name of the callee) for every call in the package."""
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                yield path.relative_to(PACKAGE.parent), node, _dotted(node.func)


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _where(path, call) -> str:
    return f"{path}:{call.lineno}"


# ---------------------------------------------------------------------------------------------
# Static audit of the package


def test_the_scan_sees_the_package():
    names = {name for _, _, name in _calls()}
    assert len(SOURCES) > 50 and "torch.load" in names and "yaml.safe_load" in names


def test_every_torch_load_is_weights_only():
    bad = [_where(p, c) for p, c, name in _calls() if name.endswith("torch.load")
           and not (isinstance(_kw(c, "weights_only"), ast.Constant)
                    and _kw(c, "weights_only").value is True)]
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_no_pickle_marshal_or_other_code_running_loaders():
    forbidden = ("pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.load",
                 "marshal.loads", "dill.load", "dill.loads", "joblib.load", "shelve.open",
                 "cloudpickle.load", "cloudpickle.loads")
    bad = [f"{_where(p, c)} {name}" for p, c, name in _calls() if name in forbidden]
    bad += [f"{_where(p, c)} {name}(allow_pickle=True)" for p, c, name in _calls()
            if name.endswith("load") and isinstance(_kw(c, "allow_pickle"), ast.Constant)
            and _kw(c, "allow_pickle").value is True]
    bad += [f"{_where(p, c)} {name}" for p, c, name in _calls() if name in ("eval", "exec")]
    assert not bad, bad


def test_yaml_is_only_safe_loaded():
    unsafe = ("yaml.load", "yaml.load_all", "yaml.full_load", "yaml.full_load_all",
              "yaml.unsafe_load", "yaml.unsafe_load_all")
    bad = [_where(p, c) for p, c, name in _calls() if name in unsafe]
    for p, c, name in _calls():  # yaml.compose & co. only with the SafeLoader
        loader = _kw(c, "Loader")
        if name.startswith("yaml.") and loader is not None and _dotted(loader) != "yaml.SafeLoader":
            bad.append(_where(p, c))
    assert not bad, f"unsafe YAML loading: {bad}"


def test_torch_save_only_writes_state_that_is_loaded_back_weights_only():
    # model weights go through safetensors (save_pretrained, save_file); torch.save is for
    # optimizer/RNG state and PPO rollout buffers, each read back by a weights_only load
    writers = {str(p) for p, _, name in _calls() if name == "torch.save"}
    assert writers <= {"alignkit/engine/checkpoint.py", "alignkit/engine/sharded.py",
                       "alignkit/stages/ppo.py"}, writers
    bad = [_where(p, c) for p, c, name in _calls()
           if (name.endswith("save_pretrained") and isinstance(_kw(c, "safe_serialization"),
                                                              ast.Constant)
               and _kw(c, "safe_serialization").value is False)
           or (name.endswith("from_pretrained") and isinstance(_kw(c, "use_safetensors"),
                                                               ast.Constant)
               and _kw(c, "use_safetensors").value is False)]
    assert not bad, bad


def test_trust_remote_code_is_off_unless_the_user_asks():
    from alignkit.config.schema import ModelConfig
    assert ModelConfig().trust_remote_code is False
    hard_coded = [_where(p, c) for p, c, _ in _calls()
                  if isinstance(_kw(c, "trust_remote_code"), ast.Constant)
                  and _kw(c, "trust_remote_code").value is not False]
    assert not hard_coded, f"trust_remote_code hard-coded on: {hard_coded}"


def test_transformers_reads_pickled_weights_weights_only():
    """A .bin checkpoint is read by transformers, not by us: its default must stay safe."""
    import inspect

    from transformers import modeling_utils
    assert inspect.signature(modeling_utils.load_state_dict).parameters[
        "weights_only"].default is True


# ---------------------------------------------------------------------------------------------
# Model folders that try to run code


@pytest.fixture
def model_folder(tmp_path):
    from alignkit.models.tiny import tiny_model, tiny_tokenizer
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_remote_code_in_a_model_folder_is_not_run_by_default(model_folder, tmp_path):
    from alignkit.config.schema import ModelConfig
    from alignkit.models.load import load_causal_lm
    marker = tmp_path / "remote-code-ran"
    config = json.loads((model_folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig",
                          "AutoModelForCausalLM": "evil.EvilModel"}
    (model_folder / "config.json").write_text(json.dumps(config))
    (model_folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig as EvilConfig\n"
        "from transformers import LlamaForCausalLM as EvilModel\n")
    model, _ = load_causal_lm(ModelConfig(name_or_path=str(model_folder)))
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()


def test_a_pickled_weights_file_holding_objects_is_refused_not_run(model_folder, tmp_path):
    from alignkit.config.schema import ModelConfig
    from alignkit.models.load import load_causal_lm
    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (model_folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload()}, model_folder / "pytorch_model.bin")
    with pytest.raises(InputError) as e:
        load_causal_lm(ModelConfig(name_or_path=str(model_folder)))
    assert "could run code" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_yaml_python_tags_are_refused_not_run(tmp_path):
    from alignkit.config.load import read_yaml
    marker = tmp_path / "yaml-ran"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(InputError, match="invalid YAML"):
        read_yaml(cfg)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Run folders: safetensors only, no secrets


SECRETS = {"HF_TOKEN": "hf_SECRETtoken0123456789", "OPENAI_API_KEY": "sk-SECRETkey0123456789",
           "HUGGING_FACE_HUB_TOKEN": "hf_SECRETother0123456789"}


def test_a_run_folder_holds_safetensors_weights_and_no_secrets(tmp_path, monkeypatch, capsys):
    from alignkit.cli.main import main
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "response": f"{i}!"}) + "\n"
                            for i in range(8)))
    out = tmp_path / "run"
    main(["sft", "--model", "tiny", "--data", str(data), "--output", str(out), "--max-steps",
          "3", "--batch-size", "2", "--set", "train.save_every=1", "--set",
          "train.progress=false", "--set", "data.eval_fraction=0"])
    logged = capsys.readouterr()
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert "model.safetensors" in names
    assert not [p for p in files if p.suffix in (".bin", ".pkl", ".pickle", ".pth", ".ckpt")]
    for p in files:
        if p.suffix == ".pt":  # checkpoint state: tensors and numbers only
            assert "checkpoints" in p.parts
            torch.load(p, weights_only=True)
    for p in [*files]:
        text = p.read_bytes()
        for secret in SECRETS.values():
            assert secret.encode() not in text, f"{secret} written to {p}"
    for secret in SECRETS.values():
        assert secret not in logged.out + logged.err


def test_endpoint_credentials_are_never_shown(monkeypatch):
    from alignkit.models.endpoint import parse_model_spec
    name, endpoint = parse_model_spec("judge=https://user:pw-SECRET@example.org:8443/v1"
                                      "?api_key=q-SECRET#big-model")
    shown = endpoint.describe() + repr(endpoint) + name
    assert "SECRET" not in shown and "example.org:8443/v1#big-model" in shown
    with pytest.raises(AlignkitError) as e:  # a bad spec is echoed without its credentials
        parse_model_spec("https://user:pw-SECRET@example.org/v1?key=q-SECRET")
    assert "SECRET" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# serve


def test_serve_binds_loopback_unless_told_and_compares_keys_in_constant_time(monkeypatch):
    import http.client

    import typer

    from alignkit.cli import main as cli
    from alignkit.engine.device import Runtime
    from alignkit.models import serve
    from alignkit.models.tiny import tiny_model, tiny_tokenizer

    command = typer.main.get_command(cli.app).commands["serve"]
    host = next(p for p in command.params if p.name == "host")
    assert host.default == "127.0.0.1" and serve.DEFAULT_HOST == "127.0.0.1"

    compared = []
    real = serve.hmac.compare_digest
    monkeypatch.setattr(serve.hmac, "compare_digest",
                        lambda a, b: compared.append(1) or real(a, b))
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", "sk-serve-SECRET")
    logs: list[str] = []
    with serve.make_server(tiny_model(seed=0).eval(), tiny_tokenizer(), port=0,
                           runtime=Runtime(torch.device("cpu"), None),
                           api_key_env="ALIGNKIT_TEST_KEY", log=logs.append) as srv:
        assert srv.server_address[0] == "127.0.0.1"
        host_, port = srv.server_address[:2]
        body = json.dumps({"messages": [{"role": "user", "content": "body-SECRET"}],
                           "max_tokens": 2}).encode()
        for key in ("wrong-SECRET", "sk-serve-SECRET"):
            conn = http.client.HTTPConnection(host_, port, timeout=10)
            conn.request("POST", "/v1/chat/completions", body=body,
                         headers={"Authorization": f"Bearer {key}",
                                  "Content-Type": "application/json"})
            reply = conn.getresponse()
            text = reply.read().decode()
            conn.close()
            assert "SECRET" not in text  # neither the key nor the prompt is echoed back
        assert reply.status == 200
    assert len(compared) == 2
    assert len(logs) == 2 and not any("SECRET" in line for line in logs)
