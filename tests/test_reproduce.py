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


@pytest.mark.slow
def test_parallel_fine_tuning_jobs_give_the_same_models(tmp_path):
    """--jobs only changes the wall time: each run is seeded on its own, so the weights are bit-identical."""
    import shutil

    import reproduce

    a, b = tmp_path / "a", tmp_path / "b"
    reproduce.main(["--preset=smoke", f"--out={a}", "--jobs=1"])
    shutil.copytree(a, b)  # reuse the data, tokenizers and pre-trained model; redo every per-seed stage
    shutil.rmtree(b / "seed0")
    for f in (b / "stages").glob("seed0*"):
        f.unlink()
    reproduce.main(["--preset=smoke", f"--out={b}", "--jobs=2"])
    for run in ("dm", "wm0", "wm1", "wm2", "wm3"):
        w = [(root / "seed0" / run / "ckpt" / "model.safetensors").read_bytes() for root in (a, b)]
        assert w[0] == w[1], run
    assert (a / "report.md").read_text().split("## Setup")[1] == (b / "report.md").read_text().split("## Setup")[1]


def _simulated(effect: float, reps: int, rng, items: int = 350):
    """Scores 0 or 10 per item, as the judge mostly gives: item i is solved with probability p_i by arm B and
    p_i + effect by arm A, independently in each replicate (a null when effect = 0)."""
    import numpy as np

    p = rng.uniform(0, 1, items)
    a = [(10 * (rng.uniform(size=items) < np.clip(p + effect, 0, 1))).tolist() for _ in range(reps)]
    b = [(10 * (rng.uniform(size=items) < p)).tolist() for _ in range(reps)]
    return a, b


@pytest.mark.parametrize("reps", [1, 3])
def test_verdict_rule_false_positives_and_power(reps):
    """On null data the rule says "shown" at most 5% of the time (it is a two-sided 95% interval plus sign agreement,
    so about 2.5% is expected); on a true effect of +0.1 solved items (1 point of score) it says so most of the
    time."""
    import numpy as np

    from reproduce import paired_interval, verdict

    rng = np.random.default_rng(0)
    sims = 200
    null = [verdict(paired_interval(*_simulated(0.0, reps, rng), n_boot=1000, seed=k)) for k in range(sims)]
    power = [verdict(paired_interval(*_simulated(0.1, reps, rng), n_boot=1000, seed=k)) for k in range(sims)]
    fpr = null.count("shown") / sims
    print(f"replicates {reps}: false-positive rate {fpr:.3f}, power at +1 point {power.count('shown') / sims:.2f}")
    assert fpr <= 0.05
    assert power.count("shown") / sims >= (0.8 if reps == 1 else 0.95)


def test_paired_interval_on_a_hand_made_case():
    from reproduce import paired_interval, verdict

    iv = paired_interval([[10, 10, 0, 10]], [[0, 10, 0, 0]], n_boot=2000)
    assert iv["diff"] == 5.0 and iv["per_replicate"] == [5.0] and iv["mean_a"] == 7.5 and iv["mean_b"] == 2.5
    assert 0 <= iv["lo"] <= 5 <= iv["hi"] <= 10
    # replicates disagreeing in sign: never "shown", whatever the interval
    assert verdict({"lo": 0.1, "hi": 1.0, "per_replicate": [0.5, -0.1]}) == "not shown"
    assert verdict({"lo": 0.1, "hi": 1.0, "per_replicate": [0.5, 0.2]}) == "shown"
    assert verdict({"lo": -1.0, "hi": -0.1, "per_replicate": [-0.5]}) == "reversed"


def test_token_locality_on_a_hand_made_pair():
    import torch

    import world
    from data import Item
    from reproduce import token_locality

    src = world.Scene((world.Obj(0, 0, "red", "square"), world.Obj(3, 3, "blue", "circle")))
    tgt = world.Scene((world.Obj(0, 1, "red", "square"), world.Obj(3, 3, "blue", "circle")))  # moved right
    it = Item(id="a", input_path="s.png", instruction="move the red square right", output_path="t.png", task="world",
              extra={"src_scene": src.to_json(), "tgt_scene": tgt.to_json(), "grid": 4})
    cs, ct = torch.arange(16), torch.arange(16)
    ct[5] = 99  # one unchanged cell flips its code
    fs, ft = torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)
    ft[0, 0, 0] = ft[0, 0, 1] = 1.0  # features differ only on the two changed cells
    res = token_locality([it], {"s.png": (cs, fs), "t.png": (ct, ft)})
    assert res["unchanged_code_kept"] == 13 / 14
    assert res["eq2_changed"] == 8.0 and res["eq2_unchanged"] == 0.0  # mean-1 weights: 16 / 2 on the changed cells


