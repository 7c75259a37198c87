"""The README a reader finishes: short, current (its generated blocks are what `python report.py` renders from the
code and the committed reference runs), with the full-scale commands the rehearsal runs."""

import os
import re

import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_readme_is_short():
    assert README.count("\n") <= 300


def test_readme_is_its_render():
    """Fails when code moved (line ranges, line counts) or a reference run changed without `python report.py`."""
    assert README == report.render_readme(README), "README.md differs from its render: run python report.py"
    assert open(os.path.join(ROOT, "docs", "results.md")).read() == report.results_doc(), "run python report.py"
    premise = open(os.path.join(ROOT, "docs", "premise.md")).read()
    assert premise == report.render_premise(premise), "docs/premise.md differs from its render: run python report.py"


def test_eq2_is_a_minute_from_the_top():
    """A newcomer reaches the function implementing Eq. 2 from the README's top: a link in the first 100 lines."""
    line = next(i for i, ln in enumerate(README.split("\n")) if "recognition_weights" in ln)
    assert line < 100
    f, a, b = report.code_span("train_world.recognition_weights")
    assert f"({f}#L{a}-L{b})" in README.split("\n")[line]
    assert "def recognition_weights" in open(os.path.join(ROOT, f)).read().split("\n")[a - 1]


def test_code_map_spans_are_the_objects():
    for _, obj, _ in report.CODE_MAP:
        f, a, b = report.code_span(obj)
        lines = open(os.path.join(ROOT, f)).read().split("\n")[a - 1:b]
        head = next(ln for ln in lines if not ln.lstrip().startswith("@"))  # after the decorators
        assert re.match(rf"\s*(def|class) {obj.split('.')[-1]}\b", head), obj


def test_no_issue_numbers_or_stale_paths():
    assert not re.search(r"\bissue \d+", README, re.I)
    assert "../shared" not in README
    for path in re.findall(r"\]\(([\w./-]+)\)", README):  # every relative link points at a file of the repo
        if not path.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, path.split("#")[0])), path


def test_against_reference_without_one(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "REFERENCE_DIR", str(tmp_path))
    lines = report.against_reference({"preset": "smoke", "dtype": "float32"}, [], "abc")
    assert any("No reference run" in ln for ln in lines)


def test_against_reference_compares_verdicts_and_intervals(tmp_path, monkeypatch):
    import gzip
    import json

    def finding(what, diff, lo, hi):
        return {"what": what, "metric": "score", "a": "A", "b": "B", "diff": diff, "lo": lo, "hi": hi,
                "per_replicate": [diff], "mean_a": 0.0, "mean_b": 0.0}

    config = {"preset": "laptop", "dtype": "float32", "out": "x", "n_train": 10}
    ref = {"config": {**config, "out": "elsewhere"}, "provenance": {"commit": "abc", "tables": "t1"}, "seconds": 60,
           "replicates": [{}], "findings": [finding("f1", 0.5, 0.2, 0.8), finding("f2", 0.1, -0.2, 0.4)]}
    (tmp_path / "laptop-float32").mkdir()
    with gzip.open(tmp_path / "laptop-float32" / "results.json.gz", "wt") as f:
        json.dump(ref, f)
    (tmp_path / "laptop-float32" / "machine.json").write_text(json.dumps({"command": "python reproduce.py",
                                                                         "cpu": "a CPU"}))
    monkeypatch.setattr(report, "REFERENCE_DIR", str(tmp_path))
    mine = [finding("f1", 0.3, 0.1, 0.5), finding("f2", 0.9, 0.6, 1.2)]  # f1 inside, same verdict; f2 outside
    text = "\n".join(report.against_reference(config, mine, "t2"))
    row = {ln.split(" | ")[0][2:]: ln for ln in text.split("\n") if ln.startswith("| f")}
    assert "| yes | shown | shown |" in row["f1"]
    assert "| **no** | shown | not shown (differs) |" in row["f2"]
    assert "1 of 2 verdicts are the reference's; 1 of 2 of your differences lie inside" in text
    assert "differ from the reference's" in text and "settings differ" not in text  # --out is not a setting
    text = "\n".join(report.against_reference({**config, "n_train": 20}, mine, "t1"))
    assert "byte for byte" in text and "`--n_train`" in text
