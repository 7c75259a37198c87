"""
Speed and memory of our model.py against transformers' ChameleonForConditionalGeneration, side by side in one run
(same weights, config, dtype and torch threads). Not part of the paper: it checks that the from-scratch model is a
usable base for the paper's training (Sec. 3-4) and best-of-N image generation (the world model's samples).

Measured, for ours and the reference (HF):
  - train step: tokens/s of forward + cross-entropy + backward + AdamW step on (train_batch, train_len) tokens;
  - decode: image tokens/s of KV-cached sampling of n image tokens after a short prompt, batch 1 and 8
    (ours: generate_image; HF: generate(do_sample=True, min_new_tokens=n) with a LogitsProcessor that keeps only
    the image ids, HF's own image-logit mask lifted: both sample from the same distribution; ours computes only the
    image rows of lm_head, HF the full vocabulary);
  - best-of-N: time of N candidates (one batch) + scoring them (one teacher-forced forward) over N = 1;
  - peak memory of each measurement.

Method: warm-up, then `reps` timed runs, ours and HF alternating (background load hits both alike), median reported.
Peak memory on CPU: each implementation runs every measurement once more in its own fresh subprocess; before each,
free heap is returned to the OS (malloc_trim) and the RSS high-water mark is reset (/proc/self/clear_refs = 5); the
peak is VmHWM - VmRSS-before (Linux; elsewhere ru_maxrss growth, which cannot be reset: an upper-bound-ish guess).
So it counts activations, KV cache, logits and gradients, not the weights or (after warm-up) the optimizer state.
On CUDA: torch.cuda.max_memory_allocated growth over the allocated memory before the measurement.
MFU: training FLOPs per token = 6 * N (non-embedding params + lm_head) + 12 * n_layer * T * n_embd (attention
scores, forward + backward), times tokens/s, over --peak_flops on CUDA (H100 dense bf16 = 989e12), on a CPU over the
measured best FLOP/s of its --dtype matrix products (report.peak_matmul_flops, as the report's time table).

Two more jobs live here because they are harness, not method:
  --rehearse   the README's full-scale commands (Anole-7B) run end to end on a CPU against an Anole-shaped checkpoint
               built with transformers (real widths, heads, vocabulary and 512 px VQ; 1 layer, random weights),
               with each stage's peak RSS and seconds per step, and training-step memory probes over depth and
               sequence length. JSON -> --out (default <rehearse_dir>/rehearsal.json).
  --gpu_check  one time-limited command for a GPU machine: (a) ours vs transformers in bf16 (train step tok/s and
               MFU, decode tok/s at batch 1 and 8, best-of-8 cost), (b) the 7B preset's decode with random weights,
               (c) a short reproduce.py --preset=gpu. Each part in its own subprocess and time limit. JSON -> --out.

Usage:
  python bench.py                                    # "small" config (the synthetic-world model size), CPU fp32
  python bench.py --config=small,base                # + a larger config for a more realistic ratio
  python bench.py --quick --config=micro             # seconds; what tests/test_bench.py runs
  python bench.py --device=cuda --dtype=bfloat16 --config=small,base --preset=chameleon-7b   # on a GPU machine
  python bench.py --rehearse --threads=2             # ~45 min on 2 busy cores, 8.8 GB RAM; --rehearse_size=small: 1 min
  python bench.py --gpu_check --device=cuda --dtype=bfloat16 --out=out/gpu_check.json   # < 8 min on one H100
  python bench.py --speed --dtype=float32 --threads=1   # the rows below (~6 min on 2 busy cores)

--speed: the main job's own shapes (reproduce.py's laptop preset: 4 x 128 transformer, 1,024 ids, batch 16; its VQGAN
at batch 32). First ours against transformers in --dtype (float32 = the path of CPUs without native bf16; config
`laptop`): training step (16 x 150) with its MFU, decode of 64 image tokens at batch 1 and 64, best-of-8. Then each
change as a ratio measured interleaved in one run (A, B, A, B, ...; median of --reps): bf16 autocast
vs fp32 (matrix products, the VQGAN step, the training step of pre-training / DM / WM, sampling and scoring), logits
only at the positions that carry loss vs all positions (train.sequence_nll), attention written out vs SDPA's math
kernel (bf16, model.causal_attention), best-of-N from one pool vs a pool per N, and the VQGAN and a WM training step
beside a 1-thread background process vs alone.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import model as model_py
import train
import world
from common import arg, atomic_write, autocast, native_bf16_cpu, parse_config
from common import run as run_main  # (bench.py uses `run` as a loop name)
from data import Item, write_benchmark
from model import Chameleon, ChameleonConfig, apply_lora, generate_image
from report import peak_matmul_flops
from tokenizer import ImageTokenizer, TextTokenizer, VQConfig, hf_to_ours, train_vqgan
from train import TrainConfig, sequence_nll
from train_dynamics import DM_PROMPT
from train_world import WM_PROMPT

# name -> (n_embd, n_layer, n_head, n_inner, vocab_size, n_image_codes). Image ids are the LAST n_image_codes ids.
CONFIGS = {
    "micro": (64, 2, 4, 176, 300, 64),  # for the smoke test
    "small": (256, 4, 4, 688, 1000, 256),  # the "tiny" preset at the synthetic world's size (256-code VQ)
    "base": (512, 8, 8, 1376, 1000, 256),  # 4x the width x depth: matmuls dominate more, like real models
    "large": (2048, 8, 16, 5504, 65536, 8192),  # Chameleon's vocabulary and codebook, a quarter of its depth (GPU)
    "laptop": (128, 4, 4, 352, 1024, 128),  # reproduce.py's laptop transformer (laptop_model), the main job's model
}
PROMPT_LEN = 8  # text prompt before BOI; the last prompt token is BOI (id 3)
BOI = 3


# size -> HF ChameleonConfig widths, VQConfig.chameleon() overrides and the image side. "full" is Anole-7B in all but
# depth (4096 wide, 32 heads, 11,008 SwiGLU, 65,536 ids, 512 px -> 1,024 codes of 8,192); "small" keeps its id
# layout and a vocabulary large enough for train.sequence_nll's loss-positions path, at CI size.
REHEARSAL_SIZES = {
    "full": dict(hidden_size=4096, num_attention_heads=32, intermediate_size=11008, vocab_size=65536, vq={},
                 image_size=512),
    "small": dict(hidden_size=128, num_attention_heads=4, intermediate_size=352, vocab_size=16384,
                  vq=dict(resolution=64, base_channels=32, embed_dim=32, latent_channels=64), image_size=64),
}
GPU_PARTS = ("a", "b", "c")
REHEARSAL_STAGES = ("build", "convert", "dm", "bootstrap", "wm", "search", "eval", "probes")


def _configs_ok(v: str):
    return None if {c for c in v.split(",") if c} <= set(CONFIGS) else f"a comma-separated subset of {list(CONFIGS)}"


def _scaling_ok(v: str):
    for spec in [x for x in v.split(",") if x]:
        f = spec.split(":")
        vq = len(f) == 2 and f[0] == "vq" and f[1].isdigit()
        if not vq and (len(f) not in (3, 4) or f[0] not in ("dm", "wm") or not (f[1].isdigit() and f[2].isdigit())
                       or f[3:] not in ([], ["full"])):
            return f"entries task:layers:tokens[:full] (task dm or wm) or vq:images, not {spec!r}"
    return None


@dataclass
class BenchConfig:
    config: str = arg("small", _configs_ok)  # comma-separated subset of CONFIGS ('' = none, e.g. --preset only)
    device: str = "cpu"  # cpu or cuda: where both sides run
    dtype: str = "float32"  # float32 or bfloat16 (bf16 is meant for cuda)
    threads: int = arg(torch.get_num_threads(), ">=1")  # torch intra-op threads (both sides)
    quick: bool = False  # short decodes (16/64 tokens), 1 rep: a smoke run
    reps: int = arg(3, ">=1")  # timed runs per measurement (median reported)
    decode_lens: str = arg("64,1024", "ints>=1")  # image tokens per decode measurement
    batches: str = arg("1,8", "ints>=1")  # decode batch sizes
    best_of: int = arg(8, ">=1")  # N of the best-of-N row (vs N = 1), 64-token images
    train_batch: int = arg(8, ">=1")  # sequences per training step
    train_len: int = arg(128, ">=2")  # tokens per training sequence
    hf_attn: str = "sdpa"  # the reference's attn_implementation: sdpa or eager
    no_memory: bool = False  # skip the peak-memory subprocesses
    preset: str = ""  # also time decode of this ChameleonConfig preset (chameleon-7b), random weights, ours only (cuda)
    peak_flops: float = arg(989e12, ">0")  # accelerator peak FLOP/s for MFU (cuda)
    seed: int = arg(0, ">=0")  # random weights and prompts
    results: str = "out/bench.jsonl"  # append one JSON line per run here ('' = don't)
    worker: str = ""  # internal: the memory subprocess (ours or ref)
    ckpt: str = ""  # internal: checkpoint folder for the worker
    preset_shrink: bool = False  # internal: gpu_check's CPU dry run
    # --- rehearsal: the README's full-scale commands on an Anole-shaped random checkpoint
    rehearse: bool = False  # run the rehearsal; results JSON -> --out
    rehearse_dir: str = "out/rehearsal"  # its working folder (checkpoint, data, runs)
    rehearse_size: str = arg("full", tuple(sorted(REHEARSAL_SIZES)))  # full: Anole-7B widths, heads, vocabulary and
    # VQ (512 px); small: the same layout in miniature
    rehearse_layers: int = arg(1, ">=1")  # transformer layers of the built checkpoint
    rehearse_steps: int = arg(3, ">=1")  # optimizer steps of the DM and WM fine-tuning
    scaling: str = arg("dm:1:2100,dm:2:2100,dm:4:2100,dm:1:1050,dm:1:2100:full,wm:1:2100,wm:1:2100:full,vq:4",
                       _scaling_ok)  # memory probes: a training step task:layers:tokens[:full] (full = logits at
    # every position) or VQ encode + decode of a batch, vq:images ('' = none)
    rehearse_from: str = arg("", ("", *REHEARSAL_STAGES))  # continue a rehearsal at this stage, keeping the earlier
    # stages' files and numbers
    rehearse_build: bool = False  # internal: the build stage
    rehearse_probe: str = ""  # internal: one scaling probe
    # --- GPU check (one command; each part in its own time-limited subprocess)
    gpu_check: bool = False  # run the parts below; results JSON -> --out
    gpu_parts: str = arg("a,b,c", lambda v: None if set(v.split(",")) <= set(GPU_PARTS) else f"a subset of {GPU_PARTS}")
    # a: ours vs HF (bf16 train step, MFU, decode, best-of-8); b: 7B preset decode; c: a short reproduce.py --preset=gpu
    part_limits: str = arg("170,100,180", lambda v: None if len(v.split(",")) == len(GPU_PARTS) else
                           f"{len(GPU_PARTS)} comma-separated seconds, one per part")  # seconds allowed to parts a-c
    out: str = ""  # results JSON of --rehearse / --gpu_check (default: in out/)
    speed: bool = False  # issue 14's rows at the main job's shapes (bf16 vs fp32, loss-position logits, one pool)


def parse_args(argv=None) -> BenchConfig:
    args = parse_config(BenchConfig, argv, description=__doc__.split("\n\n")[0])
    if args.quick:
        args.decode_lens, args.reps = "16,64", 1
    return args


def make_config(name: str) -> ChameleonConfig:
    C, L, H, inner, V, n_img = CONFIGS[name]
    return ChameleonConfig.preset("tiny", vocab_size=V, n_embd=C, n_layer=L, n_head=H, n_kv_head=H, n_inner=inner,
                                  max_seq_len=PROMPT_LEN + 1024 + 16, image_token_start=V - n_img,
                                  image_token_end=V, vq=VQConfig.world())  # both load the same small VQ encoder


# -----------------------------------------------------------------------------------------------------------------
# the measured workloads: each returns a closure doing one run (warm-up and timing call it repeatedly)


def train_step_fn(model, ref: bool, args, device):
    """forward + CE loss + backward + AdamW step on a fixed random batch. Both mask image logits (HF always does)."""
    V = model.config.vocab_size
    idx = torch.randint(0, V, (args.train_batch, args.train_len), device=device,
                        generator=torch.Generator(device).manual_seed(args.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def run():
        if ref:
            loss = model(input_ids=idx, labels=idx).loss  # HF shifts the labels itself
        else:
            logits = model(idx)  # (B, T, V)
            # the same loss as HF's: labels shifted left, the last position ignored (-100), so the logits are read
            # in place (a view) instead of copying logits[:, :-1]
            labels = F.pad(idx[:, 1:], (0, 1), value=-100)  # (B, T)
            loss = F.cross_entropy(logits.view(-1, V), labels.view(-1))  # mean over the B * (T - 1) real labels
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


class ImageOnly:
    """HF LogitsProcessor: every non-image id -> -inf (what generate_image does by computing image rows only)."""

    def __init__(self, lo, hi, V, device):
        self.drop = torch.ones(V, dtype=torch.bool, device=device)
        self.drop[lo:hi] = False

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.drop, float("-inf"))


def decode_fn(model, ref: bool, n: int, B: int, args, device, score: bool = False):
    """Sample n image tokens for B copies of one prompt (ending in BOI) with a KV cache. With score: then one
    teacher-forced forward over prompt + candidates and pick the candidate with the highest log-likelihood."""
    cfg = make_config(args.config_name) if ref else model.config
    lo, hi, V = cfg.image_token_start, cfg.image_token_end, cfg.vocab_size
    text = (4, lo) if lo > 4 else (hi, V)  # text ids: below the image block (CONFIGS), or above it (Chameleon)
    prompt = torch.randint(*text, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(args.seed))
    prompt[:, -1] = BOI
    idx = prompt.expand(B, -1).contiguous().to(device)
    model.eval()
    if ref:
        from transformers import LogitsProcessorList

        procs = LogitsProcessorList([ImageOnly(lo, hi, V, device)])

    @torch.no_grad()
    def run():
        torch.manual_seed(args.seed)
        if ref:
            out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=True, temperature=1.0, top_k=0, top_p=1.0, logits_processor=procs,
                                 pad_token_id=0)[:, idx.shape[1]:]
        else:
            out = generate_image(model, idx, n, boi_id=BOI)
        assert out.shape == (B, n) and bool(((out >= lo) & (out < hi)).all()), "decode left the image-id block"
        if score:
            seq = torch.cat([idx, out], dim=1)  # (B, T + n)
            logits = model(seq).logits if ref else model(seq, mask_image_logits=False)
            logits = logits[:, PROMPT_LEN - 1:-1, lo:hi].float()  # (B, n, n_codes): logits predicting each candidate
            ll = torch.log_softmax(logits, -1).gather(-1, (out - lo)[..., None]).sum((1, 2))  # (B,)
            return out[ll.argmax()]
        return out

    return run


def workloads(args):
    """(row name, builder(model, ref, device) -> run closure), in table order."""
    rows = [(f"train step ({args.train_batch}x{args.train_len})",
             lambda m, ref, d: train_step_fn(m, ref, args, d))]
    for n in [int(x) for x in args.decode_lens.split(",")]:
        for B in [int(x) for x in args.batches.split(",")]:
            rows.append((f"decode {n} b{B}", lambda m, ref, d, n=n, B=B: decode_fn(m, ref, n, B, args, d)))
    for N in (1, args.best_of):
        rows.append((f"best-of-{N} (64 tok)", lambda m, ref, d, N=N: decode_fn(m, ref, 64, N, args, d, score=True)))
    return rows


def tokens_per_run(name: str, args) -> int:
    if name.startswith("train"):
        return args.train_batch * args.train_len
    if name.startswith("decode"):
        n, b = name.split()[1:]
        return int(n) * int(b[1:])
    return 0  # best-of rows report seconds


# -----------------------------------------------------------------------------------------------------------------
# timing and memory


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm(run, device):
    run()
    run()
    sync(device)


def timed(run, device) -> float:
    sync(device)
    t = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - t


def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_mib(run, device) -> float:
    """Peak memory growth (MiB) during one run (see the module docstring for the method)."""
    gc.collect()
    if device.startswith("cuda"):
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the baseline is what is really live
        base = _proc_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        run()
        return (_proc_kb("VmHWM") - base) / 1024
    except OSError:  # not Linux: ru_maxrss only grows, so this is the growth of the process-wide high-water mark
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def load(ckpt, ref: bool, args, device, dtype):
    if not ref:
        return Chameleon.from_pretrained(ckpt, dtype=dtype, device=device)
    from transformers import ChameleonForConditionalGeneration

    hf = ChameleonForConditionalGeneration.from_pretrained(ckpt, dtype=dtype, attn_implementation=args.hf_attn)
    # lift HF's image-logit mask (Anole's recipe; ImageOnly then keeps only image ids): image_tokens is a
    # cached_property, so an instance entry overrides it and `logits[:, :, []] = min` is a no-op
    hf.model.vocabulary_mapping.__dict__["image_tokens"] = []
    return hf.to(device)


def worker(args):
    """Memory subprocess: one implementation, every workload once after a warm-up; prints {row: MiB} as JSON."""
    torch.set_num_threads(args.threads)
    ref = args.worker == "ref"
    args.config_name = args.config  # memory() passes a single config name
    device, dtype = args.device, getattr(torch, args.dtype)
    model = load(args.ckpt, ref, args, device, dtype)
    out = {}
    for name, build in workloads(args):
        run = build(model, ref, device)
        run()  # warm-up: one-off allocations (optimizer state, kernel caches) are not per-step peaks
        out[name] = round(peak_mib(run, device), 1)
        del run
    print("MEMORY " + json.dumps(out), flush=True)


def memory(args, ckpt, which: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={which}", f"--ckpt={ckpt}",
           f"--config={args.config_name}"]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("device", "dtype", "threads", "reps", "decode_lens", "batches",
                                                   "best_of", "train_batch", "train_len", "hf_attn", "seed")]
    cmd += ["--quick"] * args.quick
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    for line in res.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY "):])
    raise RuntimeError(f"memory worker ({which}) failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")


# -----------------------------------------------------------------------------------------------------------------
# the run


def bench_config(args, name: str) -> list[dict]:
    args.config_name = name
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    ckpt = tempfile.mkdtemp(prefix="bench_")
    Chameleon(make_config(name)).to(dtype).save_pretrained(ckpt)  # the same weights for both
    ours, hf = load(ckpt, False, args, device, dtype), load(ckpt, True, args, device, dtype)
    rows = []
    for row, build in workloads(args):
        runs = {"ours": build(ours, False, device), "ref": build(hf, True, device)}
        for run in runs.values():
            warm(run, device)
        times = {"ours": [], "ref": []}
        for _ in range(args.reps):  # alternate, so background load drifts hit both sides alike
            for k, run in runs.items():
                times[k].append(timed(run, device))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(dict(row=row, tokens=tokens_per_run(row, args), s_ours=med["ours"], s_ref=med["ref"]))
        print(f"  {name} {row}: ours {med['ours']:.3f} s, ref {med['ref']:.3f} s", file=sys.stderr, flush=True)
        del runs
        gc.collect()
    mfu_row(args, ours, rows)
    del ours, hf
    if not args.no_memory:
        mem = {k: memory(args, ckpt, k) for k in ("ours", "ref")}
        for r in rows:
            r["mib_ours"], r["mib_ref"] = mem["ours"].get(r["row"]), mem["ref"].get(r["row"])
    shutil.rmtree(ckpt, ignore_errors=True)
    return rows


def mfu_row(args, model, rows):
    """The training step's model FLOP/s over the peak: --peak_flops on CUDA; on a CPU the best FLOP/s of this
    machine's matrix products in --dtype (report.peak_matmul_flops, the denominator of the report's time table)."""
    c = model.config
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "vqmodel" not in n)
    flops_per_tok = 6 * n_params + 12 * c.n_layer * args.train_len * c.n_embd
    r = rows[0]
    cuda = args.device.startswith("cuda")
    r["peak_flops"] = args.peak_flops if cuda else peak_matmul_flops(args.dtype, torch.device(args.device))
    for side in ("ours", "ref"):
        r[f"mfu_{side}"] = r["tokens"] / r[f"s_{side}"] * flops_per_tok / r["peak_flops"]


def preset_decode(args) -> dict:
    """Decode tokens/s of a full-size preset with random weights built directly on the device (ours only: the HF
    reference would need a second copy of the weights plus its load; not run)."""
    device, dtype = args.device, getattr(torch, args.dtype)
    shrink = dict(n_layer=1, n_embd=64, n_head=4, n_kv_head=4, n_inner=176) if args.preset_shrink else {}
    cfg = ChameleonConfig.preset(args.preset, vq=None, max_seq_len=PROMPT_LEN + 1024 + 16, **shrink)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Chameleon(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    model._init_rope()  # RoPE tables in fp32, as from_pretrained builds them
    args.config_name = None
    out = {}
    for n in [int(x) for x in args.decode_lens.split(",")]:
        for B in [int(x) for x in args.batches.split(",")]:
            run = decode_fn(model, False, n, B, args, device)
            warm(run, device)
            s = statistics.median(timed(run, device) for _ in range(args.reps))
            out[f"decode {n} b{B}"] = n * B / s
    return out


def fmt_table(name: str, rows: list[dict], args) -> str:
    has_mfu = "mfu_ours" in rows[0]
    lines = [f"config {name}: {CONFIGS[name]} (n_embd, n_layer, n_head, n_inner, vocab, image codes); "
             f"{args.device} {args.dtype}, {args.threads} threads, HF attn {args.hf_attn}",
             "",
             "| measurement | ours | reference (HF) | ratio | target | peak MiB ours | peak MiB ref |",
             "|---|---|---|---|---|---|---|"]
    by = {r["row"]: r for r in rows}
    for r in rows:
        mem = f"| {r.get('mib_ours', '-')} | {r.get('mib_ref', '-')} |"
        if r["tokens"]:  # throughput: ratio = ours / ref tok/s, higher is better
            o, h = r["tokens"] / r["s_ours"], r["tokens"] / r["s_ref"]
            r["tok_s_ours"], r["tok_s_ref"], r["ratio"] = o, h, o / h
            target = 1.25 if r["row"].startswith("train") else 2.0
            ok = "ok" if r["ratio"] >= target else ("MISS" if r["ratio"] >= 1.0 else "MISS (slower)")
            lines.append(f"| {r['row']} tok/s | {o:,.0f} | {h:,.0f} | {r['ratio']:.2f}x | >= {target}x {ok} {mem}")
        else:
            lines.append(f"| {r['row']} seconds | {r['s_ours']:.3f} | {r['s_ref']:.3f} | "
                         f"{r['s_ref'] / r['s_ours']:.2f}x | {mem}")
            r["ratio"] = r["s_ref"] / r["s_ours"]
    one, big = by.get("best-of-1 (64 tok)"), by.get(f"best-of-{args.best_of} (64 tok)")
    if one and big and args.best_of != 1:
        co, cr = big["s_ours"] / one["s_ours"], big["s_ref"] / one["s_ref"]
        ok = "ok" if co <= 3 else "MISS"
        lines.append(f"| best-of-{args.best_of} / best-of-1 cost | {co:.2f}x | {cr:.2f}x | {co / cr:.2f} "
                     f"(lower better) | <= 3x {ok} | | |")
        big["cost_vs_1_ours"], big["cost_vs_1_ref"] = co, cr
    if has_mfu:
        r = rows[0]
        lines.append(f"| train MFU ({args.dtype}, peak {r['peak_flops']:.3g}) | {r['mfu_ours']:.1%} | "
                     f"{r['mfu_ref']:.1%} | {r['mfu_ours'] / r['mfu_ref']:.2f}x | | | |")
    lines.append("")
    lines.append("ratio = ours / reference throughput (seconds rows: reference / ours); higher is better.")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------------------------
# rehearsal: the README's full-scale commands, unchanged but for step counts and data size, against an Anole-shaped
# checkpoint with random weights and fewer layers, on a CPU. Each stage is a subprocess; its peak RSS comes from
# os.wait4 (the child's own ru_maxrss), its seconds per step from the run's metrics.jsonl.


def rehearsal_data(root: str, size: int, n_train: int = 2, n_test: int = 2, n_videos: int = 2):
    """Aurora-Bench-format train/test JSON and short videos of world scenes rendered at `size` px."""
    rng = random.Random(0)

    def save(scene, rel):
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        world.render(scene, size).save(os.path.join(root, rel))
        return Path(os.path.join(root, rel))

    def step(scene):  # (action text, next scene); a scene with no applicable action is kept as is
        a = world.sample_action(scene, rng)
        return (world.describe(a, rng), world.apply(scene, a, rng)) if a is not None else ("", scene)

    for split, n, tasks in (("train", n_train, ["something", "ag"]), ("test", n_test, ["magicbrush", "something"])):
        items = []
        for i in range(n):
            src = world.sample_scene(rng)
            text, tgt = step(src)
            items.append(Item(f"{split}-{i}", save(src, f"aurora/images/{split}-{i}-in.png"), text,
                              save(tgt, f"aurora/images/{split}-{i}-out.png"), tasks[i % len(tasks)]))
        write_benchmark(items, os.path.join(root, "aurora", f"{split}.json"))
    for v in range(n_videos):  # 3 frames: a scene and two actions (one key frame each at --spacing=20)
        frames = [world.sample_scene(rng)]
        frames += [step(frames[-1])[1] for _ in range(2)]
        for j, f in enumerate(frames):
            save(f, f"videos/v{v}/{j:03d}.png")


def rehearsal_build(args):
    """Stage 1: data, Chameleon-layout tokenizer.json, an HF checkpoint built with transformers (sharded, bf16) and
    an original-layout vqgan.ckpt (the encoder of the HF checkpoint plus a random decoder) for tokenizer.py."""
    import transformers  # optional dependency: only the rehearsal needs it

    root, s = args.rehearse_dir, REHEARSAL_SIZES[args.rehearse_size]
    anole = os.path.join(root, "anole")
    os.makedirs(anole, exist_ok=True)
    rehearsal_data(root, s["image_size"])
    texts = [it["instruction"] for split in ("train", "test")
             for it in json.load(open(os.path.join(root, "aurora", f"{split}.json")))]
    # Chameleon's id layout: <s> 0, <pad> 1, </s> 2, <unk> 3, image codes 4..8195, <eoss> 8196, <racm3:break> 8197
    tok = TextTokenizer.train((texts + [DM_PROMPT, WM_PROMPT]) * 4, vocab_size=8198 + 256 + 200, n_image_codes=8192)
    tok.save(os.path.join(anole, "tokenizer.json"))
    vq = VQConfig.from_dict({**VQConfig.chameleon().to_dict(), **s["vq"]})
    hf_vq = {k: v for k, v in vq.to_dict().items()
             if k not in ("out_channels", "decoder_num_res_blocks", "beta", "recon_loss")}  # not HF fields
    cfg = transformers.ChameleonConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=args.rehearse_layers, num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_attention_heads"], max_position_embeddings=4096,
        vocabulary_map=tok.tok.get_vocab(with_added_tokens=True), vq_config=hf_vq,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(args.seed)
    hf = transformers.ChameleonForConditionalGeneration(cfg).to(torch.bfloat16)  # Anole ships bf16
    n_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    hf.save_pretrained(anole, max_shard_size=max(n_bytes // 3, 1 << 20))  # three shards + index, like Anole's
    ours = ImageTokenizer(vq, with_decoder=True)  # random decoder; encoder and codebook from the HF checkpoint
    enc = {hf_to_ours(k): v.float() for k, v in hf.state_dict().items() if k.startswith("model.vqmodel.")}
    ours.load_state_dict(enc, strict=False)
    sd = dict(ours.state_dict())
    sd["loss.discriminator.main.0.weight"] = torch.zeros(1)  # a training checkpoint's extra; the converter drops it
    torch.save({"state_dict": sd}, os.path.join(root, "vqgan.ckpt"))
    print(f"built {anole}: {sum(p.numel() for p in hf.parameters()):,} parameters, "
          f"{len(json.load(open(os.path.join(anole, 'model.safetensors.index.json')))['weight_map'])} tensors")


def rehearsal_commands(args) -> list[tuple[str, list[str]]]:
    """The README's full-scale commands (steps 1 and 3-6), with step counts and data size cut to the rehearsal's.
    Run from the rehearsal folder, so the paths are the README's: anole/, aurora/, runs/, videos/."""
    px, n = REHEARSAL_SIZES[args.rehearse_size]["image_size"], args.rehearse_steps
    test = json.load(open(os.path.join(args.rehearse_dir, "aurora", "test.json")))
    common = ["--init=hf:anole", "--tokenizer_dir=anole", f"--image_size={px}", "--lora_r=16", "--lora_alpha=32"]
    small = [f"--steps={n}", "--batch_size=2", "--grad_accum=2", "--dtype=bfloat16", "--grad_checkpoint=true"]
    return [
        ("convert", ["tokenizer.py", "--ckpt=vqgan.ckpt", "--out=anole/vqgan_decoder.safetensors"]),
        ("dm", ["train_dynamics.py", *common, "--data=aurora/train.json", "--lr=2e-4", "--warmup=500", *small,
                "--out_dir=runs/dm"]),
        ("bootstrap", ["bootstrap.py", "--dm=runs/dm/ckpt", "--tokenizer_dir=anole", f"--image_size={px}",
                       "--videos=videos", "--keyframes=6", "--spacing=20", "--k=7000", "--out=runs/synthetic.json"]),
        ("wm", ["train_world.py", *common, "--data=aurora/train.json,runs/synthetic.json", "--weighting=recognition",
                "--lr=5e-4", "--warmup=400", *small, "--out_dir=runs/wm"]),
        ("search", ["search.py", "--wm=runs/wm/ckpt", "--dm=runs/dm/ckpt", "--tokenizer_dir=anole",
                    f"--image_size={px}", "--n=2", f"--image=aurora/{test[0]['input']}",
                    f"--action={test[0]['instruction']}", "--out=runs/search.png"]),
        ("eval", ["eval.py", "--wm=runs/wm/ckpt", "--dm=runs/dm/ckpt", "--tokenizer_dir=anole", f"--image_size={px}",
                  "--data=aurora/test.json", "--n=2", "--llm_judge=true", "--out=runs/eval"]),
    ]