@pytest.mark.slow
def test_numbers_do_not_depend_on_the_core_count(tmp_path):
    """The smoke pipeline on one core and on two (`taskset`-style affinity) gives byte-identical stage outputs and
    report tables: every stage computes with the same recorded thread count, whatever the machine offers. (With
    torch's default thread count, one per usable core, the VQGAN came out different on 1 and 2 cores.)"""
    import json
    import subprocess
    import sys

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two usable cores")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"cores{n}"
        subprocess.run([sys.executable, "reproduce.py", "--preset=smoke", f"--out={out}"], cwd=repo, check=True,
                       capture_output=True, preexec_fn=lambda n=n: os.sched_setaffinity(0, cores[:n]))
        prov = json.loads((out / "results.json").read_text())["provenance"]
        runs[n] = (prov, (out / "report.md").read_text().split("## Setup")[1])
    (p1, r1), (p2, r2) = runs[1], runs[2]
    assert p1["stage_hashes"] == p2["stage_hashes"] and "-" not in str(p1["stage_hashes"].values())
    assert p1["tables"] == p2["tables"] and r1 == r2


def test_seed_results_depend_on_the_best_of_n_sizes_but_training_does_not():
    import dataclasses

    from reproduce import ReproConfig, Stages

    a, b = ReproConfig(), dataclasses.replace(ReproConfig(), search_n="1,2")
    sa, sb = Stages.__new__(Stages), Stages.__new__(Stages)
    sa.cfg, sb.cfg = a, b
    assert sa.hash("seed0") != sb.hash("seed0")  # a cached seed result without the new N is recomputed
    assert sa.hash("seed0_dm") == sb.hash("seed0_dm") and sa.hash("pretrain") == sb.hash("pretrain")


def test_a_stage_folder_is_deleted_only_when_ours_and_stale(tmp_path, capsys, tiny_tok):
    import torch

    from common import MARKER, UserError
    from reproduce import ReproConfig, Stages, run_training, train_cfg

    cfg = ReproConfig(out=str(tmp_path))
    stages = Stages(str(tmp_path), cfg)
    tcfg = train_cfg(cfg, "seed0/dm", "dm", 2, 0)
    os.makedirs(tcfg.out_dir)
    (tmp_path / "seed0" / "dm" / "notes.txt").write_text("mine")  # a folder reproduce.py did not write
    with pytest.raises(UserError, match="not written by worldboot"):
        run_training(cfg, stages, "seed0_dm", tcfg, [], tiny_tok, torch.device("cpu"))
    assert (tmp_path / "seed0" / "dm" / "notes.txt").read_text() == "mine"
    (tmp_path / "seed0" / "dm" / MARKER).write_text("")  # now ours, from a run with other settings
    (tmp_path / "seed0" / "dm" / "stage_hash.txt").write_text("other")
    with pytest.raises(UserError, match="no examples"):  # (nothing to train on here)
        run_training(cfg, stages, "seed0_dm", tcfg, [], tiny_tok, torch.device("cpu"))
    assert "trained with other settings: deleting it" in capsys.readouterr().out
    assert not (tmp_path / "seed0" / "dm" / "notes.txt").exists()


def test_best_of_n_for_every_n_comes_from_one_pool():
    """Best-of-k = the DM's pick among the first k candidates of the one pool (the first on ties), with that
    candidate's judge record; N = 1 is the first candidate."""
    from data import Item
    from reproduce import best_of_pool, pick

    items = [Item(id=f"i{i}", input_path="-", instruction="x", output_path="-", task="world") for i in range(2)]
    controls = [{"dm": [1.0, 0.0, 3.0, 3.0], "judge": [0, 10, 5, 7]},
                {"dm": [0.0, 2.0, 2.0, 1.0], "judge": [4, 6, 8, 1]}]
    judged = [[{"id": f"i{i}", "task": "world", "score": j, "success": j} for j in c["judge"]]
              for i, c in enumerate(controls)]
    metrics, records = best_of_pool(items, controls, judged, [1, 2, 4])
    assert [r["score"] for r in records["1"]] == [0, 4] and [r["score"] for r in records["2"]] == [0, 6]
    assert [r["score"] for r in records["4"]] == [5, 6] == pick(controls, 4, "dm")
    assert metrics["4"]["all"]["score"] == 5.5 and metrics["4"]["world"]["n"] == 2


def test_best_of_n_pickers_on_hand_made_candidates():
    from reproduce import pick

    recs = [{"judge": [0, 10, 5], "dm": [1.0, 0.0, 3.0], "wm": [0.0, 2.0, 1.0]}]
    assert pick(recs, 3, "random") == [5.0] and pick(recs, 3, "oracle") == [10]
    assert pick(recs, 3, "dm") == [5] and pick(recs, 3, "wm") == [10]
    assert pick(recs, 2, "dm") == [0] and pick(recs, 1, "oracle") == [0]  # only the first k candidates count
