import pytest

from alignkit.config import SFTConfig, build_config, dump_config, parse_override, read_yaml
from alignkit.errors import InputError


def test_defaults_file_and_overrides_layer(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.001\n  batch_size: 4\ndata:\n  template: inst\n")
    cfg = build_config(SFTConfig, path=f, overrides={"train.lr": 0.5})
    assert cfg.train.lr == 0.5 and cfg.train.batch_size == 4 and cfg.data.template == "inst"
    assert cfg.train.epochs == 1.0  # schema default


def test_unknown_key_is_named_with_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(InputError) as e:
        build_config(SFTConfig, path=f)
    assert str(e.value) == f"{f}: unknown key 'train.lrr'"


def test_wrong_type_is_one_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  batch_size: many\n")
    with pytest.raises(InputError) as e:
        build_config(SFTConfig, path=f)
    assert "key 'train.batch_size'" in str(e.value) and "\n" not in str(e.value)


def test_bad_yaml_names_the_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: [1, 2\n  x: 3\n")
    with pytest.raises(InputError) as e:
        read_yaml(f)
    assert str(e.value).startswith(f"{f}:") and "invalid YAML" in str(e.value)


def test_missing_and_non_mapping(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        read_yaml(tmp_path / "nope.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="must be a mapping"):
        read_yaml(f)


def test_accumulation_must_divide_batch():
    with pytest.raises(InputError, match="multiple of grad_accum"):
        build_config(SFTConfig, overrides={"train.batch_size": 6, "train.grad_accum": 4})


def test_override_parsing_reads_yaml_values():
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override("model.lora.enabled=true") == ("model.lora.enabled", True)
    assert parse_override("model.lora.target_modules=[q_proj, v_proj]")[1] == ["q_proj", "v_proj"]
    with pytest.raises(InputError):
        parse_override("no-equals")


def test_dump_round_trips(tmp_path):
    cfg = build_config(SFTConfig, overrides={"train.lr": 0.25, "model.lora.enabled": True})
    dump_config(cfg, tmp_path / "config.yaml")
    again = build_config(SFTConfig, path=tmp_path / "config.yaml")
    assert again == cfg


def test_overriding_one_key_keeps_the_stage_defaults_of_its_section(tmp_path):
    from alignkit.config import DPOConfig
    cfg = build_config(DPOConfig, overrides={"train.max_steps": 5})
    assert cfg.train.lr == 1e-6 and cfg.train.max_steps == 5  # DPO's lr, not TrainConfig's
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  batch_size: 2\n")
    assert build_config(DPOConfig, path=f).train.lr == 1e-6
