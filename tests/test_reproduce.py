"""The whole pipeline at the `smoke` preset (slow: run with `python -m pytest -m slow`)."""

import os

import pytest
from PIL import Image


@pytest.mark.slow
def test_reproduce_smoke_end_to_end(tmp_path):
    import reproduce

    out = tmp_path / "out"
    reproduce.main(["--preset=smoke", f"--out={out}", "--replicates=2"])
    report = (out / "report.md").read_text()
    for heading in ("Table 1", "Learning curves", "Table 2", "Table 3", "Table 4", "Best-of-N", "Findings",
                    "Your run against the reference"):
        assert heading in report
    # replicates vary everything: each has its own world, tokenizers and pre-trained model
    for f in ("data/test.json", "tok/tokenizer.json", "tok/vq/model.safetensors", "pretrain/ckpt/model.safetensors"):
        assert (out / "rep0" / f).read_bytes() != (out / "rep1" / f).read_bytes(), f
    assert {p.name for p in (out / "rep1" / "items").iterdir()} >= {"dm.jsonl", "dm_sampled.jsonl", "wm_c_ft.jsonl"}
    # the pictures have their layout: 32 px images enlarged 4x to 128 px cells with 4 px gaps and a caption line
    # (draw.save_grid); examples: source | C-FT | C-FDM | best-of-2 | target, one 160 px row per action class
    assert Image.open(out / "rep0" / "examples.png").size == (4 + 5 * 132, 7 * 160 + 4)
    assert Image.open(out / "rep0" / "search_example.png").size == (4 + 3 * 132, 18 + 146 + 4)  # source + 2; a title
    assert Image.open(out / "best_of_n.png").size == Image.open(out / "learning_curves.png").size == (420, 260)
    # stages are cached: a second run reuses everything and rewrites the same tables
    reproduce.main(["--preset=smoke", f"--out={out}", "--replicates=2"])
    assert (out / "report.md").read_text().split("## Setup")[1] == report.split("## Setup")[1]


@pytest.mark.slow
def test_parallel_fine_tuning_jobs_give_the_same_models(tmp_path):
    """--jobs only changes the wall time: each run is seeded on its own, so the weights are bit-identical."""
    import shutil

    import reproduce

    a, b = tmp_path / "a", tmp_path / "b"
    reproduce.main(["--preset=smoke", f"--out={a}", "--jobs=1"])
    shutil.copytree(a, b)  # reuse the data, tokenizers and pre-trained model; redo every per-seed stage
    for run in ("dm", "wm_ce", "wm_eq2", "wm_ce_syn", "wm_eq2_syn"):  # redo fine-tuning, bootstrapping, search
        shutil.rmtree(b / "rep0" / run)
    for f in ("finetune", "dm", "wm_ce", "wm_eq2", "wm_ce_syn", "wm_eq2_syn"):
        (b / "rep0" / "stages" / f"{f}.json").unlink()
    reproduce.main(["--preset=smoke", f"--out={b}", "--jobs=2"])
    for run in ("dm", "wm_ce", "wm_eq2", "wm_ce_syn", "wm_eq2_syn"):
        w = [(root / "rep0" / run / "ckpt" / "model.safetensors").read_bytes() for root in (a, b)]
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

    from report import paired_interval, verdict

    rng = np.random.default_rng(0)
    sims = 200
    null = [verdict(paired_interval(*_simulated(0.0, reps, rng), n_boot=1000, seed=k)) for k in range(sims)]
    power = [verdict(paired_interval(*_simulated(0.1, reps, rng), n_boot=1000, seed=k)) for k in range(sims)]
    fpr = null.count("shown") / sims
    print(f"replicates {reps}: false-positive rate {fpr:.3f}, power at +1 point {power.count('shown') / sims:.2f}")
    assert fpr <= 0.05
    assert power.count("shown") / sims >= (0.8 if reps == 1 else 0.95)


