"""Smoke test of bench.py: a --quick run on the micro config prints the table and appends a JSON line.

Speed targets are NOT asserted: timings on shared CI machines are too noisy (the real figures come from a full run).
"""

import json

import pytest

pytest.importorskip("transformers", reason="bench.py compares against transformers")

import bench  # noqa: E402


def test_bench_quick(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    rec = bench.main(["--quick", "--config=micro", "--threads=1", "--batches=1,2", "--best_of=2",
                      "--train_batch=2", "--train_len=16", f"--results={out}"])
    text = capsys.readouterr().out
    assert "| measurement | ours | reference (HF) | ratio |" in text and "best-of-2 / best-of-1 cost" in text
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    saved = json.loads(lines[0])
    assert saved["threads"] == 1 and saved["torch"] and saved["device"] == "cpu"
    rows = saved["configs"]["micro"]["rows"]
    assert [r["row"] for r in rows] == ["train step (2x16)", "decode 16 b1", "decode 16 b2", "decode 64 b1",
                                        "decode 64 b2", "best-of-1 (64 tok)", "best-of-2 (64 tok)"]
    for r in rows:
        assert r["ratio"] > 0 and r["s_ours"] > 0 and r["s_ref"] > 0
        assert r["mib_ours"] is not None and r["mib_ours"] >= 0 and r["mib_ref"] >= 0
    assert rec["configs"]["micro"]["rows"][0]["tok_s_ours"] > 0


def test_cli_rejects_unknown_keys():
    with pytest.raises(SystemExit):
        bench.parse_args(["--no_such_key=1"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--config=huge"])


def test_cli_is_the_common_parser():
    """bench.py's flags go through common.parse_config like every script's: a bare boolean flag means true, and
    --key=value works for booleans too."""
    assert bench.parse_args(["--quick"]).quick is True and bench.parse_args(["--quick=true"]).reps == 1
    assert bench.parse_args(["--quick=false"]).quick is False and bench.parse_args([]).reps == 3
    with pytest.raises(SystemExit):
        bench.parse_args(["--quic"])  # abbreviations fail