def run_measured(name: str, argv: list[str], cwd: str, threads: int, log_dir: str | None, timeout: float | None = None):
    """Run `python <argv>` in cwd with `threads` torch threads; returns {stage, command, seconds, rc, peak_rss_gib}.
    The peak is the child's own high-water RSS (os.wait4), so stages do not mix. Output goes to log_dir/<name>.log
    (None: to our stdout). On timeout the child's whole process group is killed and rc is "timeout"."""
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, argv[0]), *argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    t = time.time()
    logf = None
    if log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
        logf = open(os.path.join(log_dir, f"{name}.log"), "w")
    p = subprocess.Popen(cmd, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT if logf else None, env=env,
                         start_new_session=True)  # its own process group: a timeout kills its workers too
    timed_out = False
    while True:  # os.wait4, not Popen.wait: it returns the child's resource usage
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if timeout is not None and time.time() - t > timeout:
            os.killpg(p.pid, signal.SIGKILL)
            _, status, ru = os.wait4(p.pid, 0)
            timed_out = True
            break
        time.sleep(0.2)
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it again
    if logf:
        logf.close()
    return dict(stage=name, command="python " + " ".join(argv), seconds=round(time.time() - t, 1),
                rc="timeout" if timed_out else p.returncode, peak_rss_gib=round(ru.ru_maxrss / 2**20, 2))