def test_paired_interval_on_a_hand_made_case():
    from report import paired_interval, verdict

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
@pytest.mark.parametrize("ranks", [1, 2])
def test_numbers_do_not_depend_on_the_core_count(tmp_path, ranks):
    """The smoke pipeline on one core and on two (`taskset`-style affinity) gives byte-identical stage outputs and
    report tables: every stage computes with the same recorded thread count, whatever the machine offers. (With
    torch's default thread count, one per usable core, the VQGAN came out different on 1 and 2 cores.) On one core,
    with --jobs=1, everything runs in order in one process; on two (default jobs), two worker processes fine-tune the
    DM and the WMs side by side: none of it may change a bit. With --foundation_ranks=2 (one replicate), the VQGAN
    and the pre-training run as 2 rank processes on two cores and as 2 chunks in turn on one."""
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
        jobs = ["--jobs=1"] if n == 1 else []
        jobs += ["--replicates=2"] if ranks == 1 else ["--replicates=1", f"--foundation_ranks={ranks}"]
        subprocess.run([sys.executable, "reproduce.py", "--preset=smoke", f"--out={out}", *jobs],
                       cwd=repo, check=True, capture_output=True,
                       preexec_fn=lambda n=n: os.sched_setaffinity(0, cores[:n]))
        prov = json.loads((out / "results.json").read_text())["provenance"]
        runs[n] = (prov, (out / "report.md").read_text().split("## Setup")[1])
    (p1, r1), (p2, r2) = runs[1], runs[2]
    assert p1["stage_hashes"] == p2["stage_hashes"] and "-" not in str(p1["stage_hashes"].values())
    assert p1["tables"] == p2["tables"] and r1 == r2


def test_seed_results_depend_on_the_best_of_n_sizes_but_training_does_not(tmp_path):
    import dataclasses

    from reproduce import ReproConfig, Stages

    a, b = ReproConfig(), dataclasses.replace(ReproConfig(), search_n="1,2")
    sa, sb = Stages(tmp_path, a), Stages(tmp_path, b)
    assert sa.hash("finetune") != sb.hash("finetune")  # a cached result without the new N is recomputed
    assert sa.hash("dm") == sb.hash("dm") and sa.hash("pretrain") == sb.hash("pretrain")
    # so do the learning curves' spacing, which changes what is evaluated, not what is trained
    c = Stages(tmp_path, dataclasses.replace(ReproConfig(), curve_every=100))
    assert c.hash("finetune") != sa.hash("finetune") and c.hash("dm") == sa.hash("dm")
    # another reading of Eq. 2 retrains the weighted WMs only; a candidate's reading is in its stage name
    e = Stages(tmp_path, dataclasses.replace(ReproConfig(), weight_mix=0.25, weight_norm="batch"))
    assert all(e.hash(n) == sa.hash(n) for n in ("dm", "wm_ce", "wm_ce_syn", "eq2_select_batch_0.5", "pretrain"))
    assert all(e.hash(n) != sa.hash(n) for n in ("wm_eq2", "wm_eq2_syn", "finetune"))
    f = Stages(tmp_path, dataclasses.replace(ReproConfig(), boot_k=7))
    assert f.hash("wm_ce_syn") != sa.hash("wm_ce_syn") and f.hash("wm_ce") == sa.hash("wm_ce")
    # another replicate (another world) never reuses a stage of this one
    assert all(Stages(tmp_path, a, 1).hash(n) != sa.hash(n) for n in ("vq", "bpe", "pretrain", "dm", "finetune"))


def test_a_stage_folder_is_deleted_only_when_ours_and_stale(tmp_path, capsys, tiny_tok):
    import torch

    from common import MARKER, UserError
    from experiments import train_cfg
    from reproduce import ReproConfig, Stages, run_training

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
    from report import pick
    from reproduce import best_of_pool

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
    from report import pick

    recs = [{"judge": [0, 10, 5], "dm": [1.0, 0.0, 3.0], "wm": [0.0, 2.0, 1.0]}]
    assert pick(recs, 3, "random") == [5.0] and pick(recs, 3, "oracle") == [10]
    assert pick(recs, 3, "dm") == [5] and pick(recs, 3, "wm") == [10]
    assert pick(recs, 2, "dm") == [0] and pick(recs, 1, "oracle") == [0]  # only the first k candidates count


