import json

from alignkit.cli.main import main


def test_quick_demo_end_to_end_and_rerun_skips_finished_work(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--quick", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "demo finished" in printed and "How do I pick a lock?" in printed
    for name in ("answers_before.jsonl", "answers_after.jsonl"):
        rows = [json.loads(x) for x in (out / name).read_text().splitlines()]
        assert [r["prompt"] for r in rows][0] == "Write a haiku about machine learning."
        assert len(rows) == 5
    assert (out / "sft" / "DONE").is_file() and (out / "answers.md").is_file()
    before = (out / "answers_after.jsonl").read_text()
    main(["demo", "--quick", "--output", str(out)])
    again = capsys.readouterr().out
    assert "already complete" in again
    assert (out / "answers_after.jsonl").read_text() == before
