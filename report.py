"""The report of reproduce.py: paired bootstrap intervals and verdicts for the findings, the tables of out/report.md,
per-item records, the provenance header (what determines the numbers) and, at the end, the run against the committed
reference run of its arithmetic. Harness: it computes nothing of the paper's method, it only reads the results
reproduce.py collected.

`python report.py` renders the README's generated blocks (the code map with line ranges, the results, the stage
times, the file table) and docs/results.md from the code and the reference runs committed under docs/reference/
(each: report.md, results.json.gz with the per-item records, machine.json); `--check=true` only compares (the fast
tier's README test does the same).
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import gzip
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import UserError, atomic_write, parse_config, run
from draw import curve_png
from eval import write_jsonl
from runner import critical_path, list_schedule

HERE = os.path.dirname(os.path.abspath(__file__))  # the repository: git, docs/reference/, README.md


def measured(values: list[float]) -> list[float]:
    """The per-seed values that exist (a stage may report None or NaN)."""
    return [v for v in values if v is not None and not math.isnan(v)]


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = measured(values)
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(values: list[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    one_seed = len(measured(values)) == 1  # no spread to show
    return f"{m:.{digits}f}" if one_seed else f"{m:.{digits}f} ± {s:.{digits}f}"


def paired_interval(a: list[list[float]], b: list[list[float]], n_boot: int = 10000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """Paired bootstrap of mean(a - b). a[r][i], b[r][i]: replicate r's value on its test item i (both arms on the
    same items in the same order; each replicate has its own world, so its own items). Each resample draws every
    replicate's items with replacement, the replicates kept whole (as clusters), and averages the replicates' mean
    differences. Returns that mean difference, the percentile interval, and each replicate's own mean difference."""
    d = [np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64) for x, y in zip(a, b)]  # R x (I_r,)
    rng = np.random.default_rng(seed)
    boots = []
    for k in range(0, n_boot, 1000):  # in chunks of 1,000 resamples
        n = min(1000, n_boot - k)
        # (n,) per replicate: the mean of a resample of its items; then the mean over replicates
        boots.append(np.mean([dr[rng.integers(0, len(dr), size=(n, len(dr)))].mean(axis=1) for dr in d], axis=0))
    lo, hi = np.quantile(np.concatenate(boots), [(1 - level) / 2, (1 + level) / 2])
    per = [float(dr.mean()) for dr in d]
    return {"diff": float(np.mean(per)), "lo": float(lo), "hi": float(hi), "per_replicate": per,
            "mean_a": float(np.mean([np.mean(x) for x in a])), "mean_b": float(np.mean([np.mean(y) for y in b]))}


def verdict(iv: dict) -> str:
    """An effect is "shown" only when its 95% interval excludes 0 and every replicate's own difference has the same
    sign; "reversed" when the same holds below 0; otherwise "not shown". With one replicate the interval covers the
    sampling of test items only, not of training seeds, worlds or tokenizers."""
    reps = iv["per_replicate"]
    if iv["lo"] > 0 and all(r > 0 for r in reps):
        return "shown"
    if iv["hi"] < 0 and all(r < 0 for r in reps):
        return "reversed"
    return "not shown"


def solved(S: list[dict]) -> tuple[list[list[float]], list[list[float]]]:
    """Finding 1 on one footing: the share of items each model solves (DM: its action is valid; WM: judge success
    10), both sampled at the same temperature, on the same items (the DM is scored on items with a target, which all
    test items have). Returns (DM, C-FT), each [replicate][item] in the test order."""
    dm = [[float(rec["correct"]) for rec in r["items"]["dm_sampled"]] for r in S]
    wm = []
    for r in S:
        ids = {rec["id"] for rec in r["items"]["dm_sampled"]}
        wm.append([float(rec.get("success") == 10) for rec in r["items"]["wm"]["C-FT"] if rec["id"] in ids])
    return dm, wm


def contrasts(S: list[dict], ns: list[int]) -> list[dict]:
    """The report's contrasts, paired item by item over the test items and the replicates: (what, metric, arm A,
    arm B, their per-replicate per-item values)."""
    fdm, top = "C-FDM (labelled + synthetic + weighted)", str(max(ns))

    def wm(name, metric="score", n=None):  # [replicate][item], items in the test order
        return [[rec.get(metric, float("nan")) for rec in (r["items"]["wm"][name] if n is None else
                                                           r["items"]["search"][name][n])] for r in S]

    dm, wm_solved = solved(S)
    rows = [("the DM solves more items than the WM (C-FT) learns to", "solved", "DM", "WM (C-FT)", dm, wm_solved),
            ("synthetic data (CE loss) improves the WM", "score", "labelled + synthetic", "C-FT",
             wm("labelled + synthetic"), wm("C-FT")),
            ("bootstrapping with DM-labelled video improves the WM (with Eq. 2)", "score", "C-FDM",
             "labelled + weighted", wm(fdm), wm("labelled + weighted"))]
    for metric in ("score", "success", "minimal"):
        rows.append(("the recognition-weighted loss (Eq. 2) improves the WM", metric, "C-FDM", "labelled + synthetic",
                     wm(fdm, metric), wm("labelled + synthetic", metric)))
    rows += [("the full method (C-FDM) beats fine-tuning alone (C-FT)", "score", "C-FDM", "C-FT", wm(fdm),
              wm("C-FT")),
             (f"DM-verified best-of-{top} improves C-FT over N=1", "score", f"C-FT, N={top}", "C-FT, N=1",
              wm("C-FT", n=top), wm("C-FT", n="1")),
             (f"DM-verified best-of-{top} improves C-FDM over N=1", "score", f"C-FDM, N={top}", "C-FDM, N=1",
              wm(fdm, n=top), wm(fdm, n="1"))]
    for name, short in (("C-FT", "C-FT"), (fdm, "C-FDM")):  # the control: the same candidates picked at random
        rows.append((f"the DM picks better than chance among {top} candidates ({short})", "score",
                     f"DM pick of {top}", f"random pick of {top}", [pick(r["controls"][name], int(top), "dm")
                                                                     for r in S],
                     [pick(r["controls"][name], int(top), "random") for r in S]))
    return [{"what": w, "metric": m, "a": na, "b": nb, **paired_interval(a, b)} for w, m, na, nb, a, b in rows]


# Table 3 split by motion: the edits that change one cell against those that move an object, and how far it moves
MOTION_GROUPS = (
    ("one cell changes (add, remove, recolour)", lambda r: r["cells"] == 1),
    ("two cells change (move, move somewhere, next to, swap)", lambda r: r["cells"] == 2),
    ("an object moves 1 cell", lambda r: r["distance"] == 1),
    ("an object moves 2 cells", lambda r: r["distance"] == 2),
    ("an object moves 3 or more cells", lambda r: r["distance"] >= 3),
)
EQ2_PAIRS = (("labelled + synthetic", "C-FDM (labelled + synthetic + weighted)", "labelled + synthetic"),
             ("labelled", "labelled + weighted", "C-FT"))  # (data, weighted arm, standard CE arm)


def by_motion(S: list[dict]) -> list[dict]:
    """Eq. 2 (weighted − standard CE, same data) per motion group, success and minimal editing separately, each a
    paired interval over the group's items (and the replicates). Groups without items are left out."""
    rows = []
    for data, weighted, standard in EQ2_PAIRS:
        for label, keep in MOTION_GROUPS:
            idx = [[i for i, rec in enumerate(r["items"]["wm"][standard]) if keep(rec)] for r in S]  # per replicate
            if not all(idx):
                continue
            for metric in ("success", "minimal"):
                arm = [[[r["items"]["wm"][name][i][metric] for i in ix] for r, ix in zip(S, idx)]  # [replicate][item]
                       for name in (weighted, standard)]
                rows.append({"edits": label, "data": data, "n": sum(map(len, idx)), "metric": metric,
                             **paired_interval(*arm)})
    return rows