def test_bpe_learns_only_captions_and_train_instructions(tmp_path):
    """The BPE must not see the unlabelled videos' hidden actions (nor val or test): only text the method holds."""
    import json

    import train_tokenizer
    import world

    paths = world.build(tmp_path, world.WorldConfig(n_train=14, n_val=7, n_test=7, n_comp=7, n_videos=6,
                                                    n_captions=10), log=lambda *a: None)
    load = lambda name: json.loads(open(paths[name]).read())
    texts = train_tokenizer.bpe_texts(paths)
    assert sorted(texts) == sorted([c["caption"] for c in load("captions")] + [it["instruction"]
                                                                                 for it in load("train")])
    hidden = {st["instruction"] for v in load("videos_hidden").values() for st in v["steps"] if not st["hold"]}
    assert hidden - set(texts)  # the videos do say things the BPE never reads


def test_eq2_by_motion_on_hand_made_records():
    """Table "Eq. 2 by motion": items grouped by changed cells and distance moved, weighted − standard per group,
    success and minimal apart, paired over items and replicates; an empty group gives no row."""
    from experiments import annotate_motion
    from report import EQ2_PAIRS, by_motion

    motion = {"a": {"cells": 1, "distance": 0}, "b": {"cells": 2, "distance": 1}, "c": {"cells": 2, "distance": 1},
              "d": {"cells": 2, "distance": 3}}
    rec = lambda i, s, m: {"id": i, "success": s, "minimal": m}
    std = [rec("a", 10, 10), rec("b", 0, 10), rec("c", 0, 10), rec("d", 0, 10)]
    wtd = [rec("a", 0, 10), rec("b", 10, 0), rec("c", 10, 10), rec("d", 10, 5)]
    S = [{"items": {"wm": {name: [dict(r) for r in (wtd if k == 1 else std)] for _, *arms in EQ2_PAIRS
                           for k, name in enumerate(arms, 1)}}} for _ in range(2)]  # two replicates, same numbers
    annotate_motion(S, motion)
    assert S[1]["items"]["wm"]["C-FT"][3] == {"id": "d", "success": 0, "minimal": 10, "cells": 2, "distance": 3}
    rows = {(r["data"], r["edits"], r["metric"]): r for r in by_motion(S)}
    assert {e for _, e, _ in rows} == {"one cell changes (add, remove, recolour)",
                                       "two cells change (move, move somewhere, next to, swap)",
                                       "an object moves 1 cell", "an object moves 3 or more cells"}  # none moves 2
    one = rows[("labelled", "one cell changes (add, remove, recolour)", "success")]
    assert one["n"] == 2 and one["diff"] == -10 and one["mean_b"] == 10 and one["per_replicate"] == [-10, -10]
    two = rows[("labelled + synthetic", "two cells change (move, move somewhere, next to, swap)", "minimal")]
    assert two["n"] == 6 and two["diff"] == (-10 + 0 - 5) / 3 and two["mean_a"] == 5
    far = rows[("labelled", "an object moves 3 or more cells", "success")]
    assert far["n"] == 2 and far["diff"] == 10 and far["lo"] == far["hi"] == 10


def test_new_settings_separate_worlds_and_readings():
    """A video-like world (--nuisance) retrains everything from the VQGAN on (the BPE reads the same text); another
    reading of Eq. 2 (--weight_norm) retrains only the WMs; bad --eq2_select lists are refused."""
    import dataclasses

    from common import UserError
    from experiments import parse_candidates
    from reproduce import ReproConfig, Stages

    def hashes(**kw):
        st = Stages.__new__(Stages)
        st.cfg, st.replicate = dataclasses.replace(ReproConfig(), **kw), 0
        return {n: st.hash(n) for n in ("vq", "bpe", "pretrain", "finetune", "wm_eq2")}

    old = hashes()
    video = hashes(nuisance=1.0)
    assert video["bpe"] == old["bpe"] and all(video[n] != old[n] for n in ("vq", "pretrain", "finetune", "wm_eq2"))
    image = hashes(weight_norm="image")
    assert image["pretrain"] == old["pretrain"] and image["wm_eq2"] != old["wm_eq2"]
    assert parse_candidates("image:0.5, batch:0") == [("image", 0.5), ("batch", 0.0)]
    for bad in ("image", "pixel:0.5", "batch:2", "image:x"):
        with pytest.raises(UserError):
            parse_candidates(bad)


