"""The one training loop of worldboot, shared by pre-training, the dynamics model and the world model.

Paper mapping (arXiv 2506.06006):
- Sec. 3 / App. H: fine-tuning a Chameleon-style model with a loss on the *completion* only: the action text for the
  dynamics model (DM), the target image tokens for the world model (WM). Here every training example is a token
  sequence plus a per-token loss weight; weight 0 = context, weight 1 = plain cross-entropy, other values = the
  recognition-weighted loss of Eq. 2 (built in train_world.py). One loop serves all tasks.
- The synthetic world has no foundation model to start from, so this file also pre-trains the tiny transformer on
  image -> caption and caption -> image pairs (`--task=pretrain`), the role Chameleon/Anole's pre-training plays.

What the loop does: AdamW with cosine schedule and warm-up, gradient clipping, gradient accumulation (gradient
sync only on the last micro-step), `torchrun` DDP (NCCL on GPU, gloo on CPU) with per-rank shards of one global
batch, bf16 autocast (GPU, and CPUs with native bf16) over fp32 weights, optional gradient checkpointing and LoRA,
a NaN/inf guard, periodic validation, a metrics JSONL file, and checkpoints that resume exactly (weights, optimizer,
config, step, RNG states, data position) written atomically as safetensors + JSON. `--fsdp=true` shards instead of
replicating (FSDP2: full fine-tuning of a model whose weights, gradients and AdamW state do not fit one GPU);
checkpoints stay the same files.

Loss normalisation (why it is written this way): the loss of a step is sum_i w_i * nll_i / sum_i w_i over the whole
*global* batch. Every rank knows the global batch's indices, so it can compute the denominator locally; each rank
then back-propagates its share scaled by world_size (DDP averages gradients). The result is the same gradient as
one process on the same global batch, whatever the split into ranks and micro-steps (tested in tests/test_ddp.py).

Run:  python train.py --task=pretrain --data=out/data/captions.json --tokenizer_dir=out/tok --out_dir=out/pretrain
      torchrun --nproc_per_node=2 train_world.py ...   (same flags; docs/full_scale.md for 7B on GPUs)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import (
    check_fits,
    fsdp_full_state,
    has_checkpoint,
    load_model,
    read_meta,
    restore_training,
    save_checkpoint,
)
from common import (
    DTYPES,
    UserError,
    append_line,
    arg,
    atomic_write,
    autocast,
    check_dir,
    claim_dir,
    compute_dtype,
    interruptible,
    parse_config,
    read_json,
    recover_dir,
    run,
)
from data import load_captions, load_items, preprocess_image
from model import Chameleon, ChameleonConfig, apply_lora
from tokenizer import MAX_PIXELS_PER_PASS, ImageTokenizer, TextTokenizer

# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    task: str = arg("wm", ("pretrain", "image_head", "dm", "wm"))  # "pretrain" (caption<->image), "image_head"
    # (Anole's repair: only lm_head's image rows train, on caption -> image), "dm" (image, image -> action), "wm"
    data: str = arg("", "required")  # training data: Aurora-Bench-style JSON file(s), comma-separated (Eq. 1:
    # labelled + synthetic)
    val_data: str = ""  # validation JSON (optional): validation loss and task metrics every eval_every steps
    tokenizer_dir: str = "out/tok"  # folder with image tokenizer (vq/) and text tokenizer (tokenizer.json)
    out_dir: str = "out/run"  # checkpoints, metrics.jsonl and sample grids go here
    init: str = "scratch"  # "scratch" (preset below), a worldboot checkpoint folder, or "hf:<dir>" (Chameleon/Anole)
    preset: str = arg("tiny", ("tiny", "chameleon-7b"))  # model preset when init=scratch (model.ChameleonConfig.preset)
    n_layer: int = arg(0, ">=0")  # override the preset's depth when > 0 (init=scratch only)
    n_embd: int = arg(0, ">=0")  # override the preset's width when > 0 (init=scratch only)
    image_size: int = arg(32, ">0")  # images are preprocessed to this square size before VQ encoding (512 for
    # Chameleon); must be the image tokenizer's resolution
    steps: int = arg(600, ">0")  # optimizer steps (replaced by --epochs when that is > 0)
    epochs: float = arg(0.0, ">=0")  # passes over the training examples, the paper's unit (10 for the DM, 40 for the
    # WM): steps = ceil(epochs x examples / batch_size) when > 0; 0 = use --steps
    batch_size: int = arg(32, ">0")  # global batch size (sequences per optimizer step, over all ranks and micro-steps)
    grad_accum: int = arg(1, ">0")  # micro-steps per optimizer step (gradients sync only on the last one)
    lr: float = arg(1e-3, ">0")  # peak learning rate (paper: 2e-4 DM, 5e-4 WM with LoRA on 7B)
    min_lr_ratio: float = arg(0.1, "0..1")  # cosine decays to lr * min_lr_ratio
    warmup: int = arg(50, ">=0")  # linear warm-up steps (paper: 500 DM, 400 WM)
    weight_decay: float = arg(0.01, ">=0")  # AdamW weight decay on matrices (not on norms, biases, embeddings)
    beta2: float = arg(0.98, "0..<1")  # AdamW beta2
    grad_clip: float = arg(1.0, ">=0")  # max global gradient norm (0 = off)
    weighting: str = arg("none", ("none", "recognition"))  # WM token loss: "none" = plain CE, "recognition" = Eq. 2
    # weights from VQ features
    weight_mix: float = arg(0.5, "0..1")  # recognition weights mixed with uniform: w = (1-mix) * w_eq2 + mix (a
    # floor). 0.5 with "batch" is the reading chosen on the validation split (reproduce.py takes its default from here)
    weight_norm: str = arg("batch", ("image", "batch"))  # Eq. 2's normalisation (the paper states none): "image" =
    # mean 1 per image; "batch" = raw w_l over the batch mean, so pairs that changed more weigh more (the validated one)
    lora_r: int = arg(0, ">=0")  # LoRA rank (0 = full fine-tuning; paper: 16)
    lora_alpha: float = arg(32.0, ">0")  # LoRA scale numerator (paper: 32)
    lora_dropout: float = arg(0.05, "0..<1")  # dropout on the LoRA branch input (paper: 0.05)
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # linear layers that get adapters
    eval_every: int = arg(200, ">=0")  # validate (and write the sample grid) every N steps; 0 = only at the end
    eval_items: int = arg(64, ">0")  # validation items scored per evaluation (loss) / generated (task metric)
    save_every: int = arg(200, ">=0")  # checkpoint every N steps (and at the end); 0 = only at the end
    seed: int = arg(1337, ">=0")  # seeds model init, data order and sampling; each rank offsets it by its rank
    dtype: str = arg("auto", DTYPES)  # "bfloat16" = autocast (fp32 weights and AdamW state); "auto" = bf16 on CUDA
    # and on CPUs with native bf16 (common.compute_dtype), else fp32
    threads: int = arg(1, ">=0")  # torch intra-op CPU threads of this process (0 = torch's default, one per core). 1,
    # as reproduce.py: two runs side by side on 2 cores at one thread per core each ran >10x slower, and a CPU run's
    # bits depend on the thread count
    grad_checkpoint: bool = False  # recompute layer activations in backward (needed for 7B full fine-tuning)
    fsdp: bool = False  # torchrun only: shard weights, gradients and AdamW state over the ranks (FSDP2) instead of DDP
    resume: bool = False  # continue from out_dir/ckpt exactly where it stopped (the settings must be the same)
    force: bool = False  # resume although settings changed, start over in an out_dir that holds a checkpoint, or
    # write into an out_dir that worldboot did not create (docs/reliability.md)
    stop_at: int = arg(0, ">=0")  # end this invocation after this step, checkpointed (fits a job's time limit); 0 =
    # run to the end
    max_len: int = arg(0, ">=0")  # truncate/limit sequences (0 = the model's max_seq_len)
    gen_share: float = arg(-1.0, lambda v: None if v == -1 or 0 <= v < 1 else "-1 or in [0, 1)")  # pretrain: the
    # share of the loss tokens on caption -> image (the rest: image -> caption and --texts); -1 = both directions for
    # every caption (about 0.69 of the loss tokens on the laptop preset)
    texts: str = ""  # pretrain: a text-only corpus, a JSON list of sentences (e.g. world.narrations), loss on all
    quiet: bool = False  # no tqdm bar (tests, reproduce.py's nested runs)


WM_ONLY = ("weighting", "weight_mix", "weight_norm")  # flags that only train_world.py reads (others reject them)
PRETRAIN_ONLY = ("gen_share", "texts")  # flags that only train.py reads


# ----------------------------------------------------------------------------------------------------------------
# Sequences: each example is token ids plus, per position, the loss weight for predicting that token


def pack(segments: list[tuple[list[int], float | list[float]]]) -> tuple[list[int], list[float]]:
    """Concatenate (ids, weight) segments; a scalar weight applies to every id of its segment."""
    ids, weights = [], []
    for seg_ids, w in segments:
        ids.extend(int(i) for i in seg_ids)
        weights.extend([float(w)] * len(seg_ids) if isinstance(w, (int, float)) else [float(x) for x in w])
    return ids, weights


def collate(examples: list[tuple[list[int], list[float]]], pad_id: int, max_len: int = 0, names=None):
    """Right-pad to a common length. Returns ids (N, T) long and weights (N, T) float (0 on padding).
    `names` (optional, one per example) name the item of an over-long example in the error."""
    if not examples:
        raise UserError("no examples to train on")
    T = max(len(ids) for ids, _ in examples)
    if max_len and T > max_len:
        n = next(i for i, (x, _) in enumerate(examples) if len(x) > max_len)
        name = f"item {names[n]}" if names else f"example {n}"
        raise UserError(f"{name}: {len(examples[n][0])} tokens, more than the model's context of {max_len} "
                        "(shorten its instruction / action)")
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    weights = torch.zeros(len(examples), T)
    for n, (x, w) in enumerate(examples):
        ids[n, : len(x)] = torch.tensor(x)
        weights[n, : len(w)] = torch.tensor(w)
    return ids, weights


def weighted_nll(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t * -log p(ids_t | ids_<t) per sequence. logits (B, T, V) from model(ids); returns (B,).

    Position t's logits predict token t+1, so weights/targets are shifted by one. Weight 0 positions cost nothing.
    """
    targets = ids[:, 1:]  # (B, T-1)
    w = weights[:, 1:].to(logits.dtype)  # (B, T-1)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")  # (B, T-1)
    return (w * nll).sum(dim=1)