def pick(recs: list[dict], k: int, by: str) -> list[float]:
    """Judge score per item of the candidate that `by` picks among the first k: "random" (the expected score of a
    uniform pick), "wm" / "dm" (highest likelihood / verifier score) or "oracle" (the judge's best)."""
    out = []
    for r in recs:
        j = r["judge"][:k]
        if by == "random":
            out.append(sum(j) / k)
        elif by == "oracle":
            out.append(max(j))
        else:
            s = r[by][:k]
            out.append(j[s.index(max(s))])
    return out


def write_items(out: str, items: dict, controls: dict):
    """out/rep<r>/items/*.jsonl: one record per test item and model (id, split, action class, success, minimal,
    score, l1; the DM's prediction, greedy and sampled, and whether it is correct; every best-of-N candidate's DM, WM
    and judge score)."""
    slug = lambda name: re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    d = os.path.join(out, "items")
    os.makedirs(d, exist_ok=True)
    write_jsonl(os.path.join(d, "dm.jsonl"), items["dm"])
    write_jsonl(os.path.join(d, "dm_sampled.jsonl"), items["dm_sampled"])
    for name, recs in items["wm"].items():
        write_jsonl(os.path.join(d, f"wm_{slug(name)}.jsonl"), recs)
    for name, recs in controls.items():
        write_jsonl(os.path.join(d, f"candidates_{slug(name)}.jsonl"), recs)
    for name, by_n in items["search"].items():
        for n, recs in by_n.items():
            write_jsonl(os.path.join(d, f"search_{slug(name)}_n{n}.jsonl"), recs)


