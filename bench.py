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

The full-scale rehearsal and the GPU check live in rehearse.py.

Usage:
  python bench.py                                    # "small" config (the synthetic-world model size), CPU fp32
  python bench.py --config=small,base                # + a larger config for a more realistic ratio
  python bench.py --quick --config=micro             # seconds; what tests/test_bench.py runs
  python bench.py --device=cuda --dtype=bfloat16 --config=small,base --preset=chameleon-7b   # on a GPU machine
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
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import model as model_py
import train
from common import arg, autocast, native_bf16_cpu, parse_config
from common import run as run_main  # (bench.py uses `run` as a loop name)
from model import Chameleon, ChameleonConfig, generate_image
from report import peak_matmul_flops
from tokenizer import VQConfig, train_vqgan
from train import sequence_nll

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



def _configs_ok(v: str):
    return None if {c for c in v.split(",") if c} <= set(CONFIGS) else f"a comma-separated subset of {list(CONFIGS)}"


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
    speed: bool = False  # issue 14's rows at the main job's shapes (bf16 vs fp32, loss-position logits, one pool)
    worker: str = ""  # internal: the memory subprocess (ours or ref)
    ckpt: str = ""  # internal: checkpoint folder for the worker
    preset_shrink: bool = False  # internal: a shrunken --preset (rehearse.py --gpu_check's CPU dry run)


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

def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
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