# Logits only where the loss reads them. A Chameleon sequence of ~2,100 tokens has 2,100 x 65,536 fp32 logits (550 MB,
# and as much again for their gradient and for cross-entropy's softmax); the DM's loss reads ~10 of those rows, the
# WM's 1,024. At the tiny model's 1,024 ids it saves less but still some: training steps ran 1.13-1.22x faster in
# fp32 and 1.01-1.20x in bf16 (bench.py --speed, laptop shapes). From this vocabulary size on (0 = always); lm_head
# over a subset of rows may round differently from the full (B, T, V) product (the smoke report's tables were equal).
SPARSE_LOGITS_MIN_VOCAB = 0


def sequence_nll(model, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weighted_nll(model(ids), ids, weights) (B,); with a large vocabulary lm_head runs only at weighted positions
    (the same sum: the skipped positions have weight 0)."""
    if getattr(model, "module", model).config.vocab_size < SPARSE_LOGITS_MIN_VOCAB:  # (DDP wraps the model)
        return weighted_nll(model(ids).float(), ids, weights)
    keep = weights[:, 1:] != 0  # (B, T-1): position t predicts token t+1
    logits = model(ids, rows=F.pad(keep, (0, 1)))  # (N, V): the kept positions, row-major
    nll = F.cross_entropy(logits.float(), ids[:, 1:][keep], reduction="none")  # (N,)
    full = torch.zeros(keep.shape, dtype=nll.dtype, device=nll.device).masked_scatter(keep, nll)  # (B, T-1)
    return (weights[:, 1:].to(nll.dtype) * full).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers and images


def load_tokenizers(tokenizer_dir: str, device="cpu", dtype: torch.dtype = torch.float32):
    """(ImageTokenizer on `device`, decoding in `dtype`: ImageTokenizer.to_inference; TextTokenizer) from either
    - a folder written by reproduce.py: vq/ (our VQGAN) + tokenizer.json, or
    - an HF Chameleon/Anole folder: model.safetensors[.index.json] (its `model.vqmodel.*` encoder) + tokenizer.json,
      plus, to look at generated images, vqgan_decoder.safetensors made by tokenizer.convert_vqgan_ckpt from the
      original vqgan.ckpt (HF checkpoints carry no decoder)."""
    if os.path.isdir(os.path.join(tokenizer_dir, "vq")):
        image = ImageTokenizer.load(os.path.join(tokenizer_dir, "vq"))
    else:
        decoder = os.path.join(tokenizer_dir, "vqgan_decoder.safetensors")
        image = ImageTokenizer.from_pretrained(tokenizer_dir, decoder if os.path.exists(decoder) else None)
    # Liquid's tokenizer names no image token: its image ids are the VQGAN's codes after the text vocabulary
    text = TextTokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"), image.cfg.num_embeddings)
    return image.eval().to_inference(device, dtype), text


@torch.no_grad()
def encode_images(image_tok, paths: list[str], size: int, batch: int = 64, cache: dict | None = None):
    """VQ-encode image files. Returns the cache {str(path): (codes (h*w,) long, feats (C, h, w) float)}, filled with
    every path (look items up with str(path)); pass `cache` to reuse encodings across calls.

    The features are the encoder's pre-quantisation output: the "recognition model" of Eq. 2.
    """
    cache = {} if cache is None else cache
    if size != image_tok.cfg.resolution:
        raise UserError(f"--image_size={size}, but the image tokenizer was made for {image_tok.cfg.resolution}px "
                        "images (another size gives another number of tokens per image)")
    todo = sorted({str(p) for p in paths} - set(cache))
    device = next(image_tok.parameters()).device
    batch = max(1, min(batch, MAX_PIXELS_PER_PASS // size**2))  # at 512 px: 16 images, not 64
    for i in range(0, len(todo), batch):
        chunk = todo[i : i + batch]
        x = torch.stack([preprocess_image(p, size, image_tok.pad_colour) for p in chunk]).to(device)  # (b, 3, H, W)
        with torch.autocast(device.type, enabled=False):  # fp32 codes and Eq. 2 features under a caller's bf16
            feats = image_tok.encode_features(x)  # (b, C, h, w)
        b, C, h, w = feats.shape
        codes = image_tok.quantize.nearest(feats.permute(0, 2, 3, 1).reshape(-1, C)).view(b, h * w)  # raster order
        for p, c, f in zip(chunk, codes.cpu(), feats.float().cpu()):
            cache[p] = (c, f)
    return cache


# ----------------------------------------------------------------------------------------------------------------
# FSDP (--fsdp=true): full fine-tuning beyond one GPU's memory. Each rank keeps 1/world of the weights, gradients and
# AdamW state (PyTorch FSDP2). Checkpoints are gathered to rank 0 and written by save_checkpoint, unchanged.


def fsdp_shard(model: Chameleon, cfg: TrainConfig):
    """Shard `model` in place: one FSDP unit per transformer block (its weights are all-gathered just before its
    forward and again in backward, then freed; its gradients are reduce-scattered), then the root unit with the
    embedding, final norm and lm_head. With --dtype=bfloat16 (or auto: common.compute_dtype) weights are gathered and
    used in bf16 while the shards, AdamW and the gradient reduction stay fp32. LoRA composes: frozen weights are
    sharded and never reduced."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for p in model.parameters():  # FSDP shards contiguous tensors only (model.py stores Linear weights input-major)
        p.data = p.data.contiguous()
    bf16 = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if _use_bf16(cfg) else {}
    for block in model.model.layers:
        fully_shard(block, mp_policy=MixedPrecisionPolicy(**bf16))
    fully_shard(model, mp_policy=MixedPrecisionPolicy(**bf16))


# ----------------------------------------------------------------------------------------------------------------
# Data order: one seeded permutation per epoch, so the position (epoch, offset) is all a resume needs


class Sampler:
    """Yields global batches of example indices; drop-last per epoch; state() / load() for exact resume."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise UserError(f"{n} training examples is fewer than one batch of {batch_size} (--batch_size)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = 0, 0

    def next(self) -> torch.Tensor:
        if self.offset + self.batch_size > self.n:
            self.epoch, self.offset = self.epoch + 1, 0
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        batch = perm[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "n": self.n, "seed": self.seed}

    def load(self, s: dict):
        if s["n"] != self.n:
            raise UserError(f"resume: the data has {self.n} examples but the checkpoint was trained on {s['n']}")
        self.epoch, self.offset = s["epoch"], s["offset"]


# ----------------------------------------------------------------------------------------------------------------
# The loop


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def setup_distributed():
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE; NCCL on GPU, gloo on CPU."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def build_model(cfg: TrainConfig, vocab_size: int, tok) -> tuple[Chameleon, ChameleonConfig]:
    """Model from scratch, from a worldboot checkpoint or from an HF Chameleon/Anole folder."""
    if cfg.init == "scratch":
        overrides = {"vocab_size": vocab_size, "image_token_start": tok.image_offset,
                     "image_token_end": tok.image_offset + tok.n_image_codes}
        if cfg.n_layer:
            overrides["n_layer"] = cfg.n_layer
        if cfg.n_embd:
            overrides["n_embd"] = cfg.n_embd
        mcfg = ChameleonConfig.preset(cfg.preset, **overrides)
        check_fits(mcfg, f"--preset={cfg.preset} --n_layer={cfg.n_layer} --n_embd={cfg.n_embd}")
        torch.manual_seed(cfg.seed)
        model = Chameleon(mcfg)
    elif cfg.init.startswith("hf:"):
        # bf16 weights (memory: a 7B model) with --dtype=bfloat16 and auto on a GPU; FSDP keeps fp32 shards and
        # computes bf16; auto on a CPU with native bf16 autocasts fp32 weights (the tiny models' master copy)
        bf16_weights = cfg.dtype == "bfloat16" or (_use_bf16(cfg) and torch.cuda.is_available())
        dtype = torch.bfloat16 if bf16_weights and not cfg.fsdp else None
        model = Chameleon.from_pretrained(cfg.init[3:], dtype=dtype)
        mcfg = model.config
    else:
        model, _ = load_model(cfg.init, tok=tok)
        mcfg = model.config
    if mcfg.vocab_size < vocab_size:
        raise ValueError(f"model vocab {mcfg.vocab_size} is smaller than the tokenizer's {vocab_size}")
    return model, mcfg


def _use_bf16(cfg: TrainConfig) -> bool:
    return compute_dtype(cfg.dtype, "cuda" if torch.cuda.is_available() else "cpu") == "bfloat16"


def train(cfg: TrainConfig, examples, tok, val_examples=None, evaluate=None, model=None, names=None):
    """Train on `examples` (list of (ids, weights)); returns (model, history).

    `evaluate(model, step) -> dict` is the task's own metric hook (e.g. DM action accuracy, WM sample grid), called
    on rank 0 every eval_every steps (not under FSDP). `model` may be passed in (tests); otherwise it is built from
    cfg.init; under FSDP the returned model is sharded: load the checkpoint for a whole one. `names` (one per
    example, optional) name the item of an example in errors. An out_dir holding a checkpoint is continued with
    cfg.resume (same settings) and replaced only with cfg.force; Ctrl-C saves at the next step.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.epochs:  # the paper counts passes over the data; the loop counts steps (set before the resume check)
        cfg.steps = math.ceil(cfg.epochs * len(examples) / cfg.batch_size)
    rank, world, device = setup_distributed()
    if cfg.fsdp and not dist.is_initialized():
        raise UserError("--fsdp=true shards over the ranks of a torchrun job, but this process was not started by "
                        "torchrun: run it under torchrun --nproc_per_node=N, or drop --fsdp")
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")
    check_dir(cfg.out_dir, force=cfg.force)  # a folder not ours, or one another run writes: refused up front
    _check_out_dir(cfg, ckpt_dir, tok)
    if model is None:
        model, mcfg = build_model(cfg, tok.vocab_size, tok)
    else:
        mcfg = model.config
    # The DM predicts text: keep HF's image-logit mask so its scores are over text only. Pre-training and the WM
    # predict image tokens, so the mask must be off for them.
    mcfg.mask_image_logits = cfg.task == "dm"
    mcfg.gradient_checkpointing = cfg.grad_checkpoint
    if cfg.task == "image_head":  # a gradient mask keeps the other rows, no weight decay (AdamW: zero grad, no step)
        model.requires_grad_(False).lm_head.weight.requires_grad_(True)
        rows = torch.zeros(mcfg.vocab_size, 1)  # (V, 1): 1 on the image ids
        rows[mcfg.image_token_start:mcfg.image_token_end] = 1
        model.lm_head.weight.register_hook(lambda g: g * rows.to(g))
    if cfg.lora_r > 0:
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    model.to(device)

    ids, weights = collate(examples, tok.pad_id, cfg.max_len or mcfg.max_seq_len, names)
    sampler = Sampler(len(ids), cfg.batch_size, cfg.seed)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UserError(f"batch_size {cfg.batch_size} must divide by world_size*grad_accum = {world * cfg.grad_accum}")
    if rank == 0:  # the inputs are good: now the out_dir is written
        claim_dir(cfg.out_dir, "train.py", force=cfg.force)
        recover_dir(ckpt_dir)  # the writer (never a reader) finishes or undoes a save that was killed
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.fsdp:  # shards in place, so before the optimizer sees the parameters (DDP wraps below instead)
        fsdp_shard(model, cfg)

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay * (cfg.task != "image_head")},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, cfg.beta2), fused=device.type == "cuda")
    start = 0
    if cfg.resume and has_checkpoint(ckpt_dir):
        start = restore_training(ckpt_dir, model, optimizer, sampler, cfg.fsdp)
    else:
        torch.manual_seed(cfg.seed + rank)  # per-rank seeds (LoRA dropout); data order is shared on purpose
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if rank == 0 and os.path.exists(metrics_path):  # steps after the checkpoint are run again: drop their rows
        rows = [r for r in open(metrics_path).read().splitlines() if r.strip()]
        atomic_write(metrics_path, "".join(r + "\n" for r in rows if json.loads(r).get("step", 0) <= start))

    raw = model  # save the unwrapped, uncompiled module
    if cfg.fsdp and evaluate is not None and rank == 0:
        print("--fsdp: the task metric (generation) is skipped during training; run eval.py on the checkpoint")
    if world > 1 and not cfg.fsdp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # FSDP casts with its own policy instead; fp32 master weights and AdamW state either way
    amp = autocast("bfloat16" if _use_bf16(cfg) and not cfg.fsdp else "float32", device.type)
    history = []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"{cfg.task}",
               disable=cfg.quiet or rank != 0, dynamic_ncols=True)
    t0 = time.time()
    with interruptible(world == 1) as interrupted:  # Ctrl-C, SIGTERM, SIGHUP: save at the end of the step, stop
        for step in bar:
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batch = sampler.next()  # (batch_size,) indices of the global batch, identical on every rank
            model.train()
            loss_sum = forward_backward(model, ids, weights, batch, rank, world, cfg.grad_accum, device, amp)
            if world > 1:
                dist.all_reduce(loss_sum)
            loss = loss_sum.item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {step}: loss is {loss}; stopping. The last good checkpoint is kept in "
                                         f"{ckpt_dir} (lower --lr or check the data)")
            gnorm = (nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip) if cfg.grad_clip > 0
                     else torch.tensor(0.0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rec = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": float(gnorm), "time": time.time() - t0}
            last = step + 1 == cfg.steps or step + 1 == cfg.stop_at
            try:  # under FSDP every rank runs the validation forward (it all-gathers the weights)
                if val_examples and (rank == 0 or cfg.fsdp) and (last or (cfg.eval_every and
                                                                          (step + 1) % cfg.eval_every == 0)):
                    rec["val_loss"] = validation_loss(raw, val_examples[: cfg.eval_items], tok.pad_id, device, amp)
                    if evaluate is not None and not cfg.fsdp:  # generation needs the whole model: eval.py on the ckpt
                        with amp:
                            rec.update(evaluate(raw, step + 1))
            except Exception:
                if rank == 0 and not cfg.fsdp:  # the trained weights of this step are not lost with the evaluation
                    save_checkpoint(ckpt_dir, raw, cfg, mcfg, optimizer, step + 1, sampler, rec, tok)
                raise
            history.append(rec)
            stop = bool(interrupted)  # Ctrl-C during this step
            save = last or stop or (cfg.save_every and (step + 1) % cfg.save_every == 0)
            # under FSDP every rank joins the gather; rank 0 then writes the same files as without it
            to_save = fsdp_full_state(raw, optimizer, cfg) if save and cfg.fsdp else (raw, optimizer)
            if rank == 0:
                append_line(metrics_path, json.dumps(rec))
                bar.set_postfix(loss=f"{loss:.3f}", **({"val": f"{rec['val_loss']:.3f}"} if "val_loss" in rec else {}))
                if save:
                    save_checkpoint(ckpt_dir, to_save[0], cfg, mcfg, to_save[1], step + 1, sampler, rec, tok)
            if stop:
                raise KeyboardInterrupt(f"stopped after step {step + 1}, saved in {ckpt_dir} (--resume=true continues)")
            if step + 1 == cfg.stop_at:
                break
    if world > 1:
        dist.barrier()
    return raw, history


# Settings that may change between a run and its resumption (paths, logging, how often to save or evaluate)
RESUME_FREE = {"resume", "force", "stop_at", "quiet", "out_dir", "data", "val_data", "tokenizer_dir", "init",
               "eval_every", "eval_items", "save_every", "grid_items"}


def _check_out_dir(cfg: TrainConfig, ckpt_dir: str, tok):
    """Refuse to replace a checkpoint without --force, and to resume with other settings or another tokenizer than
    it was made with."""
    if cfg.resume and not cfg.quiet and not has_checkpoint(ckpt_dir):  # a job's first run, or a typo
        print(f"note: --resume=true, but {ckpt_dir} holds no checkpoint: starting at step 0")
    if not has_checkpoint(ckpt_dir) or (cfg.force and not cfg.resume):  # nothing there, or start over
        return
    meta = read_meta(ckpt_dir, tok if cfg.resume else None)
    if not cfg.resume and not cfg.force:
        raise UserError(f"{ckpt_dir} holds a checkpoint (step {meta['step']}): --resume=true continues it, "
                        "--force=true starts over and replaces it")
    saved, now = meta["train_config"], dataclasses.asdict(cfg)
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k in saved and k not in RESUME_FREE
               and saved[k] != v]
    if cfg.resume and changed and not cfg.force:
        raise UserError(f"{ckpt_dir}: resume with other settings than the checkpoint's ({'; '.join(changed)}); "
                        "use the same flags, or --force=true to continue with the new ones")


