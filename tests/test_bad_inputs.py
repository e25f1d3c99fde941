"""The bad-input corpus (tests/fixtures/bad_inputs/): every malformed file goes through the real
CLI command that reads it, and gets either

- ERROR: exit code 2 and exactly one line on stderr, ``error: <file>[:line]: [field 'x': ]...``,
  no traceback, no finished run; or
- SKIP: a documented, counted skip (empty fields, empty or identical pairs, ranked lists left
  with one response, over-long prompts, truncated examples): exit 0 and the count in the log; or
- ACCEPT: a harmless oddity the loaders document as tolerated (a UTF-8 byte-order mark).

Most cases call ``alignkit.cli.main.main`` in this process (the same code path as the console
script, minus interpreter start-up); a few run as real subprocesses to check the process-level
exit code and stderr.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from alignkit.cli.main import main
from tests.conftest import PYTHON, ROOT, cli_env

CORPUS = Path(__file__).parent / "fixtures" / "bad_inputs"
ERROR, SKIP, ACCEPT = "error", "skip", "accept"

# file: (outcome, pieces the stderr line (ERROR) or the log (SKIP) must hold). The command
# comes from the file name's prefix (see _command).
CASES: dict[str, tuple[str, list[str]]] = {
    # ---- SFT data (alignkit sft)
    "sft_truncated_json.jsonl": (ERROR, [":3:", "malformed JSON"]),
    "sft_truncated_array.json": (ERROR, [":11:", "malformed JSON"]),
    "sft_wrong_type.jsonl": (ERROR, [":2:", "field 'response'", "got int"]),
    "sft_nan_literal.jsonl": (ERROR, [":2:", "field 'response'", "got float"]),
    "sft_input_wrong_type.jsonl": (ERROR, [":1:", "field 'input'"]),
    "sft_missing_field.jsonl": (ERROR, [":3:", "field 'response'", "missing"]),
    "sft_empty_response.jsonl": (SKIP, ["skipped 1 records with an empty field",
                                        "sft_empty_response.jsonl:2: field 'response'"]),
    "sft_all_empty.jsonl": (ERROR, ["no usable records"]),
    "sft_empty_file.jsonl": (ERROR, ["no records found"]),
    "sft_blank_lines_only.jsonl": (ERROR, ["no records found"]),
    "sft_not_an_object.jsonl": (ERROR, [":2:", "expected a JSON object, got an array"]),
    "sft_mixed_formats.jsonl": (ERROR, [":2:", "mixed formats"]),
    "sft_unknown_format.jsonl": (ERROR, [":1:", "unknown data format", "question"]),
    "sft_bad_role.jsonl": (ERROR, [":1:", "field 'messages[1].role'", "'bot'"]),
    "sft_no_assistant_turn.jsonl": (ERROR, [":2:", "the last turn must be assistant"]),
    "sft_messages_not_a_list.jsonl": (ERROR, [":1:", "field 'messages'"]),
    "sft_top_level_object.json": (ERROR, ["expected a JSON array"]),
    "sft_deeply_nested.jsonl": (ERROR, [":1:", "nested too deeply"]),
    "sft_deeply_nested_array.json": (ERROR, ["nested too deeply"]),
    "sft_control_char.jsonl": (ERROR, [":2:", "Invalid control character"]),
    "sft_lone_surrogate.jsonl": (ERROR, [":2:", "field 'instruction'", "surrogate"]),
    "sft_ragged_row.csv": (ERROR, [":3:", "3 fields but the header has 2"]),
    "sft_duplicate_header.csv": (ERROR, [":1:", "unique"]),
    "sft_unterminated_quote.csv": (ERROR, [":2:", "1 fields but the header has 2"]),
    "sft_nul_byte.csv": (ERROR, [":3:", "NUL byte"]),
    "sft_utf16.csv": (ERROR, [":1:", "not valid UTF-8"]),
    "sft_corrupt.parquet": (ERROR, ["not a readable parquet file"]),
    "sft_wrong_extension.tsv": (ERROR, ["unknown file type '.tsv'"]),
    "sft_bom.jsonl": (ACCEPT, []),
    # ---- preference data (alignkit reward): pairs, HH transcripts, ranked lists
    "pref_truncated_json.jsonl": (ERROR, [":2:", "malformed JSON"]),
    "pref_wrong_type.jsonl": (ERROR, [":2:", "field 'chosen'", "got int"]),
    "pref_missing_rejected.jsonl": (ERROR, [":2:", "field 'rejected'", "is null"]),
    "pref_bad_margin.jsonl": (ERROR, [":2:", "field 'margin'", "'big'"]),
    "pref_label_out_of_range.jsonl": (ERROR, [":1:", "field 'label'", "1.5"]),
    "pref_mixed_formats.jsonl": (ERROR, [":2:", "mixed formats"]),
    "pref_missing_column.csv": (ERROR, [":2:", "unknown preference data format"]),
    "pref_non_utf8.csv": (ERROR, [":2:", "not valid UTF-8 (byte 0xe9)"]),
    "pref_utf16_no_bom.jsonl": (ERROR, [":1:", "NUL byte"]),
    "pref_lone_surrogate.jsonl": (ERROR, [":1:", "field 'chosen'", "surrogate"]),
    "pref_empty_and_identical.jsonl": (SKIP, ["4 records: 2 kept, 2 dropped (empty_chosen: 1, "
                                              "identical: 1)"]),
    "hh_no_assistant_turn.jsonl": (ERROR, [":2:", "field 'chosen'", "no final 'Assistant:'"]),
    "hh_text_before_human.jsonl": (ERROR, [":1:", "field 'chosen'", "text before"]),
    "hh_starts_with_assistant.jsonl": (ERROR, [":1:", "field 'chosen'", "start with a 'Human:'"]),
    "ranked_duplicate_ranks.jsonl": (ERROR, [":2:", "field 'ranking'", "appears twice"]),
    "ranked_index_out_of_range.jsonl": (ERROR, [":1:", "field 'ranking'", "out of range"]),
    "ranked_scores_wrong_length.jsonl": (ERROR, [":1:", "field 'scores'"]),
    "ranked_ranking_and_scores.jsonl": (ERROR, [":1:", "field 'ranking'", "both given"]),
    "ranked_responses_not_a_list.jsonl": (ERROR, [":1:", "field 'responses'"]),
    "ranked_too_few_responses.jsonl": (SKIP, ["1 dropped (too_few_responses: 1)",
                                              "1 responses removed (duplicate_response: 1)"]),
    # ---- RLHF prompts (alignkit ppo, data.max_prompt_length=200)
    "prompts_too_long.jsonl": (SKIP, ["2 distinct from 3", "1 longer than 200 tokens dropped"]),
    "prompts_all_too_long.jsonl": (ERROR, ["no usable prompt"]),
    "prompts_wrong_type.jsonl": (ERROR, [":2:", "field 'prompt'"]),
    "prompts_empty_prompt.jsonl": (ERROR, [":2:", "field 'prompt'"]),
    "prompts_ends_with_assistant.jsonl": (ERROR, [":1:", "the last turn must be user"]),
    # ---- prompt files of alignkit generate --file
    "generate_bom.txt": (ACCEPT, []),
    "generate_non_utf8.txt": (ERROR, [":2:", "not valid UTF-8"]),
    "generate_missing_prompt.jsonl": (ERROR, [":2:", "field 'prompt'"]),
    # ---- pre-training text (alignkit pretrain)
    "pretrain_wrong_type.jsonl": (ERROR, [":2:", "field 'text'", "got list"]),
    "pretrain_empty.txt": (ERROR, ["no documents found"]),
    # ---- config YAML (alignkit sft --config)
    "config_unknown_key.yaml": (ERROR, ["unknown key 'train.learning_rate'"]),
    "config_wrong_type.yaml": (ERROR, ["key 'train.batch_size'", "lots"]),
    "config_negative_lr.yaml": (ERROR, ["key 'train.lr'", "greater than 0"]),
    "config_invalid_yaml.yaml": (ERROR, [":3:", "invalid YAML"]),
    "config_tab_indent.yaml": (ERROR, [":2:", "invalid YAML"]),
    "config_truncated.yaml": (ERROR, [":3:", "invalid YAML"]),
    "config_not_a_mapping.yaml": (ERROR, ["must be a mapping"]),
    "config_non_utf8.yaml": (ERROR, [":1:", "not UTF-8 (byte 0xe9)"]),
    "config_python_tag.yaml": (ERROR, [":1:", "invalid YAML", "python/object/apply"]),
    "config_deeply_nested.yaml": (ERROR, ["nested too deeply"]),
    "config_billion_laughs.yaml": (ERROR, ["expands to more than 100,000 values"]),
    "config_recursive_alias.yaml": (ERROR, ["refers to itself"]),
    "config_empty_data_path.yaml": (ERROR, ["field 'data.path'", "empty"]),
    "config_bom.yaml": (ACCEPT, []),
    # ---- pipeline YAML (alignkit run --dry-run)
    "pipeline_unknown_kind.yaml": (ERROR, [":4:", "stage 'sft'", "unknown stage kind 'sfft'"]),
    "pipeline_cycle.yaml": (ERROR, ["cycle: a → b → a"]),
    "pipeline_unknown_stage_ref.yaml": (ERROR, [":5:", "no stage named 'sft'"]),
    "pipeline_bad_config_value.yaml": (ERROR, [":7:", "config.train.max_steps"]),
    "pipeline_deeply_nested.yaml": (ERROR, ["nested too deeply"]),
    "pipeline_billion_laughs.yaml": (ERROR, ["expands to more than 100,000 values"]),
}

# Generated at test time (a huge line would bloat the repository): (file, text, outcome, pieces)
HUGE = "word " * 40_000  # 200 kB on one line, thousands of tokens over max_length
GENERATED = {
    "sft_huge_line.jsonl": (
        [{"instruction": "Say hi.", "response": "Hi!"}, {"instruction": HUGE, "response": "Ok."},
         {"instruction": "Say bye.", "response": "Bye!"}], SKIP, ["(1 truncated)"]),
    "pref_huge_line.jsonl": (
        [{"prompt": "Pick.", "chosen": "A.", "rejected": "B."},
         {"prompt": HUGE, "chosen": "Yes.", "rejected": "No."},
         {"prompt": "Choose.", "chosen": "C.", "rejected": "D."}], SKIP, ["(1 truncated)"]),
}

TRAIN = ["--model", "tiny", "--max-steps", "1", "--batch-size", "1",
         "--set", "train.progress=false", "--set", "train.device=cpu"]


def _command(path: Path, out: Path) -> list[str]:
    kind = path.name.split("_")[0]
    match kind:
        case "sft" | "pretrain":
            return [kind, "--data", str(path), "--output", str(out), *TRAIN]
        case "pref" | "hh" | "ranked":
            return ["reward", "--data", str(path), "--output", str(out), *TRAIN]
        case "prompts":
            return ["ppo", "--data", str(path), "--output", str(out), *TRAIN,
                    "--reward-fn", "alignkit.assets.rewards:brevity", "--rollout-prompts", "1",
                    "--max-new-tokens", "4", "--set", "data.max_prompt_length=200"]
        case "generate":
            return ["generate", "--file", str(path), "--model", "tiny", "--max-new-tokens", "2"]
        case "config":  # no flags that would override the file's own values
            return ["sft", "--config", str(path), "--model", "tiny", "--output", str(out)]
        case "pipeline":
            return ["run", str(path), "--dry-run", "--output", str(out)]
    raise AssertionError(f"no command for {path.name}")


def _run(capsys, args: list[str]) -> tuple[int, str, str]:
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _check(path: Path, out: Path, outcome: str, pieces: list[str], code: int, stdout: str,
           stderr: str) -> None:
    assert "Traceback" not in stderr + stdout
    if outcome == ERROR:
        assert code == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert lines[0].startswith("error: ")
        if not path.name.startswith("config_empty_data_path"):  # names the key, not a file
            assert str(path) in lines[0]
        for piece in pieces:
            assert piece in lines[0], lines[0]
        assert not (out / "DONE").exists()
    else:
        assert code == 0, stderr
        log = stdout + stderr
        for piece in pieces:
            assert piece in log, log[-2000:]


def test_the_corpus_is_complete():
    on_disk = {p.name for p in CORPUS.iterdir() if p.name != "README.md"}
    assert on_disk == set(CASES)  # every file has its expected outcome, and only those
    assert len(CASES) + len(GENERATED) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_bad_input_is_one_line_or_a_counted_skip(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a pipeline's relative paths land here
    outcome, pieces = CASES[name]
    path = CORPUS / name
    if name == "config_bom.yaml":  # valid but for its BOM: no need to train to prove that
        from alignkit.config.load import build_config
        from alignkit.config.schema import SFTConfig
        assert build_config(SFTConfig, path=path).train.lr == 0.001
        return
    code, stdout, stderr = _run(capsys, _command(path, tmp_path / "out"))
    _check(path, tmp_path / "out", outcome, pieces, code, stdout, stderr)
    if name == "generate_bom.txt":  # the byte-order mark must not end up in the prompt
        first = json.loads(stdout.splitlines()[0])
        assert first["prompt"] == "What is 2+2?"


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_huge_lines_are_truncated_and_counted(name, tmp_path, capsys):
    records, outcome, pieces = GENERATED[name]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, stdout, stderr = _run(capsys, _command(path, tmp_path / "out"))
    _check(path, tmp_path / "out", outcome, pieces, code, stdout, stderr)


@pytest.mark.parametrize("name", ["sft_truncated_json.jsonl", "config_python_tag.yaml",
                                  "hh_no_assistant_turn.jsonl"])
def test_a_real_process_exits_2_with_one_line(name, tmp_path):
    path = CORPUS / name
    args = _command(path, tmp_path / "out")
    proc = subprocess.run([PYTHON, "-m", "alignkit.cli.main", *args], env=cli_env(),
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}")
    if name == "config_python_tag.yaml":  # yaml.safe_load: the tag was refused, not run
        assert not Path("/tmp/alignkit-owned").exists()