def step_seconds(metrics_path: str) -> list[float]:
    """Seconds of each optimizer step from a run's metrics.jsonl (its `time` is cumulative since the loop began)."""
    times = [json.loads(line)["time"] for line in open(metrics_path)]
    return [round(b - a, 2) for a, b in zip([0.0] + times, times)]


def rehearsal_probe(args):
    """One fine-tuning step of the rehearsal's model on one sequence, in a fresh process: random bf16 weights, LoRA
    r=16 on all seven linear layers, gradient checkpointing, the loss of a DM (the last 10 tokens) or a WM (the last
    1,024 image tokens). Prints PROBE {json}: weights RSS, the step's peak RSS growth (peak_mib) and its seconds."""
    if args.rehearse_probe.startswith("vq:"):
        return vq_probe(args)
    task, n_layer, T, *full = args.rehearse_probe.split(":")
    n_layer, T = int(n_layer), int(T)
    if full:
        train.SPARSE_LOGITS_MIN_VOCAB = 1 << 62  # the old path: logits at every position
    s = REHEARSAL_SIZES[args.rehearse_size]
    torch.set_num_threads(args.threads)
    cfg = ChameleonConfig.preset("chameleon-7b", vq=None, n_layer=n_layer, n_embd=s["hidden_size"],
                                 n_head=s["num_attention_heads"], n_kv_head=s["num_attention_heads"],
                                 n_inner=s["intermediate_size"], vocab_size=s["vocab_size"],
                                 gradient_checkpointing=True, mask_image_logits=task == "dm")
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.bfloat16)  # what from_pretrained(dtype=bf16) gives, without a checkpoint
    try:
        model = Chameleon(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model._init_rope()  # fp32 RoPE tables, as from_pretrained builds them
    apply_lora(model, 16, 32.0, 0.05, TrainConfig.lora_targets)
    ids = torch.randint(8198, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(args.seed))
    w = torch.zeros(1, T)
    w[:, -(10 if task == "dm" else 1025):-1 if task == "wm" else None] = 1.0  # the WM's target ends with EOI
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def run():
        (sequence_nll(model, ids, w).sum() / w[:, 1:].sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time.perf_counter()
    run()  # warm-up: AdamW state, allocator
    first = time.perf_counter() - t
    weights = _proc_kb("VmRSS") / 2**20
    t = time.perf_counter()
    peak = peak_mib(run, "cpu")
    print("PROBE " + json.dumps(dict(probe=args.rehearse_probe, rss_before_gib=round(weights, 2),
                                     step_peak_gib=round(peak / 1024, 3), s_step=round(time.perf_counter() - t, 2),
                                     s_first_step=round(first, 2))), flush=True)


@torch.no_grad()
def vq_probe(args):
    """VQ encode and decode of a batch of images at the rehearsal's size with the built checkpoint's encoder and the
    converted decoder (what every script does per image, on the CPU: train.load_tokenizers keeps it there)."""
    torch.set_num_threads(args.threads)
    n, px = int(args.rehearse_probe.split(":")[1]), REHEARSAL_SIZES[args.rehearse_size]["image_size"]
    anole = os.path.join(args.rehearse_dir, "anole")
    vq = ImageTokenizer.from_pretrained(anole, os.path.join(anole, "vqgan_decoder.safetensors")).eval()
    x = torch.rand(n, 3, px, px, generator=torch.Generator().manual_seed(args.seed)) * 2 - 1
    codes = vq.encode(x[:1])  # warm-up
    res = {"probe": args.rehearse_probe, "rss_before_gib": round(_proc_kb("VmRSS") / 2**20, 2)}
    for name, run in (("encode", lambda: vq.encode(x)), ("decode", lambda: vq.decode(codes.expand(n, -1)))):
        t = time.perf_counter()
        res[f"{name}_peak_gib"] = round(peak_mib(run, "cpu") / 1024, 3)
        res[f"{name}_s_per_image"] = round((time.perf_counter() - t) / n, 2)
    print("PROBE " + json.dumps(res), flush=True)


def rehearse(args) -> dict:
    """Build the checkpoint, run every full-scale command against it, probe memory scaling; write --out (JSON)."""
    root = os.path.abspath(args.rehearse_dir)
    out = args.out or os.path.join(root, "rehearsal.json")
    s = REHEARSAL_SIZES[args.rehearse_size]
    rec = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), size=args.rehearse_size, layers=args.rehearse_layers,
               shapes=s, steps=args.rehearse_steps, threads=args.threads, torch=torch.__version__,
               cpu=_cpu_name(), mem_total_gib=round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30,
                                                     1), stages=[], probes=[])
    skip = REHEARSAL_STAGES[:REHEARSAL_STAGES.index(args.rehearse_from)] if args.rehearse_from else ()
    if skip:  # keep the numbers of the stages already run
        done = json.load(open(out))["stages"] if os.path.exists(out) else []
        rec["stages"] = [r for r in done if r["stage"] in skip]
    else:
        shutil.rmtree(os.path.join(root, "runs"), ignore_errors=True)  # a rerun starts its fine-tuning afresh
    logs = os.path.join(root, "logs")
    me = [os.path.basename(__file__), f"--rehearse_dir={root}", f"--rehearse_size={args.rehearse_size}",
          f"--threads={args.threads}", f"--seed={args.seed}"]
    # the README's commands need the built data (the test item's path), so they are listed once build is done
    todo = [("build", [*me, "--rehearse_build", f"--rehearse_layers={args.rehearse_layers}"])]
    while todo:
        name, argv = todo.pop(0)
        if name in skip:
            todo += rehearsal_commands(args) if name == "build" else []
            continue
        print(f"rehearsal: {name}: python {' '.join(argv)}", flush=True)
        r = run_measured(name, argv, root, args.threads, logs)
        if name in ("dm", "wm"):
            r["s_per_step"] = step_seconds(os.path.join(root, "runs", name, "metrics.jsonl"))
        print(f"  -> rc {r['rc']}, {r['seconds']} s, peak RSS {r['peak_rss_gib']} GiB"
              + (f", s/step {r['s_per_step']}" if "s_per_step" in r else ""), flush=True)
        rec["stages"].append(r)
        atomic_write(out, json.dumps(rec, indent=1))
        if r["rc"] != 0:
            raise RuntimeError(f"rehearsal stage {name} failed (rc {r['rc']}); its log: {logs}/{name}.log\n"
                               + open(os.path.join(logs, f"{name}.log")).read()[-3000:])
        if name == "build":
            todo += rehearsal_commands(args)
    for spec in [x for x in args.scaling.split(",") if x]:
        print(f"rehearsal: probe {spec}", flush=True)
        r = run_measured(f"probe_{spec.replace(':', '_')}", [*me, f"--rehearse_probe={spec}"], root, args.threads,
                         logs)
        text = open(os.path.join(logs, f"probe_{spec.replace(':', '_')}.log")).read()
        got = [json.loads(x[len("PROBE "):]) for x in text.splitlines() if x.startswith("PROBE ")]
        if r["rc"] != 0 or not got:
            raise RuntimeError(f"probe {spec} failed (rc {r['rc']}):\n{text[-3000:]}")
        rec["probes"].append({**got[0], "peak_rss_gib": r["peak_rss_gib"]})
        print(f"  -> {rec['probes'][-1]}", flush=True)
        atomic_write(out, json.dumps(rec, indent=1))
    print(rehearsal_table(rec), flush=True)
    print(f"rehearsal results -> {out}")
    return rec