@pytest.mark.slow
def test_eq2_selection_on_validation_smoke(tmp_path):
    """--eq2_select trains each candidate reading, scores it on the validation split only, and every weighted WM then
    uses the winner; the report carries the evidence and the by-motion table."""
    import json
    import shutil

    import reproduce

    out = tmp_path / "out"
    reproduce.main(["--preset=smoke", f"--out={out}", "--eq2_select=image:0.5,batch:0"])
    res = json.loads((out / "results.json").read_text())
    sel = res["eq2_selection"]
    assert [(c["norm"], c["mix"]) for c in sel["candidates"]] == [("image", 0.5), ("batch", 0.0)]
    assert all(len(c["items"]) == 28 and {r["id"][:3] for r in c["items"]} == {"val"} for c in sel["candidates"])
    chosen = sel["candidates"][sel["chosen"]]
    assert chosen["score"] == max(c["score"] for c in sel["candidates"])
    assert (res["config"]["weight_norm"], res["config"]["weight_mix"]) == (chosen["norm"], chosen["mix"])
    meta = json.loads((out / "rep0" / "wm_eq2_syn" / "ckpt" / "meta.json").read_text())["train_config"]
    assert (meta["weight_norm"], meta["weight_mix"]) == (chosen["norm"], chosen["mix"])
    report = (out / "report.md").read_text()
    assert "chosen on the validation split" in report and "## Eq. 2 by motion" in report
    # the labelled + weighted WM is the chosen candidate's checkpoint, copied: trained again from its own folder, it
    # comes out byte for byte the same (only the folder differs between the two trainings)
    folder = f"{chosen['norm']}_{chosen['mix']:g}"
    cand = out / "rep0" / "eq2_select" / folder / "ckpt" / "model.safetensors"
    assert (out / "rep0" / "wm_eq2" / "ckpt" / "model.safetensors").read_bytes() == cand.read_bytes()
    again = tmp_path / "again"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("eq2_select", "wm_eq2"))  # every other model is reused
    for stage in ("wm_eq2", "eq2_select", "finetune"):
        (again / "rep0" / "stages" / f"{stage}.json").unlink()
    reproduce.main(["--preset=smoke", f"--out={again}", f"--weight_norm={chosen['norm']}",
                    f"--weight_mix={chosen['mix']}"])  # no --eq2_select: wm_eq2 is trained
    assert (again / "rep0" / "wm_eq2" / "ckpt" / "model.safetensors").read_bytes() == cand.read_bytes()


def test_paired_interval_with_each_replicate_its_own_items():
    """Replicates built on different worlds have different test items: each replicate's items are resampled on their
    own, the replicates are kept whole, and the mean difference is the mean of the replicates' own differences."""
    from report import paired_interval, verdict

    a = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]  # replicate 1 has more items than replicate 0
    b = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0, 2.0, 2.0]]
    iv = paired_interval(a, b, n_boot=2000)
    assert iv["per_replicate"] == [1.0, 0.0] and iv["diff"] == 0.5
    assert 0 < iv["lo"] <= iv["hi"] <= 1 and verdict(iv) == "not shown"  # replicate 1 does not agree in sign
    one = paired_interval(a[:1], b[:1], n_boot=2000)
    assert one["lo"] == one["hi"] == 1.0 and verdict(one) == "shown"