def forward_backward(model, ids, weights, batch, rank: int, world: int, grad_accum: int, device, autocast=None):
    """Accumulate the gradient of one global batch on this rank; returns this rank's share of the loss (a tensor).

    The loss is sum(w * nll) / sum(w) over the *global* batch: each rank takes a contiguous shard of the batch,
    splits it into grad_accum micro-batches, and scales by world_size because DDP averages gradients over ranks.
    Gradients are synchronised (all-reduced) only on the last micro-step.
    """
    per_rank = len(batch) // world
    micro = per_rank // grad_accum
    total_w = weights[batch, 1:].sum().to(device)  # the global normaliser, known locally
    mine = batch[rank * per_rank : (rank + 1) * per_rank]
    loss_sum = torch.zeros((), device=device)
    for k in range(grad_accum):
        mb = mine[k * micro : (k + 1) * micro]
        x, w = ids[mb].to(device), weights[mb].to(device)
        # FSDP has no no_sync(): it reduce-scatters every micro-step, so gradients stay sharded between them
        sync = world == 1 or k == grad_accum - 1 or not hasattr(model, "no_sync")
        with (nullcontext() if sync else model.no_sync()), (autocast or nullcontext()):
            part = sequence_nll(model, x, w).sum() / total_w
        (part * world).backward()
        loss_sum += part.detach()
    return loss_sum