def rehearsal_table(rec: dict) -> str:
    lines = [f"rehearsal ({rec['size']}, {rec['layers']} layer(s), {rec['threads']} thread(s), {rec['cpu']}):", "",
             "| stage | seconds | peak RSS GiB | s/step |", "|---|---|---|---|"]
    for r in rec["stages"]:
        lines.append(f"| {r['stage']} | {r['seconds']} | {r['peak_rss_gib']} | "
                     f"{', '.join(map(str, r.get('s_per_step', []))) or '-'} |")
    if rec["probes"]:
        lines += ["", "| probe (task:layers:tokens) | RSS before GiB | step peak growth GiB | s/step |",
                  "|---|---|---|---|"]
        lines += [f"| {p['probe']} | {p['rss_before_gib']} | {p['step_peak_gib']} | {p['s_step']} |"
                  for p in rec["probes"] if "step_peak_gib" in p]
        lines += [f"| {p['probe']} (per batch; s per image) | {p['rss_before_gib']} | encode {p['encode_peak_gib']}, "
                  f"decode {p['decode_peak_gib']} | encode {p['encode_s_per_image']}, "
                  f"decode {p['decode_s_per_image']} |" for p in rec["probes"] if "encode_peak_gib" in p]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -----------------------------------------------------------------------------------------------------------------