def test_foundation_dtype_changes_only_the_hashes_it_should(tmp_path):
    """--foundation_dtype equal to --dtype ("same", the default) leaves every stage's hash as before the flag existed,
    so old caches stay valid; another foundation dtype retrains the VQGAN, the pre-training and all that follows."""
    import dataclasses

    from reproduce import ReproConfig, Stages

    bf = dataclasses.replace(ReproConfig(), dtype="bfloat16")
    names = ("vq", "bpe", "pretrain", "dm", "wm_ce", "finetune")
    same = [Stages(tmp_path, dataclasses.replace(bf, foundation_dtype=d)) for d in ("same", "bfloat16")]
    assert all(same[0].hash(n) == same[1].hash(n) for n in names)
    fp32 = Stages(tmp_path, dataclasses.replace(bf, foundation_dtype="float32"))
    assert all(fp32.hash(n) != same[0].hash(n) for n in names if n != "bpe") and fp32.hash("bpe") == same[0].hash("bpe")


@pytest.mark.slow
def test_an_fp32_foundation_under_bf16_fine_tuning(tmp_path):
    """--dtype=bfloat16 --foundation_dtype=float32: the VQGAN and the pre-training run in fp32 (the VQGAN is the one
    train_vq makes in fp32), the fine-tuning in bf16 autocast, and the report's header says so."""
    import json

    import torch
    from safetensors.torch import load_file

    import reproduce
    from train_tokenizer import train_vq

    out = tmp_path / "out"
    reproduce.main(["--preset=smoke", f"--out={out}", "--dtype=bfloat16", "--foundation_dtype=float32"])
    stage = lambda name: json.loads((out / "rep0" / "stages" / f"{name}.json").read_text())["result"]
    assert stage("pretrain")["dtype"] == "float32" and stage("dm")["dtype"] == "bfloat16"
    cfg = reproduce.ReproConfig(**{**reproduce.PRESETS["smoke"], "out": str(out), "dtype": "float32"})
    vq, _ = train_vq(cfg, torch.device("cpu"), seed=0, progress=False)
    saved, made = load_file(str(out / "rep0" / "tok" / "vq" / "model.safetensors")), vq.state_dict()
    assert saved.keys() == made.keys() and all(torch.equal(saved[k], made[k]) for k in saved)
    assert "bfloat16 autocast (VQGAN and pre-training: float32)" in (out / "report.md").read_text()


def test_critical_path_and_list_schedule_on_a_hand_made_graph():
    """The longest chain of dependent tasks, and a greedy list schedule (longest chain ahead first) on 1-3 cores."""
    from runner import critical_path, list_schedule

    graph = {"vq": (), "world": (), "pre": ("vq", "world"), "dm": ("pre",), "wm": ("pre",), "wm2": ("pre",),
             "syn": ("dm",), "end": ("syn", "wm", "wm2")}
    cost = {"vq": 10, "world": 2, "pre": 5, "dm": 6, "wm": 6, "wm2": 6, "syn": 6, "end": 1}
    assert critical_path(graph, cost) == (28, ["vq", "pre", "dm", "syn", "end"])
    assert list_schedule(graph, cost, 1) == sum(cost.values())  # one core: all the work, one task after another
    # two cores: vq beside world, then dm first (6 s of syn after it), wm beside it, wm2 beside syn
    assert list_schedule(graph, cost, 2) == 10 + 5 + 6 + 6 + 1
    assert list_schedule(graph, cost, 3) == 28  # enough cores: the critical path
    # vq as 2 rank processes (its cost: the wall on 2 cores): on 2 cores nothing runs beside it, world after it; on one
    # core its 2 chunks run in turn, twice as long
    width = {"vq": 2}
    assert list_schedule(graph, cost, 2, width) == 10 + 2 + 5 + 6 + 6 + 1
    assert list_schedule(graph, cost, 1, width) == sum(cost.values()) + 10
    assert list_schedule(graph, cost, 4, width) == 28
    assert critical_path({}, {}) == (0.0, [])