def sha(paths: list[str]) -> str:
    """A short content hash of these files (in this order); '-' when one is missing."""
    h = hashlib.sha256()
    for p in paths:
        if not os.path.exists(p):
            return "-"
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def provenance(cfg, device: torch.device, runs: list[str]) -> dict:
    """What determines the numbers, for the report header: two runs whose entries all match should give the same
    report byte for byte; a different CPU capability (other kernels, other rounding) may not. `runs`: the fine-tuned
    models' folders in out/rep<r>/."""
    git = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True)
    try:
        commit = git("rev-parse", "--short=12", "HEAD").stdout.strip() or "unknown"
        commit += " (uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no").stdout else ""
    except OSError:  # no git
        commit = "unknown"
    stages = {}
    for r in range(cfg.replicates):
        rep = os.path.join(cfg.out, f"rep{r}")
        files = {"data": [os.path.join(rep, "data", f + ".json") for f in ("train", "val", "test", "test_comp",
                                                                            "captions")],
                 "vqgan": [os.path.join(rep, "tok", "vq", "model.safetensors")],
                 "bpe": [os.path.join(rep, "tok", "tokenizer.json")],
                 **{run: [os.path.join(rep, run, "ckpt", "model.safetensors")] for run in ["pretrain"] + runs},
                 "synthetic": [os.path.join(rep, "synthetic.json")]}
        stages[f"rep{r}"] = " ".join(f"{name} {sha(paths)}" for name, paths in files.items())
    return {"commit": commit, "torch": torch.__version__, "device": device.type,
            "dtype": ("bfloat16 autocast" if cfg.dtype == "bfloat16" else "float32") + (
                f" (VQGAN and pre-training: {cfg.own_foundation_dtype})" if cfg.own_foundation_dtype else ""),
            "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "stage_hashes": stages}


def cpu_name() -> str:
    """The CPU's model name and core count (Linux /proc/cpuinfo; elsewhere the platform's word for it)."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or os.uname().machine}, {os.cpu_count()} cores"


def peak_matmul_flops(dtype: str, device: torch.device, shape=(2240, 128, 384), reps: int = 20) -> float:
    """The best FLOP/s of this machine's matrix products at the tiny model's shape (a batch of 16 x 140 tokens times
    a 128 x 384 weight), in `dtype`, with this process's threads: the denominator of the report's CPU "MFU"."""
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    m, k, n = shape
    a, b = torch.randn(m, k, device=device, dtype=dt), torch.randn(k, n, device=device, dtype=dt)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * m * k * n / best


def time_table(cfg, reps: list[dict], clock, device: torch.device) -> list[str]:
    """Report lines: wall seconds per stage of this invocation, and per trained model its seconds, tokens/s and
    model FLOP/s against the measured peak of this machine's matrix products in the same dtype (a CPU "MFU")."""
    peaks = {cfg.dtype: peak_matmul_flops(cfg.dtype, device)}  # each model against its own dtype's peak
    peak = peaks[cfg.dtype]
    L = ["## Where the time went (this run)", "",
         f"This invocation, stage by stage (wall seconds; fine-tuning runs side by side in worker processes, so a "
         f"stage's time includes the models that trained beside it; cached stages take ~0 s). Peak of one "
         f"{cfg.dtype} matrix product at the model's shape (2240 x 128 x 384, {cfg.threads} thread(s)): "
         f"{peak / 1e9:.1f} GFLOP/s.", "", "| stage | seconds |", "|---|---|"]
    L += [f"| {name} | {sec:.0f} |" for name, sec in clock.seconds.items()]
    L += ["", "| model | seconds | tokens/s | model GFLOP/s | vs peak (MFU) |", "|---|---|---|---|---|"]
    for r, rep in enumerate(reps):
        for name, res in rep["runs"].items():
            if "tokens_per_s" in res:
                flops, dt = res["tokens_per_s"] * res["flops_per_token"], res.get("dtype", cfg.dtype)
                if dt not in peaks:
                    peaks[dt] = peak_matmul_flops(dt, device)
                L.append(f"| rep{r}/{name} | {res['seconds']:.0f} | {res['tokens_per_s']:.0f} | {flops / 1e9:.2f} | "
                         f"{100 * flops / peaks[dt]:.0f}%{'' if dt == cfg.dtype else f' ({dt})'} |")
    return L + [""]


def schedule_lines(reps: list[dict], graph: dict[str, tuple], cores=(2, 4, 8, 16)) -> list[str]:
    """Report lines: per replicate, its wall against its stage graph (`graph`: task -> the tasks it needs) at the
    measured task costs (the CPU seconds of the one-thread process that ran each task, i.e. its time alone on a core,
    from out/rep<r>/times.json): the critical path (the longest chain of dependent tasks), the floor on the cores it
    had (the larger of the critical path and the work over the cores), and the wall a greedy list schedule of the
    graph predicts on 2-16 cores. Tasks outside the graph (--eq2_select's candidates) are left out."""
    L = ["One replicate's stages as a graph of tasks (reproduce.GRAPH), each costed at the CPU seconds it took in its "
         "one-thread process (a stage run as rank processes, --foundation_ranks: its wall, on as many cores): the "
         "critical path is the longest chain of dependent tasks; no number of cores runs faster. The floor on c "
         "cores is the larger of the critical path and all the work over c; the predictions are a greedy list "
         "schedule of the graph (longest chain first) on c cores as fast as these.", "",
         "| replicate | wall s | cores (workers) | work, core-s | critical path s | floor s | wall / floor | "
         + " | ".join(f"predicted, {c} cores" for c in cores) + " |",
         "|---|---|---|---|---|---|---|" + "---|" * len(cores)]
    paths = []
    for r, rep in enumerate(reps):
        t = rep.get("times", {})
        if not t.get("costs"):
            continue
        cost, width = {k: v for k, v in t["costs"].items() if k in graph}, t.get("widths", {})
        length, path = critical_path(graph, cost)
        work = sum(v * width.get(k, 1) for k, v in cost.items())  # core-seconds: a rank stage holds its cores
        floor = max(length, work / t["cores"])
        L.append(f"| rep{r} | {t['wall']:.0f} | {t['cores']} ({t['workers']}) | {work:.0f} | "
                 f"{length:.0f} | {floor:.0f} | {t['wall'] / max(floor, 1e-9):.2f} | "
                 + " | ".join(f"{list_schedule(graph, cost, c, width):.0f}" for c in cores) + " |")
        paths.append(f"rep{r}: " + " → ".join(f"{p} {cost.get(p, 0):.0f}" for p in path))
    return L + ["", "Critical paths (task, CPU seconds): " + "; ".join(paths) + ".", ""] if paths else []


def write_report(cfg, ns, reps: list[dict], seconds, prov, selection=None, times: list[str] = ()) -> str:
    """out/report.md and out/results.json from the replicates' results (reproduce.run_replicate: tok, zs, base, R)."""
    S = [rep["R"] for rep in reps]
    tok = {k: [rep["tok"][k] for rep in reps] for k in reps[0]["tok"]}  # tokenizer facts, one value per replicate
    Z, B = [rep["zs"] for rep in reps], [rep["base"] for rep in reps]
    tasks = [t for t in Z[0]["wm"] if t != "all"]
    L = [f"# worldboot: the paper in miniature (preset `{cfg.preset}`, {len(reps)} replicate(s))", ""]
    L += [f"Produced by `{prov['command']}` in "
          f"{seconds / 60:.1f} min "
          f"with {cfg.threads} torch thread(s) per process in every stage. "
          "Numbers are mean ± standard deviation over the replicates, each with its own world, tokenizers, "
          "pre-trained model and fine-tuning seed (a single number: one replicate). "
          "Scores are the world judge's 0-10 "
          "(success, minimal editing, score = their min per sample, as the paper's GPT-4o protocol); L1 is the "
          "mean pixel difference to the target (0-1). `world` is the test split, `world_comp` the compositional "
          "split (colour/shape/verb combinations whose picture change and wording no training data shows; no test "
          "source scene is shown in training either: world.py's docstring).", ""]
    L += ["What determines these numbers (runs that agree on every line should match byte for byte from the Setup "
          "section on; other CPUs run other kernels, which round differently):", "",
          f"- commit {prov['commit']}, torch {prov['torch']}, device {prov['device']}, dtype {prov['dtype']}, "
          f"{prov['threads']} intra-op thread(s) per process, CPU {prov.get('cpu', '?')}, capability "
          f"{prov['cpu_capability']}",
          "- stage outputs (sha256, 12 hex): " + "; ".join(f"{k} {v}" for k, v in prov["stage_hashes"].items()),
          "- report tables (sha256 of the Setup section and all after it): {TABLES_HASH}", ""]
    L += list(times)  # before the Setup section: timings vary between runs, the tables from Setup on do not
    body_start = len(L)
    L += ["## Setup", "",
          f"- data: {cfg.n_train} labelled triplets, {cfg.n_videos} unlabelled videos, {cfg.n_val} validation, "
          f"{cfg.n_test} test + {cfg.n_comp} compositional test items, {cfg.n_captions} captions for pre-training",
          f"- tokenizers: VQGAN {32 // cfg.vq_downsample}x{32 // cfg.vq_downsample} tokens per 32x32 image, "
          f"{cfg.vq_codes} codes; reconstruction L1 {fmt(tok['recon_l1'], 4)}; the judge recovers "
          f"{fmt([100 * v for v in tok['scene_recovered']], 1)}% of scenes from reconstructions; BPE vocabulary "
          f"{fmt(tok['vocab'], 0)}",
          f"- token locality (train pairs): an edit changes one or two cells, yet only "
          f"{fmt([100 * v for v in tok['unchanged_code_kept']], 0)}% of the tokens of unchanged cells keep their code "
          f"(the encoder sees beyond its cell); Eq. 2 weights average {fmt(tok['eq2_changed'])} on tokens of changed "
          f"cells and {fmt(tok['eq2_unchanged'])} on those of unchanged ones",
          f"- model: {cfg.n_layer} layers x {cfg.n_embd} wide; pre-training {cfg.pretrain_steps} steps; "
          + (f"every DM and WM fine-tuned for {cfg.ft_steps}" if cfg.wm_steps_ratio == 1 else  # (as before)
             f"the DM fine-tuned for {cfg.dm_steps} steps, every WM for "
             f"{cfg.ft_steps}") + f" steps of batch {cfg.batch_size} from the same pre-trained model",
          f"- bootstrapping: the DM labels {fmt([r['pseudo']['pairs'] for r in S], 0)} video pairs, stratified "
          f"top-K keeps {fmt([r['pseudo']['kept'] for r in S], 0)}", ""]

    # Table 1: DM metrics + the first finding
    L += ["## Table 1: the dynamics model (action prediction on the test splits)", "",
          "| model | action accuracy | BLEU-4 | ROUGE-L |", "|---|---|---|---|",
          f"| zero-shot (pre-trained model) | {fmt([z['dm']['action_acc'] for z in Z])} | "
          f"{fmt([z['dm']['bleu'] for z in Z])} | {fmt([z['dm']['rougeL'] for z in Z])} |"]
    for key, label in (("dm", "fine-tuned DM (greedy)"),
                       ("dm_sampled", f"fine-tuned DM (temperature {cfg.temperature})")):
        L.append(f"| {label} | {fmt([r[key]['action_acc'] for r in S])} | {fmt([r[key]['bleu'] for r in S])} | "
                 f"{fmt([r[key]['rougeL'] for r in S])} |")
    dm_acc = [r["dm_sampled"]["action_acc"] for r in S]
    wm_solved = [statistics.fmean(float(rec.get("success") == 10) for rec in r["items"]["wm"]["C-FT"]) for r in S]
    same = "same steps and batch" if cfg.wm_steps_ratio == 1 else \
        f"the DM {cfg.dm_steps} steps and the WM {cfg.ft_steps} of the same batch"
    L += ["", f"Same labelled triplets, {same}, both sampled at temperature {cfg.temperature}: the share "
          "of test items the fine-tuned DM solves (its action is valid) and the share the fine-tuned WM (C-FT) solves "
          "(the judge's success is 10):", "",
          "| | DM solved | WM solved |", "|---|---|---|", f"| fine-tuned | {fmt(dm_acc)} | {fmt(wm_solved)} |", ""]
    if all(r.get("curves") for r in S):  # the learning curves: how fast each is learned, on the validation split
        series = {}
        for kind, label in (("dm", "DM"), ("wm", "WM (C-FT)")):
            steps = [p[0] for p in S[0]["curves"][kind]]
            series[label] = [(st, *mean_std([dict(r["curves"][kind]).get(st) for r in S])) for st in steps]
        curve_png(series, os.path.join(cfg.out, "learning_curves.png"), "solved (validation)", xlog=False,
                  title="share of validation items solved vs fine-tuning step")
        L += ["Learning curves on the validation split (same sampling as above):", "",
              "| step | " + " | ".join(series) + " |", "|---|" + "---|" * len(series)]
        for st in sorted({p[0] for r in S for k in ("dm", "wm") for p in r["curves"][k]}):  # the DM may train longer
            vals = {k: [dict(r["curves"][k]).get(st) for r in S] for k in ("dm", "wm")}
            L.append(f"| {st} | " + " | ".join("" if None in v else fmt(v) for v in vals.values()) + " |")
        L += ["", "![learning curves](learning_curves.png)", ""]

    # Table 2: WM per subset
    cols = ["score", "success", "minimal", "l1"]
    L += ["## Table 2: world models per subset (N = 1)", ""]
    for task in tasks + ["all"]:
        L += [f"### {task}", "", "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        L.append("| zero-shot | " + " | ".join(fmt([z["wm"][task].get(c) for z in Z]) for c in cols) + " |")
        for name in S[0]["wm"]:
            L.append(f"| {name} | " + " | ".join(fmt([r["wm"][name][task].get(c) for r in S]) for c in cols) + " |")
        for bname in B[0]:
            L.append(f"| {bname} | " + " | ".join(fmt([b[bname][task].get(c) for b in B]) for c in cols) + " |")
        L.append("")

    # Table 3 and 4
    def sc(name, task="all"):
        return [r["wm"][name][task]["score"] for r in S]

    fdm, plain = "C-FDM (labelled + synthetic + weighted)", "labelled + synthetic"
    L += ["## Table 3: recognition-weighted vs standard loss (labelled + synthetic data)", "",
          "| loss | world | world_comp | all |", "|---|---|---|---|",
          f"| standard CE | {fmt(sc(plain, 'world'))} | {fmt(sc(plain, 'world_comp'))} | {fmt(sc(plain))} |",
          f"| weighted (Eq. 2) | {fmt(sc(fdm, 'world'))} | {fmt(sc(fdm, 'world_comp'))} | {fmt(sc(fdm))} |", ""]
    L += ["## Table 4: ablations (score, all test items)", "", "| model | score | Δ vs C-FDM |", "|---|---|---|"]
    full = mean_std(sc(fdm))[0]
    for name, label in ((fdm, "C-FDM"), ("labelled + weighted", "− synthetic data"),
                        ("labelled + synthetic", "− weighting"), ("C-FT", "− both (C-FT)")):
        L.append(f"| {label} | {fmt(sc(name))} | {mean_std(sc(name))[0] - full:+.2f} |")
    L.append("")

    # Pseudo-labels
    L += ["## Pseudo-label quality (DM labels of unlabelled video pairs, checked against the hidden truth)", "",
          "| | pairs | accuracy |", "|---|---|---|",
          f"| all labelled pairs | {fmt([r['pseudo']['pairs'] for r in S], 0)} | "
          f"{fmt([r['pseudo']['acc_before'] for r in S])} |",
          f"| kept by stratified top-K | {fmt([r['pseudo']['kept'] for r in S], 0)} | "
          f"{fmt([r['pseudo']['acc_after'] for r in S])} |",
          ""]

    # Best-of-N
    L += ["## Best-of-N with the DM as verifier (score, all test items)", "",
          "| model | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    series = {}
    for name in S[0]["search"]:
        vals = {n: [r["search"][name][str(n)]["all"]["score"] for r in S] for n in ns}
        L.append(f"| {name} | " + " | ".join(fmt(vals[n]) for n in ns) + " |")
        series[name.split(" ")[0]] = [(n, *mean_std(vals[n])) for n in ns]
    curve_png(series, os.path.join(cfg.out, "best_of_n.png"), "score")
    L += ["", "![best-of-N](best_of_n.png)", ""]
    top = max(ns)
    ks = sorted({k for k in (1, 2, 3, 4, top) if k <= top})
    L += [f"### Controls: the same {top} candidates per item, each picker choosing among the first N", "",
          "| model | picker | " + " | ".join(f"N={k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    agree = []
    for name in S[0]["controls"]:
        for by, label in (("random", "random (expected)"), ("wm", "WM likelihood"), ("dm", "DM verifier"),
                          ("oracle", "oracle (the judge)")):
            L.append(f"| {name.split(' ')[0]} | {label} | " + " | ".join(
                fmt([statistics.fmean(pick(r["controls"][name], k, by)) for r in S]) for k in ks) + " |")
        for by in ("dm", "wm"):  # how often the picker's choice is (one of) the judge's best
            hit = [statistics.fmean(float(p == o) for p, o in zip(pick(r["controls"][name], top, by),
                                                                  pick(r["controls"][name], top, "oracle")))
                   for r in S]
            agree.append(f"{'DM' if by == 'dm' else 'WM likelihood'} on {name.split(' ')[0]}: {fmt(hit)}")
    L += ["", f"How often the picker's candidate scores as high as the judge's best of {top}: " + "; ".join(agree)
          + ". The paper uses N=3 and reports +5-7% from verification on real data, none on its synthetic subset.",
          ""]

    # Findings, stated from paired per-item intervals
    R = len(S)
    L += ["## Findings", "",
          f"Each contrast pairs the two arms item by item over the {len(S[0]['items']['wm']['C-FT'])} test items"
          + (" of each replicate's world" if R > 1 else "")
          + (f" and the {R} replicates" if R > 1 else "") + ": mean difference, 95% paired-bootstrap interval "
          "(10,000 resamples of the test items" + (", replicates kept whole" if R > 1 else "") + "), each "
          "replicate's own difference, and the verdict: **shown** only when the interval excludes 0 and every "
          "replicate agrees in sign" + ("." if R > 1 else "; with one replicate the interval covers the sampling of "
                                         "test items only, not of training seeds, worlds or tokenizers."), "",
          "| finding | metric | A | B | mean A | mean B | A − B | 95% interval | per replicate | verdict |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    found = contrasts(S, ns)
    for c in found:
        L.append(f"| {c['what']} | {c['metric']} | {c['a']} | {c['b']} | {c['mean_a']:.2f} | {c['mean_b']:.2f} | "
                 f"{c['diff']:+.2f} | [{c['lo']:+.2f}, {c['hi']:+.2f}] | "
                 f"{', '.join(f'{x:+.2f}' for x in c['per_replicate'])} | **{verdict(c)}** |")
    L += ["", f"`solved`: the DM's action sampled at temperature {cfg.temperature} is valid for the pair; the WM's "
          f"sample (the same temperature) gets the judge's full success score (10). Per-item records: "
          "`rep<r>/items/*.jsonl`.", ""]
    # Eq. 2 by motion: where the weighting helps or costs, success and minimal editing apart
    motion_rows = by_motion(S)
    L += ["## Eq. 2 by motion", "",
          "Weighted (Eq. 2, " + f"`--weight_norm={cfg.weight_norm} --weight_mix={cfg.weight_mix}`" + ") minus "
          "standard CE on the same data, per kind of edit in the ground truth: success and minimal editing apart, "
          "each with its paired interval over the group's items (as in Findings). The paper reports the largest "
          "gains on high-motion pairs.", "",
          "| edits | items (all replicates) | data | metric | standard CE | weighted | weighted − standard "
          "| 95% interval | verdict |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c in motion_rows:
        L.append(f"| {c['edits']} | {c['n']} | {c['data']} | {c['metric']} | {c['mean_b']:.2f} | {c['mean_a']:.2f} | "
                 f"{c['diff']:+.2f} | [{c['lo']:+.2f}, {c['hi']:+.2f}] | {verdict(c)} |")
    L.append("")
    if selection is not None:
        cands, k = selection["candidates"], selection["chosen"]
        val = lambda c: [[rec["score"] for rec in c["items"]]]
        L += ["## Eq. 2: the reading chosen on the validation split", "",
              f"Each candidate trained as \"labelled + weighted\" (seed {selection['seed']}) and scored on the "
              f"{len(cands[k]['items'])} validation items only; the best val score is used by every weighted WM "
              "above. Intervals: the candidate minus the chosen one, paired over the validation items.", "",
              "| normalisation | mix | val score | success | minimal | − chosen (score) | 95% interval | |",
              "|---|---|---|---|---|---|---|---|"]
        for i, c in enumerate(cands):
            iv = paired_interval(val(c), val(cands[k]))
            L.append(f"| {c['norm']} | {c['mix']} | {c['score']:.2f} | {c['success']:.2f} | {c['minimal']:.2f} | "
                     f"{iv['diff']:+.2f} | [{iv['lo']:+.2f}, {iv['hi']:+.2f}] | {'**chosen**' if i == k else ''} |")
        L.append("")
    L += ["## Pictures (replicate 0)", "",
          "- `rep0/examples.png`: source | C-FT | C-FDM | C-FDM best-of-N | target, one row per verb",
          "- `rep0/search_example.png`: one item's candidates ranked by the DM",
          "- `rep0/data/samples.png`: world triplets", "", "![examples](rep0/examples.png)", "",
          "![search](rep0/search_example.png)", ""]
    tables_hash = hashlib.sha256("\n".join(L[body_start:]).encode()).hexdigest()[:12]
    L = [line.replace("{TABLES_HASH}", tables_hash) for line in L]
    L += against_reference(dataclasses.asdict(cfg), found, tables_hash)  # after the hash: not part of the tables
    path = os.path.join(cfg.out, "report.md")
    atomic_write(path, "\n".join(L))
    atomic_write(os.path.join(cfg.out, "results.json"), json.dumps(
        {"config": dataclasses.asdict(cfg), "provenance": {**prov, "tables": tables_hash}, "seconds": seconds,
         "findings": found, "eq2_by_motion": motion_rows, "eq2_selection": selection,
         "replicates": reps}, indent=1))
    return path


# ----------------------------------------------------------------------------------------------------------------
# The premise sections (docs/premise.md): power per contrast, the foundation report card, the label arms. They are
# placed before the Setup section by reproduce.py, so they do not enter the tables hash.

Z95, POWER80 = 1.959964, 2.8  # a 95% interval's half-width in standard errors; 1.96 + 0.84 (80% power, 5% level)
# The paper's effect sizes (0-10 GPT-4o score; PAPER.md), by the start of the report's contrast and its metric:
# (what starts with, metric, effect, where it comes from)
PAPER_EFFECTS = (
    ("synthetic data (CE loss)", "score", 0.09, "ablation: - synthetic data"),
    ("bootstrapping with DM-labelled video", "score", 0.09, "ablation: - synthetic data"),
    ("the recognition-weighted loss", "score", 0.15, "ablation: - weighting"),
    ("the recognition-weighted loss", "success", 0.34, "weighted 3.71 vs standard 3.37 success"),
    ("the full method", "score", 0.41, "C-FDM 3.67 vs C-FT 3.26"),
    ("DM-verified best-of-", "score", 0.17, "best-of-3: +0.17 (C-FDM) to +0.22 (C-FT)"),
)


def power_rows(found: list[dict], replicates: int) -> list[dict]:
    """Per contrast (report.contrasts): the standard error of its mean difference read off the 95% paired-bootstrap
    interval ((hi - lo) / 3.92), the minimum detectable effect at 80% power and a two-sided 5% level (2.8 x SE), the
    paper's effect where it gives one, the replicates it would take to resolve that effect (SE shrinks as
    1 / sqrt(replicates): each brings its own world and items), and whether a "not shown" could not have shown it."""
    rows = []
    for c in found:
        se = (c["hi"] - c["lo"]) / (2 * Z95)
        paper = next(((e, src) for start, m, e, src in PAPER_EFFECTS
                      if c["what"].startswith(start) and c["metric"] == m), (None, ""))
        need = max(1, math.ceil(replicates * (POWER80 * se / paper[0]) ** 2)) if paper[0] else None
        rows.append({"what": c["what"], "metric": c["metric"], "diff": c["diff"], "se": se, "mde": POWER80 * se,
                     "paper": paper[0], "paper_source": paper[1], "replicates_needed": need,
                     "could_not_show": bool(paper[0]) and verdict(c) == "not shown" and POWER80 * se > paper[0]})
    return rows


def power_section(S: list[dict], ns: list[int]) -> list[str]:
    """The report's power lines: power_rows of every contrast of the Findings table."""
    rows = power_rows(contrasts(S, ns), len(S))
    L = ["## Power: what this run could have shown", "",
         f"Per finding: the minimum detectable effect (MDE) at this run's {len(S)} replicate(s), 2.8 x the standard "
         "error of the paired bootstrap (80% power, two-sided 5%); the paper's effect where it gives one (GPT-4o "
         "0-10 score, carried over as is; the paper's best-of-N is N=3, ours the largest N); the replicates that "
         "would resolve it. A \"not shown\" whose MDE exceeds the paper's effect is one this run could not have shown.",
         "", "| finding | metric | A − B | MDE | paper's effect | replicates to resolve it | |",
         "|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = f"{r['paper']:+.2f} ({r['paper_source']})" if r["paper"] else "-"
        L.append(f"| {r['what']} | {r['metric']} | {r['diff']:+.2f} | {r['mde']:.2f} | {paper} | "
                 f"{r['replicates_needed'] if r['replicates_needed'] else '-'} | "
                 f"{'could not have shown the paper effect' if r['could_not_show'] else ''} |")
    return L + [""]


def card_section(cards: list[dict]) -> list[str]:
    """The foundation report card (foundation.report_card), one column per replicate and the mean."""
    keys = (("caption_exact", "zero-shot captioning, exact scene (validation)"),
            ("draw_exact", "zero-shot drawing, exact scene (validation)"),
            ("gen_share", "generation share of pre-training loss tokens"),
            ("target_types", "train-instruction token types that were pre-training targets"),
            ("target_tokens", "train-instruction tokens (occurrences) that were pre-training targets"),
            ("image_head_tokens", "loss tokens of the image-head stage"), ("loss_tokens", "pre-training loss tokens"))
    L = ["## Foundation report card (the pre-trained model, before any fine-tuning)", "",
         "The criteria a faithful foundation meets are in docs/experiments/premise_criteria.md.", "",
         "| | " + " | ".join(f"rep{r}" for r in range(len(cards))) + " | mean |", "|---|" + "---|" * (len(cards) + 1)]
    for k, label in keys:
        vals, digits = [c.get(k) for c in cards], 0 if k.endswith("tokens") and "target" not in k else 3
        if any(v is not None for v in vals):
            L.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.{digits}f}" for v in vals)
                     + f" | {fmt(vals, digits)} |")
    return L + [""]


def arms_section(S: list[dict]) -> list[str]:
    """The label arms (reproduce.py --label_arms): WMs on the same kept video pairs with the DM's, the world's true
    (oracle) and shuffled labels, beside the labelled-only WM, as paired contrasts of the test score."""
    def arm(name):  # [replicate][item] scores in the test order
        return [[rec.get("score", float("nan")) for rec in (r["arms"][name[1:]]["items"] if name[0] == "@"
                                                            else r["items"]["wm"][name])] for r in S]

    rows = (("the most the videos can give", "oracle labels", "labelled only", "@oracle", "C-FT"),
            ("the cost of label noise", "DM labels", "oracle labels", "labelled + synthetic", "@oracle"),
            ("the DM's labels carry information", "DM labels", "shuffled labels", "labelled + synthetic", "@shuffled"),
            ("volume without information", "shuffled labels", "labelled only", "@shuffled", "C-FT"))
    L = ["## Synthetic data in parts: the same kept video pairs with other labels", "",
         "Each WM trains on the labelled triplets plus the DM's kept video pairs (plain CE), labelled by the DM, by "
         "the world's hidden true actions (oracle) or by the DM's labels permuted over the pairs (shuffled); "
         "labelled only is C-FT. Test score, paired over items and replicates.", "",
         "| contrast | A | B | mean A | mean B | A − B | 95% interval | verdict |", "|---|---|---|---|---|---|---|---|"]
    for what, la, lb, a, b in rows:
        iv = paired_interval(arm(a), arm(b))
        L.append(f"| {what} | {la} | {lb} | {iv['mean_a']:.2f} | {iv['mean_b']:.2f} | {iv['diff']:+.2f} | "
                 f"[{iv['lo']:+.2f}, {iv['hi']:+.2f}] | {verdict(iv)} |")
    return L + [""]


def criteria_rows(cfg, reps: list[dict]) -> list[tuple[str, str, str, bool]]:
    """The fidelity criteria of docs/experiments/premise_criteria.md (C1-C7), read off the foundation cards (mean
    over the replicates), the DM's trained share of the weights and the step ratio: (criterion, value, threshold,
    met)."""
    mean = lambda k: statistics.fmean(rep["card"].get(k, float("nan")) for rep in reps)
    cap, draw, head = mean("caption_exact"), mean("draw_exact"), mean("image_head_tokens")
    lora = statistics.fmean(rep["runs"].get("dm", {}).get("trained_fraction", 1.0) for rep in reps)
    return [("C1 captioning well above drawing", f"{cap:.2f} vs {draw:.2f}", ">= 2x and >= +0.10",
             cap >= 2 * draw and cap - draw >= 0.10),
            ("C2 image output works", f"{draw:.2f}", ">= 0.05", draw >= 0.05),
            ("C3 instruction token types that were targets", f"{mean('target_types'):.3f}", "1.0",
             mean("target_types") == 1.0),
            ("C4 generation share of pre-training", f"{mean('gen_share'):.2f}", "<= 0.25", mean("gen_share") <= 0.25),
            ("C5 image-head stage small", "no stage" if math.isnan(head) else f"{head / mean('loss_tokens'):.2f}",
             "<= 0.10 of pre-training's loss tokens", not math.isnan(head) and head <= 0.10 * mean("loss_tokens")),
            ("C6 trained share of the DM's weights", f"{100 * lora:.2f}%", "0.28% .. 1.14%", 0.0028 <= lora <= 0.0114),
            ("C7 WM steps over DM steps", f"{cfg.wm_steps_ratio:g}", "4", cfg.wm_steps_ratio == 4)]


def premise_sections(cfg, reps: list[dict], ns: list[int]) -> list[str]:
    """The premise's report sections for reproduce.py: the foundation card with the fidelity criteria, the power
    lines and, when run, the label arms."""
    S = [rep["R"] for rep in reps]
    crit = criteria_rows(cfg, reps)
    L = card_section([rep["card"] for rep in reps])
    L += [f"Fidelity to the paper's setting ({sum(c[3] for c in crit)} of {len(crit)} criteria met):", "",
          "| criterion | this run | threshold | met |", "|---|---|---|---|",
          *[f"| {c} | {v} | {t} | {'yes' if m else 'no'} |" for c, v, t, m in crit], ""]
    return L + power_section(S, ns) + (arms_section(S) if all("arms" in r for r in S) else [])


def read_results(path: str) -> dict:
    """A run's results.json, or a committed one (results.json.gz); a folder means its results.json."""
    path = os.path.join(path, "results.json") if os.path.isdir(path) else path
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def stage_hash(res: dict, r: int, stage: str) -> str | None:
    """Replicate r's sha256 of a stage's output, from the provenance ("data 69b3... pretrain b163... ...")."""
    words = res.get("provenance", {}).get("stage_hashes", {}).get(f"rep{r}", "").split()
    return dict(zip(words[::2], words[1::2])).get(stage)


def dose_response(cells: list[str], png: str | None, names: list[str] | None = None) -> list[str]:
    """Finding 1 as a dose-response (docs/experiments/premise_criteria.md): one reproduce.py run per cell (a
    generation share x an adaptation; its folder or results.json[.gz]). Returns Markdown: the DM - WM gap in solved
    test items per cell (paired interval, verdict, the measured generation share from the foundation cards), then the
    differences between cells' gaps that the design's expectations name (within an adaptation, each share against the
    next higher one; at a share, LoRA against full fine-tuning), paired item by item where the cells share their
    worlds (the same test items), with the smallest difference they could show (MDE). Draws the gap against the
    measured share, one line per adaptation, to `png` if given (bands: +- one standard error). A run made before the
    card existed takes the generation share of a cell whose pre-trained model is the same file (the same sha256).
    `names`: how the table names the cells (default: as given)."""
    runs = [read_results(c) for c in cells]
    shares = {stage_hash(res, r, "pretrain"): rep["card"]["gen_share"] for res in runs
              for r, rep in enumerate(res["replicates"]) if rep.get("card")}
    rows, series, gaps = [], {}, []
    for cell, res in zip(names or cells, runs):
        cfg, (c,) = res["config"], [c for c in res["findings"] if c["metric"] == "solved"][:1]
        share = statistics.fmean(rep["card"]["gen_share"] if rep.get("card") else
                                 shares.get(stage_hash(res, r, "pretrain"), math.nan)
                                 for r, rep in enumerate(res["replicates"]))  # nan: no card tells it
        adapt = f"LoRA r={cfg['lora_r']}" if cfg.get("lora_r") else "full fine-tuning"
        rows.append(f"| {cell} | {'unknown' if math.isnan(share) else f'{share:.2f}'} | {adapt} | "
                    f"{len(res['replicates'])} | {c['mean_a']:.2f} | {c['mean_b']:.2f} | {c['diff']:+.2f} | "
                    f"[{c['lo']:+.2f}, {c['hi']:+.2f}] | {verdict(c)} |")
        if math.isnan(share):
            continue  # neither drawn nor paired
        series.setdefault(adapt, []).append((round(100 * share), c["diff"], (c["hi"] - c["lo"]) / (2 * Z95)))
        S = [rep["R"] for rep in res["replicates"] if "R" in rep]  # per-item records (absent: no paired differences)
        gaps.append({"share": round(share, 2), "adapt": adapt,  # gap: [replicate][item] DM solved - WM solved
                     "worlds": [stage_hash(res, r, "data") for r in range(len(res["replicates"]))],
                     "gap": [[x - y for x, y in zip(*p)] for p in zip(*solved(S))] if S else None})
    if png and series:
        curve_png({k: sorted(v) for k, v in series.items()}, png, "DM - WM solved", xlog=False,
                  title="finding 1: DM - WM solved (test) vs generation share of pre-training (%)")
    pairs = []
    for adapt in dict.fromkeys(g["adapt"] for g in gaps):  # within an adaptation, each share against the next higher
        ladder = sorted((g for g in gaps if g["adapt"] == adapt), key=lambda g: g["share"])
        pairs += [(a, b) for a, b in zip(ladder, ladder[1:]) if a["share"] < b["share"]]
    pairs += [(a, b) for a in gaps for b in gaps if a["share"] == b["share"] and a["adapt"] != b["adapt"]
              and b["adapt"] == "full fine-tuning"]  # LoRA against full fine-tuning at one share
    diffs = []
    for a, b in pairs:
        if not (a["gap"] and b["gap"]) or a["worlds"] != b["worlds"] or None in a["worlds"]:  # not the same items
            continue
        iv = paired_interval(a["gap"], b["gap"])
        diffs.append(f"| gap({a['share']:.2f}, {a['adapt']}) − gap({b['share']:.2f}, {b['adapt']}) | {len(a['gap'])} | "
                     f"{iv['diff']:+.2f} | [{iv['lo']:+.2f}, {iv['hi']:+.2f}] | "
                     f"{POWER80 * (iv['hi'] - iv['lo']) / (2 * Z95):.2f} | {verdict(iv)} |")
    L = ["| cell | generation share | adaptation | replicates | DM solved | WM solved | DM − WM | 95% interval "
         "| verdict |", "|---|---|---|---|---|---|---|---|---|", *rows, ""]
    if diffs:
        L += ["| difference of gaps | replicates | A − B | 95% interval | MDE | verdict |",
              "|---|---|---|---|---|---|", *diffs, ""]
    return L


# ----------------------------------------------------------------------------------------------------------------
# Your run against the reference run of its arithmetic (committed under docs/reference/)

REFERENCE_DIR = os.path.join(HERE, "docs", "reference")
NOT_SETTINGS = ("out", "jobs", "threads", "replicates", "replicate", "pool", "device", "curve_every")  # change the
# wall time, or which replicates one invocation runs or pools, not numbers


def reference_name(config: dict) -> str:
    """The folder of the reference a run compares with: preset and arithmetic, e.g. laptop-bfloat16."""
    return f"{config['preset']}-{config['dtype']}"


def load_reference(name: str) -> dict | None:
    """A committed reference run: its results.json (findings, config, per-item records) and machine.json."""
    path = os.path.join(REFERENCE_DIR, name, "results.json.gz")
    if not os.path.exists(path):
        return None
    res = read_results(path)
    with open(os.path.join(REFERENCE_DIR, name, "machine.json")) as f:
        res["machine"] = json.load(f)
    if "seconds" not in res:  # a run from before results.json kept its wall time: its report's first lines say it
        with open(os.path.join(REFERENCE_DIR, name, "report.md")) as f:
            res["seconds"] = 60 * float(re.search(r" in ([\d.]+) min", f.read()).group(1))
    return res


def against_reference(config: dict, found: list[dict], tables_hash: str) -> list[str]:
    """Report lines: per finding, this run's verdict and difference beside the reference's. A difference inside the
    reference's 95% interval is within what the sampling of test items explains; outside it, the run differs by
    more (other arithmetic, settings or code)."""
    name = reference_name(config)
    ref = load_reference(name)
    L = ["## Your run against the reference", ""]
    if ref is None:
        held = ", ".join(n for n, _ in references()) or "none"
        return L + [f"No reference run for preset `{config['preset']}` in `{config['dtype']}` is committed "
                    f"(docs/reference/ holds: {held}).", ""]
    rp = ref["provenance"]
    changed = [k for k in config if k not in NOT_SETTINGS and k in ref["config"] and config[k] != ref["config"][k]]
    L += [f"Reference `docs/reference/{name}/`: `{ref['machine']['command']}` at commit {rp['commit']}, "
          f"{len(ref['replicates'])} replicate(s), {ref['machine']['cpu']}, report tables {rp['tables']}. "
          + ("**Your tables are the reference's, byte for byte.**" if rp["tables"] == tables_hash else
             "Your tables differ from the reference's.")
          + (f" Your settings differ from the reference's in {', '.join(f'`--{k}`' for k in changed)}, so "
             "differences are expected." if changed else ""), "",
          "| finding | metric | your A − B | reference A − B [95%] | inside | your verdict | reference verdict |",
          "|---|---|---|---|---|---|---|"]
    refs = {(c["what"], c["metric"]): c for c in ref["findings"]}
    same = inside = n = 0
    for c in found:
        r = refs.get((c["what"], c["metric"]))
        if r is None:
            continue
        n, ok, agree = n + 1, r["lo"] <= c["diff"] <= r["hi"], verdict(c) == verdict(r)
        same, inside = same + agree, inside + ok
        L.append(f"| {c['what']} | {c['metric']} | {c['diff']:+.2f} | {r['diff']:+.2f} [{r['lo']:+.2f}, "
                 f"{r['hi']:+.2f}] | {'yes' if ok else '**no**'} | {verdict(c)} | {verdict(r)}"
                 f"{'' if agree else ' (differs)'} |")
    L += ["", f"{same} of {n} verdicts are the reference's; {inside} of {n} of your differences lie inside the "
          "reference's interval. A verdict that differs while your difference lies inside the interval is a "
          "finding the reference itself could not pin down (near a boundary of the rule); a difference outside it "
          "means your run differs from the reference by more than the sampling of test items explains: another "
          "arithmetic, other settings or other code (compare the header's commit and stage hashes).", ""]
    return L


# ----------------------------------------------------------------------------------------------------------------
# The README's generated blocks and docs/results.md (python report.py)

METHOD = ("tokenizer", "model", "train", "train_dynamics", "train_world", "bootstrap", "search", "eval")
CODE_MAP = (  # (paper, object "module.name[.method]", what to read there), in reading order
    ("Sec. 3: the VQ image tokenizer (Chameleon's VQGAN)", "tokenizer.ImageTokenizer", "encode, quantise, decode"),
    ("Sec. 3: the early-fusion transformer", "model.Chameleon", "one stream of text and image ids"),
    ("", "model.Block", "pre-norm attention + SwiGLU, QK-norm, RoPE"),
    ("Sec. 3: sampling an image, token by token", "model.generate_image", "KV-cached, image ids only"),
    ("App. H: the one training loop", "train.train", "DDP/FSDP, LoRA, resume, Ctrl-C saves"),
    ("", "train.weighted_nll", "per-token loss weights (Eq. 2 plugs in here)"),
    ("Sec. 3.1: the dynamics model (DM)", "train_dynamics.dm_example", "loss on the action text only"),
    ("", "train_dynamics.score_actions", "log p(action | source, target): the verifier's score"),
    ("Sec. 3.1: the world model (WM)", "train_world.wm_example", "loss on the target image tokens"),
    ("**Eq. 2: the recognition-weighted loss**", "train_world.recognition_weights", "w_l = ||z_s - z_t||^2"),
    ("Sec. 3.2, Eq. 1, Alg. 1: labelling video", "bootstrap.label_pairs", "the DM labels frame pairs"),
    ("", "bootstrap.stratified_top_k", "keep the top K, round-robin over verbs"),
    ("Sec. 3.3: verification (best-of-N)", "search.best_of_n", "the DM reranks N WM samples"),
    ("Sec. 4: Aurora-Bench evaluation", "eval.eval_wm", "judge scores per subset"),
)


def code_span(obj: str) -> tuple[str, int, int]:
    """(file, first line, last line) of a module-level function or class, or a class's method: "mod.name[.meth]"."""
    mod, *names = obj.split(".")
    path = os.path.join(HERE, mod + ".py")
    body = ast.parse(open(path).read()).body
    node = None
    for name in names:
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name), None)
        if node is None:
            raise UserError(f"report.CODE_MAP: {obj} not found in {mod}.py")
        body = node.body
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return mod + ".py", first, node.end_lineno


def code_map_lines() -> list[str]:
    L = ["| paper | code | what it does |", "|---|---|---|"]
    for paper, obj, what in CODE_MAP:
        f, a, b = code_span(obj)
        L.append(f"| {paper} | [`{obj.split('.', 1)[1]}`, {f}:{a}-{b}]({f}#L{a}-L{b}) | {what.replace('|', '∣')} |")
    return L


def imports_of(path: str) -> set[str]:
    """The project modules a file imports at its top level."""
    mods = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py"))}
    found = set()
    for n in ast.parse(open(path).read()).body:
        names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""] \
            if isinstance(n, ast.ImportFrom) else []
        found |= {m.split(".")[0] for m in names} & mods
    return found


def file_lines() -> list[str]:
    """The file table: the method files in reading order, then the harness in import order (a file after what it
    imports; ties by name), each with its line count, direct project imports and its docstring's first sentence."""
    paths = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(HERE, "*.py"))}
    deps = {m: imports_of(p) - {m} for m, p in paths.items()}
    order, done = [m for m in METHOD if m in paths], set()
    while len(order) < len(paths):
        ready = sorted(m for m in paths if m not in done and m not in METHOD and deps[m] - set(METHOD) <= done)
        if not ready:
            raise UserError(f"import cycle among {sorted(set(paths) - done - set(METHOD))}")
        done.add(ready[0])
        order.append(ready[0])
    L = ["| file | lines | kind | imports (project) | what it is |", "|---|---|---|---|---|"]
    totals = {"method": 0, "harness": 0}
    for m in order:
        text = open(paths[m]).read()
        doc = (ast.get_docstring(ast.parse(text)) or "").split("\n\n")[0].replace("\n", " ")
        first = re.split(r"(?<!Sec)(?<!Eq)(?<!App)(?<!e\.g)[.:;]\s", doc + " ", maxsplit=1)[0]
        first = first if len(first) <= 100 else first[:first.rfind(" ", 0, 97)] + " ..."
        kind = "method" if m in METHOD else "harness"
        n = text.count("\n")
        totals[kind] += n
        L.append(f"| [{m}.py]({m}.py) | {n} | {kind} | {', '.join(sorted(deps[m])) or '-'} | {first} |")
    return L + ["", f"Method files: {totals['method']:,} lines; harness files: {totals['harness']:,} lines."]


def references(preset: str = "") -> list[tuple[str, dict]]:
    """The committed reference runs (of `preset` only, when given), bf16 before fp32."""
    names = sorted(os.listdir(REFERENCE_DIR)) if os.path.isdir(REFERENCE_DIR) else []
    return [(n, load_reference(n)) for n in sorted(names, key=lambda n: ("float32" in n, n))
            if os.path.exists(os.path.join(REFERENCE_DIR, n, "results.json.gz")) and n.startswith(preset)]


def short_dtype(name: str) -> str:
    return "bf16" if "bfloat16" in name else "fp32"


def results_lines() -> list[str]:
    refs = references("laptop-")
    if not refs:
        return ["No reference run is committed yet (docs/reference/)."]
    head = "| | " + " | ".join(f"{short_dtype(n)} reference" for n, _ in refs) + " |"
    row = lambda label, f: f"| {label} | " + " | ".join(f(n, r) for n, r in refs) + " |"
    L = ["Reference runs of the main job, one replicate each, rendered from `docs/reference/` by `python report.py`"
         " (the full reports: `docs/results.md`):", "", head, "|---|" + "---|" * len(refs),
         row("command", lambda n, r: f"`{r['machine']['command']}`"),
         row("machine", lambda n, r: f"{r['machine']['cpu']}, torch {r['provenance']['torch']}"),
         row("arithmetic", lambda n, r: r["provenance"]["dtype"]),
         row("commit", lambda n, r: f"`{r['provenance']['commit']}`"),
         row("wall", lambda n, r: f"{r['seconds'] / 60:.1f} min" + (f" ({r['machine']['wall_note']})"
                                                                     if r["machine"].get("wall_note") else "")),
         row("report tables", lambda n, r: f"`{r['provenance']['tables']}`"), "",
         "| finding | metric | A | B | " + " | ".join(f"{short_dtype(n)}: A, B | A − B [95%] | verdict"
                                                   for n, _ in refs) + " |",
         "|---|---|---|---|" + "---|---|---|" * len(refs)]
    for i, c in enumerate(refs[0][1]["findings"]):
        cells = []
        for _, r in refs:
            f = r["findings"][i]
            cells.append(f"{f['mean_a']:.2f}, {f['mean_b']:.2f} | {f['diff']:+.2f} [{f['lo']:+.2f}, {f['hi']:+.2f}]"
                         f" | **{verdict(f)}**")
        L.append(f"| {c['what']} | {c['metric']} | {c['a']} | {c['b']} | " + " | ".join(cells) + " |")
    return L


def stage_time_lines() -> list[str]:
    """The bf16 reference's stage table (from its report.md), in minutes."""
    refs = references("laptop-")
    if not refs:
        return ["No reference run is committed yet (docs/reference/)."]
    name, ref = refs[0]
    text = open(os.path.join(REFERENCE_DIR, name, "report.md")).read()
    rows = re.findall(r"^\| ([^|]+) \| (\d+) \|$", text.split("| stage | seconds |")[1].split("\n\n")[0], re.M)
    L = [f"| stage ({short_dtype(name)} reference, {ref['machine']['cpu']}) | minutes |", "|---|---|"]
    L += [f"| {stage} | {int(sec) / 60:.1f} |" for stage, sec in rows]
    note = f" ({ref['machine']['wall_note']})" if ref["machine"].get("wall_note") else ""
    return L + [f"| whole job{note} | {ref['seconds'] / 60:.1f} |"]


def class_lines() -> list[str]:
    """The class preset's reference run, in brief: what a lab session's run takes and shows."""
    refs = references("class-")
    if not refs:
        return ["No reference run of the class preset is committed yet (docs/reference/)."]
    name, r = refs[0]
    R, find = r["replicates"][0]["R"], {(f["what"], f["a"]): f for f in r["findings"]}
    cell = lambda f: f"{f['diff']:+.2f} [{f['lo']:+.2f}, {f['hi']:+.2f}], **{verdict(f)}**"
    rows = [("run", f"`{r['machine']['command']}`, {r['machine']['cpu']}, {r['seconds'] / 60:.1f} min"
                    + (f" ({r['machine']['wall_note']})" if r["machine"].get("wall_note") else "")),
            ("the DM's action accuracy on test (greedy)", f"{R['dm']['action_acc']:.2f}"),
            ("DM-verified best-of-8 over N = 1 (C-FT, score)",
             cell(find[("DM-verified best-of-8 improves C-FT over N=1", "C-FT, N=8")])),
            ("the DM's pick over a random pick of the same 8 (C-FT, score)",
             cell(find[("the DM picks better than chance among 8 candidates (C-FT)", "DM pick of 8")]))]
    return [f"| class preset reference (`docs/reference/{name}/`) | |", "|---|---|",
            *[f"| {a} | {b} |" for a, b in rows]]


def results_doc() -> str:
    """docs/results.md: each reference run's full report, its pictures' paths made relative to docs/."""
    L = ["# Results of the reference runs", "", "Rendered by `python report.py` from `docs/reference/<run>/` "
         "(report.md, results.json.gz with every per-item record, machine.json); do not edit by hand.", ""]
    for name, ref in references():
        text = open(os.path.join(REFERENCE_DIR, name, "report.md")).read()
        text = re.sub(r"\]\((?:rep0/)?([\w.]+\.png)\)", rf"](reference/{name}/\1)", text)
        text = "\n".join("#" + ln if ln.startswith("#") else ln for ln in text.split("\n"))
        L += [f"## {name}: {ref['machine']['cpu']}", "", text.strip(), ""]
    return "\n".join(L)


def render_blocks(text: str, blocks: dict, where: str) -> str:
    """`text` (the file `where`) with every generated block between its BEGIN and END markers replaced by the current
    render: blocks, name -> the function giving its lines."""
    for name, fn in blocks.items():
        pat = re.compile(rf"(<!-- BEGIN {name}[^\n]*-->\n)(.*?)(<!-- END {name} -->)", re.S)
        if not pat.search(text):
            raise UserError(f"{where}: no <!-- BEGIN {name} --> ... <!-- END {name} --> block")
        text = pat.sub(lambda m, fn=fn: m.group(1) + "\n".join(fn()) + "\n" + m.group(3), text)
    return text


def render_readme(text: str) -> str:
    """README.md with its generated blocks rendered."""
    return render_blocks(text, {"code-map": code_map_lines, "results": results_lines, "stage-times": stage_time_lines,
                                "class-preset": class_lines, "files": file_lines}, "README.md")


# The dose-response's cells run so far (docs/experiments/premise_criteria.md, addendum 3): each run's results.json,
# committed compressed with its per-item records; today's share with full fine-tuning is the bf16 reference run
DOSE_CELLS = ("docs/experiments/dose/share10_lora.json.gz", "docs/experiments/dose/share40_lora.json.gz",
              "docs/experiments/dose/share69_lora.json.gz", "docs/reference/laptop-bfloat16/results.json.gz")
DOSE_PNG = "docs/experiments/dose/dose_response.png"


def dose_lines(png: str | None = None) -> list[str]:
    """docs/premise.md's dose-response block: report.dose_response over the committed cells (the PNG drawn to `png`
    when given: python report.py draws it, --check does not)."""
    cells = [c for c in DOSE_CELLS if os.path.exists(os.path.join(HERE, c))]
    if not cells:
        return ["No cell of the dose-response is committed yet."]
    L = dose_response([os.path.join(HERE, c) for c in cells], png, names=cells)  # named by the repository's paths
    drawn = os.path.exists(os.path.join(HERE, DOSE_PNG))
    return L + ([f"![dose-response]({os.path.relpath(DOSE_PNG, 'docs')})"] if drawn else [])


def render_premise(text: str, png: str | None = None) -> str:
    """docs/premise.md with its generated block rendered."""
    return render_blocks(text, {"dose-response": lambda: dose_lines(png)}, "docs/premise.md")


@dataclass
class RenderConfig:
    check: bool = False  # only compare README.md, docs/results.md and docs/premise.md with their render: exit 1 when
    # they differ


def main(argv=None):
    cfg = parse_config(RenderConfig, argv, description="Render the README's generated blocks, docs/results.md and "
                       "docs/premise.md's.")
    premise = os.path.join(HERE, "docs", "premise.md")
    targets = {os.path.join(HERE, "README.md"): render_readme(open(os.path.join(HERE, "README.md")).read()),
               os.path.join(HERE, "docs", "results.md"): results_doc(),
               premise: render_premise(open(premise).read(), None if cfg.check else os.path.join(HERE, DOSE_PNG))}
    stale = [p for p, new in targets.items() if not os.path.exists(p) or open(p).read() != new]
    if cfg.check:
        print("up to date" if not stale else "differs from its render: " + ", ".join(stale))
        sys.exit(1 if stale else 0)
    for p in stale:
        atomic_write(p, targets[p])
        print(f"rendered {os.path.relpath(p, HERE)}")


if __name__ == "__main__":
    run(main)