# --speed: what makes the main job faster, at its own shapes, each as an interleaved ratio


def interleaved(runs: dict, reps: int, stat=statistics.median) -> dict:
    """{name: closure} -> {name: median (or `stat`) seconds}, the closures called in turn (A, B, A, B, ...) after one
    warm-up each, so that load from other processes hits all of them alike."""
    for run in runs.values():
        run()
    times = {k: [] for k in runs}
    for _ in range(reps):
        for k, run in runs.items():
            t = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t)
    return {k: stat(v) for k, v in times.items()}


def laptop_model(seed: int = 0):
    """reproduce.py's laptop transformer: 4 layers x 128, 1,024 ids of which 128 image codes."""

    cfg = ChameleonConfig.preset("tiny", vocab_size=1024, n_layer=4, n_embd=128, image_token_start=4,
                                 image_token_end=132, mask_image_logits=False)
    torch.manual_seed(seed)
    return Chameleon(cfg)


def laptop_batch(task: str, B: int = 16, T: int = 150, seed: int = 0):
    """A batch like the main job's: (ids (B, T), weights (B, T)). Loss on the target image's 64 tokens (WM), on
    ~8 action tokens (DM), on a caption or an image (pre-training: half each)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(132, 1024, (B, T), generator=g)
    w = torch.zeros(B, T)
    if task == "wm":
        w[:, T - 65 : T - 1] = 1
    elif task == "dm":
        w[:, T - 9 :] = 1
    else:
        w[: B // 2, 70:80] = 1
        w[B // 2 :, 12:76] = 1
    return ids, w


def sdpa_math(q, k, v):
    """What model.causal_attention did before on a CPU in bf16: SDPA with its math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def speed_train_step(task: str, dtype: str, sparse: bool, T: int, sdpa: bool = False):
    """One training step (forward, weighted loss, backward, AdamW) of the laptop model, as train.train does it;
    `sdpa`: with attention by SDPA's math kernel instead of model.causal_attention."""

    model = laptop_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, w = laptop_batch(task, T=T)
    batch = torch.arange(ids.shape[0])
    amp = autocast(dtype, "cpu")

    def run():
        saved = train.SPARSE_LOGITS_MIN_VOCAB, model_py.causal_attention
        train.SPARSE_LOGITS_MIN_VOCAB = 0 if sparse else 1 << 30
        model_py.causal_attention = sdpa_math if sdpa else saved[1]
        try:
            train.forward_backward(model, ids, w, batch, 0, 1, 1, torch.device("cpu"), amp)
        finally:
            train.SPARSE_LOGITS_MIN_VOCAB, model_py.causal_attention = saved
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def speed_vq_step(dtype: str, steps: int = 4):
    """reproduce.py's VQGAN (laptop: 128 codes, MSE, 3 levels) at batch 32: `steps` autoencoder warm-up steps and
    `steps` quantised steps, with its setup (model, codebook initialisation)."""
    vcfg = dataclasses.replace(VQConfig.world(), num_embeddings=128, recon_loss="mse", channel_multiplier=(1, 1, 2))
    images = torch.rand(64, 3, 32, 32) * 2 - 1
    return lambda: train_vqgan(images, vcfg, steps=steps, batch_size=32, ae_warmup=steps, progress=False, dtype=dtype)