def test_clock_counts_work_done_in_rank_processes():
    """A task whose work runs in other processes (the VQGAN and the pre-training under --foundation_ranks=2) costs its
    wall seconds: the launching process's own CPU time would record almost nothing (the defect the class preset's
    second run showed: VQGAN 1 s)."""
    import subprocess
    import sys

    from runner import Clock

    busy = [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"]
    clock = Clock(total=2)
    with clock.task("own CPU"):
        subprocess.run(busy, check=True)
    with clock.task("ranks", cores=2):
        subprocess.run(busy, check=True)
    assert clock.costs["own CPU"] < 0.2 and clock.costs["ranks"] >= 0.5 and clock.widths == {"ranks": 2}


@pytest.mark.slow
def test_replicates_run_as_separate_jobs_pool_to_the_same_tables(tmp_path):
    """Replicates 0 and 1 run as two separate processes at the same time (`--replicate=r`, as a job array runs them;
    one worker each), then `--pool`, give byte-identical report tables to `--replicates=2` in one process."""
    import json
    import subprocess
    import sys

    import reproduce

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sep, one = tmp_path / "sep", tmp_path / "one"
    logs = [open(tmp_path / f"rep{r}.log", "w") for r in (0, 1)]
    procs = [subprocess.Popen([sys.executable, "reproduce.py", "--preset=smoke", f"--replicate={r}", "--jobs=1",
                               f"--out={sep}"], cwd=repo, stdout=logs[r], stderr=subprocess.STDOUT) for r in (0, 1)]
    for r, p in enumerate(procs):
        assert p.wait() == 0, (tmp_path / f"rep{r}.log").read_text()[-3000:]
    assert not (sep / "report.md").exists()  # a replicate's job writes no report
    reproduce.main(["--preset=smoke", "--pool", f"--out={sep}"])
    reproduce.main(["--preset=smoke", "--replicates=2", f"--out={one}"])
    tables = [json.loads((d / "results.json").read_text())["provenance"]["tables"] for d in (sep, one)]
    assert tables[0] == tables[1]
    assert (sep / "report.md").read_text().split("## Setup")[1] == (one / "report.md").read_text().split("## Setup")[1]
    assert "Critical paths" in (one / "report.md").read_text()


def test_replicate_and_pool_flags_fail_before_any_work(tmp_path):
    """--replicate runs one replicate (not with --replicates or --pool); --pool needs a finished replicate 0;
    --eq2_select's later replicates need replicate 0's choice. Each a UserError, nothing written."""
    from common import UserError
    from reproduce import main

    out = tmp_path / "out"
    for argv, msg in ((["--replicate=1", "--replicates=2"], "runs one replicate"), (["--replicate=0", "--pool"],
                                                                                     "runs one replicate"),
                      (["--pool"], "no finished replicate 0"),
                      (["--replicate=1", "--eq2_select=image:0.5"], "run --replicate=0 first")):
        with pytest.raises(UserError, match=msg):
            main(["--preset=smoke", f"--out={out}", *argv])
    assert not out.exists()


def test_the_report_reads_replicates_back_up_to_the_first_unfinished(tmp_path, capsys):
    """--pool pools replicates 0, 1, ... up to the first not finished with these settings and names the folders it
    leaves out; --replicates=K reads exactly K; a replicate finished with other settings does not count."""
    import dataclasses

    from common import UserError
    from reproduce import ReproConfig, Stages, finished_replicates

    cfg = ReproConfig(out=str(tmp_path))
    for r in (0, 1, 3):
        rcfg = dataclasses.replace(cfg, out=str(tmp_path / f"rep{r}"))
        for name in ("vq", "bpe", "locality", "zeroshot", "baselines", "finetune"):
            Stages(rcfg.out, rcfg, r).put(name, {name: r})
    (tmp_path / "rep2").mkdir()
    reps = finished_replicates(cfg, None)
    assert [rep["R"] for rep in reps] == [{"finetune": 0}, {"finetune": 1}] and reps[0]["times"] == {}
    assert reps[1]["tok"] == {"vq": 1, "bpe": 1, "locality": 1} and "rep2, rep3 are left out" in capsys.readouterr().out
    assert len(finished_replicates(cfg, 1)) == 1
    with pytest.raises(UserError, match="no finished replicate 0"):
        finished_replicates(dataclasses.replace(cfg, ft_steps=7), None)
