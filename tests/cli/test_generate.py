import json

import pytest

from alignkit.cli.main import main


def test_generate_from_arguments_and_file_writes_jsonl(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    out = tmp_path / "out.jsonl"
    main(["generate", "--model", "tiny", "hello there", "--file", str(prompts),
          "--max-new-tokens", "5", "--template", "inst", "--output", str(out)])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["hello there", "first prompt", "second prompt"]
    assert all(r["tokens"] <= 5 and isinstance(r["response"], str) for r in rows)
    assert not list(tmp_path.glob("*.tmp"))


def test_generate_lab_prompts_to_stdout_is_deterministic(capsys):
    main(["generate", "--model", "tiny", "--lab", "--max-new-tokens", "4"])
    first = capsys.readouterr().out
    main(["generate", "--model", "tiny", "--lab", "--max-new-tokens", "4"])
    assert capsys.readouterr().out == first
    rows = [json.loads(x) for x in first.splitlines()]
    assert rows[0]["prompt"] == "Write a haiku about machine learning." and len(rows) == 5


def test_generate_jsonl_prompts_and_errors(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"question": "b"}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "tiny", "--file", str(f)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and f"{f}:2" in err and "prompt" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["generate", "--model", "tiny"])
    assert "no prompts" in capsys.readouterr().err