def speed_sampling(dtype: str, n_items: int = 8, n: int = 8):
    """WM sampling of n 64-token candidates for n_items items + DM scoring of them (search.scored_candidates' work,
    with the laptop model as both)."""

    model = laptop_model().eval()
    prompt = torch.randint(132, 1024, (n_items * n, 72))
    ids, w = laptop_batch("dm", B=n_items * n)
    amp = autocast(dtype, "cpu")

    def run():
        with amp, torch.no_grad():
            generate_image(model, prompt, n_tokens=64, boi_id=3, generator=torch.Generator().manual_seed(0))
            sequence_nll(model, ids, w)
    return run


def speed_pool(ns=(1, 2, 4, 8), n_items: int = 4):
    """Best-of-N for every N in ns: a pool per N plus the controls' pool (what reproduce did) vs one pool of max(ns)
    (what it does now). Both sample and score with the laptop model in fp32."""

    model = laptop_model().eval()

    def pool(n):
        prompt = torch.randint(132, 1024, (n_items * n, 72))
        with torch.no_grad():
            generate_image(model, prompt, n_tokens=64, boi_id=3, generator=torch.Generator().manual_seed(0))
    return {"one pool per N + controls": lambda: [pool(n) for n in (*ns, max(ns))], "one pool": lambda: pool(max(ns))}