@torch.no_grad()
def validation_loss(model, examples, pad_id, device, autocast=None, batch: int = 32) -> float:
    """Weighted mean NLL over the examples (same normalisation as training)."""
    model.eval()
    num, den = 0.0, 0.0
    for i in range(0, len(examples), batch):
        x, w = collate(examples[i : i + batch], pad_id)
        x, w = x.to(device), w.to(device)
        with autocast or nullcontext():
            num += sequence_nll(model, x, w).sum().item()
        den += w[:, 1:].sum().item()
    return num / max(den, 1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Pre-training the tiny "foundation model": image -> caption and caption -> image (what Chameleon already knows)

CAPTION_PROMPT = " Describe the image:"  # image -> caption
DRAW_PROMPT = " Draw:"  # caption -> image


def image_segment(tok, codes) -> list[int]:
    """BOI, the image's token ids (VQ code + offset), EOI."""
    return [tok.boi_id, *tok.image_ids(torch.as_tensor(codes)).tolist(), tok.eoi_id]


def pretrain_examples(items, codes: dict, tok, gen_share: float = -1.0, texts=()) -> list:
    """Image -> caption and caption -> image examples, the loss on the completion only, then the `texts` (loss on
    every token). gen_share -1: both directions for every caption; else every caption once, then caption -> image
    examples (cycling over the items) until that share of the loss tokens is generation (1: only generation)."""
    img = lambda it: image_segment(tok, codes[str(it.input_path)][0])
    cap = lambda it: tok.encode(" " + it.instruction.strip())
    see = lambda it: pack([([tok.bos_id], 0), (img(it), 0), (tok.encode(CAPTION_PROMPT), 0), (cap(it) + [tok.eos_id],
                                                                                            1)])
    draw = lambda it: pack([([tok.bos_id], 0), (tok.encode(DRAW_PROMPT) + cap(it), 0), ([tok.boi_id], 0),
                            (img(it)[1:-1], 1), ([tok.eoi_id], 0)])
    text = [pack([([tok.bos_id], 0), (tok.encode(" " + t.strip()) + [tok.eos_id], 1)]) for t in texts]
    if gen_share < 0:
        return [ex for it in items for ex in (see(it), draw(it))] + text
    out = [see(it) for it in items] * (gen_share < 1) + text
    n_draw = round(gen_share / (1 - gen_share) * sum(sum(w) for _, w in out) / len(img(items[0])[1:-1])) \
        if gen_share < 1 else len(items)
    return out + [draw(items[i % len(items)]) for i in range(n_draw)]


def prepare_pairs(cfg: TrainConfig):
    """What the DM and WM scripts share: tokenizers, the scorable (source, target) items of --data and --val_data
    (validation capped at eval_items) and the VQ codes of every image. Returns (image_tok, tok, items, val, codes)."""
    if cfg.threads:  # before the encoding, whose codes depend on it too
        torch.set_num_threads(cfg.threads)
    image_tok, tok = load_tokenizers(cfg.tokenizer_dir)
    items = [it for it in load_items(cfg.data) if it.output_path]
    val = [it for it in load_items(cfg.val_data) if it.output_path][: cfg.eval_items] if cfg.val_data else []
    for name, path, got in (("--data", cfg.data, items), ("--val_data", cfg.val_data, val)):
        if path and not got:
            raise UserError(f"{name}={path}: no item has an 'output' image, so there is nothing to train on (items "
                            "without one are only generated and scored by eval.py)")
    codes = encode_images(image_tok, [p for it in items + val for p in (it.input_path, it.output_path)], cfg.image_size)
    return image_tok, tok, items, val, codes


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, description="Pre-train the tiny foundation model (caption <-> image).",
                       defaults={"task": "pretrain"}, exclude=WM_ONLY)
    if cfg.task not in ("pretrain", "image_head"):
        raise UserError("train.py trains --task=pretrain or image_head; use train_dynamics.py / train_world.py")
    texts = read_json(cfg.texts, "--texts") if cfg.texts else []  # (read before the long encoding)
    if cfg.threads:  # before the encoding, whose codes depend on it too
        torch.set_num_threads(cfg.threads)
    image_tok, tok = load_tokenizers(cfg.tokenizer_dir)
    items = load_captions(cfg.data)
    val = load_captions(cfg.val_data) if cfg.val_data else []
    codes = encode_images(image_tok, [it.input_path for it in items + val], cfg.image_size)
    share = 1.0 if cfg.task == "image_head" else cfg.gen_share
    train(cfg, pretrain_examples(items, codes, tok, share, texts), tok,
          pretrain_examples(val, codes, tok, share) if val else None,
          names=[it.id for it in items for _ in range(2)] if share == -1 and not texts else None)


if __name__ == "__main__":
    run(main)
