"""The whole pipeline at the `smoke` preset (slow: run with `python -m pytest -m slow`)."""

import os

import pytest


@pytest.mark.slow
def test_reproduce_smoke_end_to_end(tmp_path):
    import reproduce

    out = tmp_path / "out"
    reproduce.main(["--preset=smoke", f"--out={out}", "--seeds=0,1"])
    report = (out / "report.md").read_text()
    for heading in ("Table 1", "Table 2", "Table 3", "Table 4", "Best-of-N", "Findings"):
        assert heading in report
    for png in ("examples.png", "search_example.png", "best_of_n.png"):
        assert os.path.getsize(out / png) > 0
    # stages are cached: a second run reuses everything and rewrites the same tables
    reproduce.main(["--preset=smoke", f"--out={out}", "--seeds=0,1"])
    assert (out / "report.md").read_text().split("## Setup")[1] == report.split("## Setup")[1]