def background_load(seconds: float) -> subprocess.Popen:
    """A 1-thread process doing fp32 matrix products for `seconds` (what another job on the machine does)."""
    code = ("import time, torch; torch.set_num_threads(1); a = torch.randn(512, 512); t = time.time()\n"
            f"while time.time() - t < {seconds}: a @ a")
    return subprocess.Popen([sys.executable, "-c", code])


def speed_vs_transformers(args, config: str = "laptop", batch: int = 16, length: int = 150, n: int = 64) -> list:
    """Ours against transformers at the main job's shapes in --dtype (float32: the path of CPUs without native bf16):
    a training step of `batch` x `length` tokens with its MFU against this machine's --dtype matrix-product peak
    (as the report's time table), decode of n image tokens at batch 1 and 64 (a sampling batch of 8 items x 8
    candidates), best-of-8. Prints bench_config's table; returns its rows."""
    sub = dataclasses.replace(args, config=config, train_batch=batch, train_len=length, decode_lens=str(n),
                              batches="1,64", best_of=8)
    rows = bench_config(sub, config)
    print(fmt_table(config, rows, sub) + "\n", flush=True)
    return rows


def speed(args) -> dict:
    """--speed: the rows, printed as a table, appended to --results as one JSON line."""

    reps = max(3, args.reps)
    rows = []
    print(f"--speed on {_cpu_name()}, {args.threads} thread(s), native bf16: {native_bf16_cpu()}\n")
    vs_hf = speed_vs_transformers(args)

    def row(what, a, b, t):
        rows.append({"what": what, "a": a, "b": b, "a_s": t[a], "b_s": t[b], "speedup": t[a] / t[b]})
        r = rows[-1]
        print(f"| {what} | {a} {r['a_s'] * 1e3:.1f} ms | {b} {r['b_s'] * 1e3:.1f} ms | {r['speedup']:.2f}x |",
              flush=True)

    print("| what | A | B | A / B |\n|---|---|---|---|")
    peak = {}
    for dt, torch_dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(2240, 128, dtype=torch_dt), torch.randn(128, 384, dtype=torch_dt)
        peak[dt] = lambda a=a, b=b: [a @ b for _ in range(10)]
    t = interleaved(peak, reps * 3, stat=min)  # a peak: the best run
    row("matmul 2240 x 128 x 384 (x10), best run", "float32", "bfloat16", t)
    flops = {dt: 10 * 2 * 2240 * 128 * 384 / t[dt] for dt in t}
    t = interleaved({dt: speed_vq_step(dt) for dt in ("float32", "bfloat16")}, reps)
    row("VQGAN, 4 + 4 steps of batch 32 and setup", "float32", "bfloat16", t)
    for task, T in (("pretrain", 84), ("dm", 150), ("wm", 150)):
        runs = {f"{dt}{' sparse' if sp else ''}": speed_train_step(task, dt, sp, T)
                for dt in ("float32", "bfloat16") for sp in (False, True)}
        t = interleaved(runs, reps)
        row(f"{task} train step (16 x {T})", "float32", "bfloat16", t)
        row(f"{task} train step, fp32: logits at loss positions only", "float32", "float32 sparse", t)
        row(f"{task} train step, bf16: logits at loss positions only", "bfloat16", "bfloat16 sparse", t)
        tok_s = 16 * T / t["bfloat16"]
        model = laptop_model()
        fpt = 6 * sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) + 12 * 4 * T * 128
        print(f"|   {task}: bf16 {tok_s:,.0f} tokens/s = {tok_s * fpt / 1e9:.1f} GFLOP/s, "
              f"{100 * tok_s * fpt / flops['bfloat16']:.0f}% of the bf16 matmul peak "
              f"({flops['bfloat16'] / 1e9:.0f} GFLOP/s) | | | |", flush=True)
    t = interleaved({k: speed_train_step("wm", "bfloat16", True, 150, sdpa=k == "SDPA math kernel")
                     for k in ("SDPA math kernel", "written out")}, reps)
    row("attention: wm train step (16 x 150), bf16", "SDPA math kernel", "written out", t)
    t = interleaved({dt: speed_sampling(dt) for dt in ("float32", "bfloat16")}, reps)
    row("sample 8 x 8 candidates (64 tokens) + DM score", "float32", "bfloat16", t)
    t = interleaved(speed_pool(), max(1, reps // 2))
    row("best-of-N 1,2,4,8 + controls (sampling, fp32)", "one pool per N + controls", "one pool", t)
    # load: the VQGAN and a WM training step alone vs beside a 1-thread background process (each run in turn)
    runs = {"vq": speed_vq_step(train.compute_dtype("auto", "cpu")),
            "wm": speed_train_step("wm", train.compute_dtype("auto", "cpu"), False, 150)}
    alone = interleaved(runs, reps)
    bg = background_load(3600)
    try:
        loaded = interleaved(runs, reps)
    finally:
        bg.kill()
        bg.wait()
    for k, what in (("vq", "VQGAN, 4 + 4 steps"), ("wm", "WM train step")):
        row(f"{what}: beside a 1-thread background process (slowdown)", "loaded", "alone",
            {"loaded": loaded[k], "alone": alone[k]})
    rec = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), command="python bench.py " + " ".join(sys.argv[1:]),
               cpu=_cpu_name(), threads=args.threads, torch=torch.__version__, native_bf16=native_bf16_cpu(),
               peak_flops=flops, rows=rows, vs_transformers=dict(dtype=args.dtype, rows=vs_hf))
    if args.results:
        os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec


# -----------------------------------------------------------------------------------------------------------------
# GPU check: one command for whenever a GPU is at hand. Each part runs in its own subprocess with a time limit (its
# process group is killed when it runs over), and the JSON is rewritten after every part, so a broken or slow part
# costs only itself.

# reproduce.py --preset=gpu cut to a few minutes: a tenth of the data, a tenth of the steps (same model and batch)
GPU_REPRODUCE = ["--preset=gpu", "--n_train=2000", "--n_videos=200", "--n_val=64", "--n_test=70",
                 "--n_comp=35", "--n_captions=4000", "--vq_images=2000", "--vq_warmup=300", "--vq_steps=300",
                 "--pretrain_steps=300", "--ft_steps=200", "--boot_k=500"]
