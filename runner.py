"""How reproduce.py runs its stages: the machinery under the pipeline, none of the paper's method.

- StageCache: a replicate's results cache (a stage is skipped when its results exist for the same settings) and
  run_training, which trains one model or reuses / resumes it;
- Jobs: runs that need nothing from each other, side by side in one-thread worker processes, and what such a
  worker runs (train_stage: a fine-tuning run with its learning curve); eval_job: a saved WM's test evaluation;
- Clock: the job's progress bar, each stage's wall seconds and each task's cost;
- critical_path and list_schedule: the longest chain of dependent tasks of the stage graph, and the wall a greedy
  schedule of that graph gives on a given number of cores (the report's time table).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import multiprocessing
import os
import shutil
import statistics
import time
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager, nullcontext

import torch
from tqdm import tqdm

import world
from checkpoint import load_model
from common import atomic_write, autocast, claim_dir
from eval import eval_dm, eval_search_controls, eval_wm
from foundation import trained_fraction
from ranks import Chunks, launch
from tokenizer import ImageTokenizer
from train import train
from train_dynamics import dm_examples
from train_world import wm_examples


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def claim_shared(path: str, who: str):
    """common.claim_dir, without its lock, for a folder that several jobs may claim at the same moment (a job array's
    replicates, each writing only into its own out/rep<r>/, which it claims and locks): the loser of the race for the
    marker's rename finds it there next time."""
    try:
        claim_dir(path, who, lock=False)
    except FileNotFoundError:  # the other job renamed the shared temporary file first
        claim_dir(path, who, lock=False)


