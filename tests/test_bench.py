"""Smoke test of bench.py: a --quick run on the micro config prints the table and appends a JSON line.

Speed targets are NOT asserted: timings on shared CI machines are too noisy (the real figures come from a full run).
"""

import json

import pytest
import torch

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


def test_speed_rows_against_transformers_in_fp32(capsys):
    """--speed's first rows at a micro size: ours vs transformers in --dtype=float32, with the training step's MFU
    against this CPU's fp32 matrix-product peak (the report's denominator), decode at batch 1 and 64, best-of-8."""
    args = bench.parse_args(["--dtype=float32", "--threads=1", "--quick", "--no_memory"])
    rows = bench.speed_vs_transformers(args, config="micro", batch=2, length=16, n=16)
    assert [r["row"] for r in rows] == ["train step (2x16)", "decode 16 b1", "decode 16 b64", "best-of-1 (64 tok)",
                                        "best-of-8 (64 tok)"]
    assert rows[0]["peak_flops"] > 0 and 0 < rows[0]["mfu_ours"] < 1 and 0 < rows[0]["mfu_ref"] < 1
    assert "| train MFU (float32, peak" in capsys.readouterr().out


def test_time_table_measures_each_model_against_its_dtypes_peak(monkeypatch):
    """report.time_table: an fp32 run's models against the fp32 peak; a model of another dtype against its own."""
    from types import SimpleNamespace

    import report

    asked = []
    monkeypatch.setattr(report, "peak_matmul_flops", lambda dtype, device: asked.append(dtype) or 1e9)
    cfg = SimpleNamespace(dtype="float32", threads=1)
    runs = {"dm": {"seconds": 10, "tokens_per_s": 1000, "flops_per_token": 2e5},  # 0.2 GFLOP/s of 1: 20%
            "pretrain": {"seconds": 5, "tokens_per_s": 1000, "flops_per_token": 1e5, "dtype": "bfloat16"}}
    lines = report.time_table(cfg, [{"runs": runs}], SimpleNamespace(seconds={}), torch.device("cpu"))
    assert asked == ["float32", "bfloat16"]
    assert any("float32 matrix product" in line for line in lines)
    assert "| rep0/dm | 10 | 1000 | 0.20 | 20% |" in lines
    assert "| rep0/pretrain | 5 | 1000 | 0.10 | 10% (bfloat16) |" in lines