# the same flags on a CPU dry run (--quick): sizes that take seconds
QUICK_REPRODUCE = ["--preset=smoke", "--n_train=32", "--n_videos=4", "--n_val=8", "--n_test=8",
                   "--n_comp=4", "--n_captions=32", "--vq_images=64", "--vq_warmup=4", "--vq_steps=4",
                   "--pretrain_steps=2", "--ft_steps=2", "--boot_k=8", "--search_n=1,2", "--jobs=1"]


def gpu_check_parts(args, tmp: str) -> dict:
    """part -> (argv of a `python` subprocess, what it writes, time limit in seconds)."""
    dev = [f"--device={args.device}", f"--dtype={args.dtype}", f"--threads={args.threads}", f"--seed={args.seed}"]
    if args.quick:  # CPU dry run: the micro config, a shrunken preset, the smoke pipeline
        a = ["--config=micro", "--quick", "--batches=1,2", "--best_of=2", "--train_batch=2", "--train_len=16",
             "--no_memory"]
        b = ["--quick", "--batches=1,2", "--preset_shrink"]
        c = QUICK_REPRODUCE
    else:
        a = ["--config=large", "--decode_lens=128", "--batches=1,8", "--best_of=8", "--reps=2", "--train_batch=8",
             "--train_len=1024", "--no_memory", f"--peak_flops={args.peak_flops}"]
        b = ["--decode_lens=256", "--batches=1,8", "--reps=2"]
        c = GPU_REPRODUCE
    limits = [float(x) for x in args.part_limits.split(",")]
    return {
        "a": ([os.path.basename(__file__), *dev, *a, f"--results={tmp}/a.jsonl"], f"{tmp}/a.jsonl", limits[0]),
        "b": ([os.path.basename(__file__), *dev, *b, "--config=", "--preset=chameleon-7b", f"--results={tmp}/b.jsonl"],
              f"{tmp}/b.jsonl", limits[1]),
        "c": (["reproduce.py", *c, f"--device={args.device}", f"--out={tmp}/repro"], f"{tmp}/repro/report.md",
              limits[2]),
    }


def gpu_check_summary(part: str, path: str) -> dict:
    """The numbers a part wrote, in the JSON's words."""
    if part == "c":
        report = open(path).read()
        return {"report_md": report[report.index("## Setup"):] if "## Setup" in report else report}
    rec = json.loads(open(path).read().splitlines()[-1])
    out = {k: rec[k] for k in ("device", "dtype", "torch", "transformers", "hf_attn", "reps", "wall_s")}
    if part == "b":
        out["preset_tok_s"] = rec["preset"]
        return out
    (name, c), = rec["configs"].items()
    out["config"] = {"name": name, **{k: c["config"][k] for k in ("n_embd", "n_layer", "n_head", "vocab_size")}}
    for r in c["rows"]:
        row = {k: r[k] for k in ("s_ours", "s_ref", "ratio") if k in r}
        row.update({k: r[k] for k in ("tok_s_ours", "tok_s_ref", "mfu_ours", "mfu_ref", "cost_vs_1_ours",
                                      "cost_vs_1_ref") if k in r})
        out[r["row"]] = row
    return out


def gpu_check(args) -> dict:
    import tempfile

    out = args.out or "out/gpu_check.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() \
        else args.device
    rec = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), command="python bench.py " + " ".join(sys.argv[1:]),
               device=device, torch=torch.__version__, peak_flops=args.peak_flops, parts={})
    t0 = time.time()
    here = os.path.dirname(os.path.abspath(__file__))
    for part, (argv, result, limit) in gpu_check_parts(args, tmp).items():
        if part not in args.gpu_parts.split(","):
            continue
        print(f"gpu_check: part {part} (limit {limit:.0f} s): python {' '.join(argv)}", flush=True)
        r = run_measured(part, argv, here, args.threads, None, timeout=limit)
        try:
            if r["rc"] != 0:
                raise RuntimeError(f"exit status {r['rc']}")
            r["results"] = gpu_check_summary(part, result)
            r["status"] = "ok"
        except Exception as e:  # one broken part must not lose the others
            r["status"] = f"failed: {type(e).__name__}: {e}"
        rec["parts"][part] = r
        rec["wall_s"] = round(time.time() - t0, 1)
        atomic_write(out, json.dumps(rec, indent=1))
        print(f"gpu_check: part {part}: {r['status']} in {r['seconds']} s", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    rec["table_md"] = gpu_check_table(rec)
    atomic_write(out, json.dumps(rec, indent=1))
    print(rec["table_md"] + f"\n\ngpu_check: {rec['wall_s']} s; results -> {out}", flush=True)
    return rec


def gpu_check_table(rec: dict) -> str:
    """Markdown rows of parts a and b for the README (part c: its report_md)."""
    lines = [f"{rec['device']}, torch {rec['torch']}", "", "| measurement | ours | reference (HF) | ratio |",
             "|---|---|---|---|"]
    res = rec["parts"].get("a", {}).get("results", {})
    for row, r in res.items():
        if not isinstance(r, dict) or "s_ours" not in r:
            continue
        if "tok_s_ours" in r:
            lines.append(f"| {row} tok/s | {r['tok_s_ours']:,.0f} | {r['tok_s_ref']:,.0f} | {r['ratio']:.2f}x |")
            if "mfu_ours" in r:
                lines.append(f"| {row} MFU | {r['mfu_ours']:.1%} | {r['mfu_ref']:.1%} | |")
        else:
            lines.append(f"| {row} seconds | {r['s_ours']:.3f} | {r['s_ref']:.3f} | {r['ratio']:.2f}x |")
            if "cost_vs_1_ours" in r:
                lines.append(f"| {row} / best-of-1 cost | {r['cost_vs_1_ours']:.2f}x | {r['cost_vs_1_ref']:.2f}x | |")
    for name, rows in rec["parts"].get("b", {}).get("results", {}).get("preset_tok_s", {}).items():
        lines += [f"| {name} {row} tok/s (ours, random weights) | {v:,.1f} | - | |" for row, v in rows.items()]
    for part, r in rec["parts"].items():
        lines.append(f"| part {part} | {r['status']} | {r['seconds']} s | |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.rehearse_build:
        return rehearsal_build(args)
    if args.rehearse_probe:
        return rehearsal_probe(args)
    if args.rehearse:
        return rehearse(args)
    if args.gpu_check:
        return gpu_check(args)
    torch.set_num_threads(args.threads)
    if args.speed:
        return speed(args)
    import transformers

    t0 = time.time()
    record = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), command="python bench.py " + " ".join(sys.argv[1:]),
                  device=args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                  cpu=platform.processor() or platform.machine(), dtype=args.dtype, threads=args.threads,
                  torch=torch.__version__, transformers=transformers.__version__, hf_attn=args.hf_attn,
                  reps=args.reps, configs={})
    for name in [c for c in args.config.split(",") if c]:
        rows = bench_config(args, name)
        print(fmt_table(name, rows, args), flush=True)
        print(flush=True)
        record["configs"][name] = dict(config=make_config(name).to_dict(), rows=rows)
    if args.preset:
        record["preset"] = {args.preset: preset_decode(args)}
        for k, v in record["preset"][args.preset].items():
            print(f"{args.preset} {k}: {v:,.1f} tok/s (ours, {args.device} {args.dtype}, random weights)")
    record["wall_s"] = round(time.time() - t0, 1)
    if args.results:
        os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")
    print(f"bench wall time {record['wall_s']} s; appended to {args.results or '(nothing)'}")
    return record


if __name__ == "__main__":
    run_main(main)