def usable_cores() -> int:
    """The cores this process may run on (`taskset` / cgroup affinity), not all the machine has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------------------
# The results cache


def settings_hash(cfg, keys, replicate: int = 0) -> str:
    # the world's generation version and the replicate too: a stage trained on another world is not reused
    blob = json.dumps({**{k: getattr(cfg, k) for k in keys}, "data_version": world.DATA_VERSION,
                       "replicate": replicate}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class StageCache:
    """Results cache of one replicate: <root>/stages/<name>.json holds a stage's results and the hash of the settings
    it ran with: `keys(name)` (the settings that stage reads; the pipeline defines them) and the replicate."""

    def __init__(self, root: str, cfg, replicate: int = 0):
        self.root, self.cfg, self.replicate = os.path.join(root, "stages"), cfg, replicate

    def keys(self, name: str) -> tuple:
        raise NotImplementedError

    def hash(self, name: str) -> str:
        return settings_hash(self.cfg, self.keys(name), self.replicate)

    def get(self, name: str):
        path = os.path.join(self.root, name + ".json")
        if os.path.exists(path):
            with open(path) as f:
                rec = json.load(f)
            if rec.get("hash") == self.hash(name):
                return rec["result"]
        return None

    def put(self, name: str, result):
        os.makedirs(self.root, exist_ok=True)
        atomic_write(os.path.join(self.root, name + ".json"), json.dumps({"hash": self.hash(name), "result": result},
                                                                        indent=1))
        return result


def run_training(cfg, stages: StageCache, name: str, tcfg, examples, tok, device, init=None, val_examples=None,
                 evaluate=None, ranks: int = 1):
    """Train (or resume / reuse) one model; returns (model, stage result). `init` = a checkpoint to start from.
    `ranks`: each step's gradient as the sum of this many batch chunks (train_chunked; ranks.launch runs them as
    processes where the cores allow)."""
    ckpt = os.path.join(tcfg.out_dir, "ckpt")
    done = stages.get(name)
    if done is not None and os.path.exists(os.path.join(ckpt, "meta.json")):
        return load_model(ckpt, device)[0], done
    # a checkpoint left by an interrupted run resumes only if it was made with the same settings; a folder that
    # worldboot did not create (no marker) is never deleted: claim_dir refuses it
    marker = os.path.join(tcfg.out_dir, "stage_hash.txt")
    claim_dir(tcfg.out_dir, "reproduce.py")
    if os.path.exists(marker) and open(marker).read() != stages.hash(name):
        log(f"{name}: {tcfg.out_dir} was trained with other settings: deleting it and training again")
        shutil.rmtree(tcfg.out_dir)
        claim_dir(tcfg.out_dir, "reproduce.py")
    atomic_write(marker, stages.hash(name))
    t0 = time.time()
    start = None
    if init is not None:
        start = load_model(init, "cpu")[0]  # a fresh copy of the starting point
    model, hist = launch(train_chunked, ranks, rank_processes(ranks, device), tcfg.out_dir, tcfg, examples, tok,
                         threads=tcfg.threads, val_examples=val_examples, evaluate=evaluate, model=start)
    # every step trains on batch_size sequences padded to the longest example (train.collate): the tokens computed
    T = max(len(x) for x, _ in examples)
    c = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)  # lm_head counts
    result = {"seconds": round(time.time() - t0, 1), "final_loss": hist[-1]["loss"] if hist else None,
              "examples": len(examples), "dtype": tcfg.dtype,
              "tokens_per_s": round(len(hist) * tcfg.batch_size * T / max(1e-9, time.time() - t0), 1),
              # training FLOPs per token: 6 x the matrix parameters + attention scores (as bench.py's MFU)
              "flops_per_token": 6 * params + 12 * c.n_layer * T * c.n_embd,
              **({"trained_fraction": trained_fraction(model, tcfg.task)}  # LoRA or the image head: what trained
                 if tcfg.lora_r or tcfg.task == "image_head" else {})}
    log(f"{name}: {result}")
    return model.to(device), stages.put(name, result)


def rank_processes(ranks: int, device) -> bool:
    """Whether ranks.launch runs `ranks` chunks as processes: on a CPU with that many usable cores (else one process
    computes them in turn: the same numbers, slower)."""
    return torch.device(device).type == "cpu" and usable_cores() >= ranks


def train_chunked(tcfg, examples, tok, chunks: Chunks, **kw):
    """train.train with each global batch in chunks.n contiguous chunks: one per DDP rank process, or all in this
    process as gradient accumulation (grad_accum). For 2 chunks the two add the same numbers: DDP all-reduces
    2 g0 + 2 g1 and halves it (exact: powers of two), accumulation adds g0 + g1 (IEEE addition commutes)."""
    return train(dataclasses.replace(tcfg, grad_accum=tcfg.grad_accum * chunks.n // chunks.world), examples, tok, **kw)


# ----------------------------------------------------------------------------------------------------------------
# Worker processes and the clock


class Clock:
    """The whole job's progress bar (stages done / total, with tqdm's ETA), the wall seconds of each stage (the
    report's time table) and the cost of each task of the stage graph: the CPU seconds of the one-thread process that
    ran it, i.e. its time alone on a core (`wall=True`: its wall seconds, for a GPU, where nothing runs beside it)."""

    def __init__(self, total: int, wall: bool = False):
        self.bar = tqdm(total=total, desc="reproduce", unit="stage", dynamic_ncols=True)
        self.seconds: dict[str, float] = {}
        self.costs: dict[str, float] = {}
        self.widths: dict[str, int] = {}  # the tasks that hold more than one core: how many
        self.last, self.wall = time.time(), wall

    def done(self, name: str, stages: int = 1):
        now = time.time()
        self.seconds[name] = round(now - self.last, 1)
        self.last = now
        self.bar.set_postfix_str(name[:40])
        self.bar.update(stages)

    def mark(self) -> tuple[float, set]:
        """Now, for save: (time, the stages done so far)."""
        return time.time(), set(self.seconds)

    def save(self, path: str, mark: tuple[float, set], prefix: str, **facts):
        """Since `mark`: the wall, the stages' seconds and the costs of the tasks named prefix..., with `facts`, as
        JSON in `path`."""
        atomic_write(path, json.dumps({"wall": round(time.time() - mark[0], 1), **facts,
                                       "seconds": {k: v for k, v in self.seconds.items() if k not in mark[1]},
                                       "costs": {k[len(prefix):]: v for k, v in self.costs.items()
                                                 if k.startswith(prefix)},
                                       "widths": {k[len(prefix):]: v for k, v in self.widths.items()
                                                  if k.startswith(prefix)}}, indent=1))

    @contextmanager
    def task(self, name: str, cores: int = 1):
        """Records the cost of the work done in this process inside the `with` block as task `name`. `cores` > 1: the
        work runs in that many rank processes (ranks.launch), one core each, while nothing else runs; the task then
        costs its wall seconds on that many cores (this process's own CPU time would leave their work out)."""
        t, c = time.time(), time.process_time()
        yield
        self.add(name, time.time() - t if self.wall or cores > 1 else time.process_time() - c)
        if cores > 1:
            self.widths[name] = cores

    def add(self, name: str, seconds: float):
        """`seconds` more of task `name`'s cost (a task may run in parts)."""
        self.costs[name] = round(self.costs.get(name, 0.0) + seconds, 1)


def timed(fn, *args):
    """fn(*args) in a worker: (its result, the worker's CPU seconds for it)."""
    c = time.process_time()
    return fn(*args), time.process_time() - c


class Jobs:
    """Jobs side by side in `n` worker processes ("spawn", so that no worker inherits the parent's torch threads), or
    one after the other in this process when n = 1. A job named `task` has its cost recorded in `clock`."""

    def __init__(self, n: int, clock: Clock | None = None):
        self.pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) if n > 1 else None
        self.clock = clock

    def submit(self, fn, *args, task: str = "") -> Future:
        """fn(*args) in a worker (queued until one is free), or here and now without a pool."""
        if self.pool is None:
            done = Future()
            with self.clock.task(task) if self.clock and task else nullcontext():
                done.set_result(fn(*args))
            return done
        out = Future()

        def unwrap(job: Future):  # (result, cost) -> result, the cost to the clock
            if job.exception() is not None:
                out.set_exception(job.exception())
                return
            result, cpu = job.result()
            if self.clock and task:
                self.clock.add(task, cpu)
            out.set_result(result)

        self.pool.submit(timed, fn, *args).add_done_callback(unwrap)
        return out

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


# The stages' work from what is saved in out/rep<r>/: a fine-tuning run (with its learning curve) as a worker's job,
# a WM's test evaluation


def train_stage(cfg, stages: StageCache, name: str, tcfg, examples, tok, device, init,
                curve: dict | None = None) -> dict:
    """`run_training` as a job (possibly in a worker process): returns the stage result only; the caller loads the
    model from the checkpoint, so nothing but a small dict crosses the process boundary. `curve` (the validation
    items, their codes, the VQGAN's folder, temperature, seed, kind "dm" or "wm"): the solved rate on those items
    every cfg.curve_every steps, written to the run's metrics.jsonl as `val_solved`."""
    torch.set_num_threads(cfg.threads)  # a spawned worker starts with torch's default (one per core)
    val_ex = evaluate = None
    if curve is not None:
        tcfg = dataclasses.replace(tcfg, eval_every=cfg.curve_every, eval_items=len(curve["items"]))
        items, codes, T, seed = curve["items"], curve["codes"], curve["temperature"], curve["seed"]
        if curve["kind"] == "dm":
            val_ex = dm_examples(items, codes, tok)
            evaluate = lambda m, step: {"val_solved": eval_dm(m, tok, items, codes, T, seed)[0]["action_acc"]}
        else:
            val_ex, vq = wm_examples(items, codes, tok), ImageTokenizer.load(curve["vq"]).eval().to(device)
            evaluate = lambda m, step: {"val_solved": statistics.fmean(
                float(rec.get("success") == 10) for rec in eval_wm(m, tok, vq, items, codes, seed=seed,
                                                                   temperature=T)[2])}
    return run_training(cfg, stages, name, tcfg, examples, tok, device, init=init, val_examples=val_ex,
                        evaluate=evaluate)[1]


def eval_job(cfg, folder: str, tok, device, items, codes: dict, seed: int, n: int):
    """A trained WM's test evaluation: (metrics, per-item records, and with n > 0 the DM-scored pool of n candidates
    per item with its controls, eval.eval_search_controls, else None). Models and the VQGAN are read from
    out/rep<r>/."""
    wm = load_model(os.path.join(cfg.out, folder, "ckpt"), device)[0]
    image_tok = ImageTokenizer.load(os.path.join(cfg.out, "tok", "vq")).eval().to(device)
    with autocast(cfg.dtype, device.type):
        metrics, _, records = eval_wm(wm, tok, image_tok, items, codes, seed=seed, temperature=cfg.temperature)
        if not n:
            return metrics, records, None
        # best-of-N and its controls from ONE pool of max(ns) candidates per item: best-of-k is the DM's pick among
        # the first k (k = 1: the first candidate, a plain WM sample); the controls pick among the same candidates at
        # random, by the WM's likelihood and by the judge (the ceiling). One pool costs max(ns) samples per item
        # instead of sum(ns) + max(ns) (8 instead of 23 at N = 1, 2, 4, 8), and every N's table comes from the same
        # draws.
        dm = load_model(os.path.join(cfg.out, "dm", "ckpt"), device)[0]
        dm.config.mask_image_logits = True
        pool = eval_search_controls(wm, dm, tok, image_tok, items, codes, n, seed=seed, temperature=cfg.temperature,
                                    records=True)
    return metrics, records, pool


def read_curve(path: str) -> list[tuple[int, float]]:
    """The (step, val_solved) points a run's metrics.jsonl holds."""
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [(r["step"], r["val_solved"]) for r in recs if "val_solved" in r]


# ----------------------------------------------------------------------------------------------------------------
# The schedule: graph = {task: the tasks it needs}, cost = {task: seconds on one core}


def critical_path(graph: dict[str, tuple], cost: dict[str, float]) -> tuple[float, list[str]]:
    """The longest chain of dependent tasks: (its seconds, its tasks in order). No number of cores runs the graph
    faster than this chain."""
    best: dict[str, tuple[float, list[str]]] = {}
    for t in order(graph):  # each task's longest chain ends in it; its needs come first in `order`
        before = max((best[d] for d in graph[t]), key=lambda x: x[0], default=(0.0, []))
        best[t] = (before[0] + cost.get(t, 0.0), before[1] + [t])
    return max(best.values(), key=lambda x: x[0], default=(0.0, []))


def list_schedule(graph: dict[str, tuple], cost: dict[str, float], cores: int, width: dict | None = None) -> float:
    """The wall of a greedy list schedule on `cores` cores: whenever cores are free they take the ready task with the
    longest chain still ahead of it (critical path first) that fits. A task holds one core, or width[t] (rank
    processes; on fewer cores than that its chunks run in turn, as ranks.launch does, for width[t] / cores as long). A
    prediction from the measured costs, for a machine whose cores are as fast as the ones measured."""
    need = {t: min((width or {}).get(t, 1), cores) for t in graph}
    cost = {t: cost.get(t, 0.0) * (width or {}).get(t, 1) / need[t] for t in graph}
    users = {t: [u for u in graph if t in graph[u]] for t in graph}
    ahead: dict[str, float] = {}
    for t in reversed(order(graph)):  # the longest chain from t to the end, t included
        ahead[t] = cost.get(t, 0.0) + max((ahead[u] for u in users[t]), default=0.0)
    left = {t: len(graph[t]) for t in graph}
    ready, running, now, free = [t for t in graph if not graph[t]], [], 0.0, cores
    while ready or running:
        ready.sort(key=lambda t: -ahead[t])
        for t in list(ready):
            if need[t] <= free:
                ready.remove(t)
                heapq.heappush(running, (now + cost[t], t))
                free -= need[t]
        now, t = heapq.heappop(running)
        free += need[t]
        for u in users[t]:
            left[u] -= 1
            if not left[u]:
                ready.append(u)
    return now


def order(graph: dict[str, tuple]) -> list[str]:
    """The tasks, each after the tasks it needs (a topological order; ties in the graph's own order)."""
    out, seen = [], set()

    def visit(t):
        if t not in seen:
            seen.add(t)
            for d in graph[t]:
                visit(d)
            out.append(t)

    for t in graph:
        visit(t)
    return out
