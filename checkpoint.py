"""Checkpoints of worldboot's training runs: one folder <dir>/model.safetensors, optim.safetensors, rng.safetensors,
meta.json, written by common.atomic_dir (a kill at any instant leaves the previous checkpoint or the new one, never a
mix), read back by load_model (bootstrap.py, search.py, eval.py, reproduce.py) and by train.py's --resume. With FSDP
the state is gathered to rank 0 first and written unchanged. Harness: I/O, not the paper's method.

Reading never writes: a save killed between its two renames leaves `<dir>.old` (complete, marked as ours), which
readers read in place and only the next save puts back (common.recover_dir). meta.json is checked like a flag
(check_model_config) and against the machine's memory before any tensor is allocated; it records the text
tokenizer's fingerprint, and loading beside another tokenizer is refused (check_tokenizer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from common import UserError, atomic_dir, check_keys, is_ours, read_json, read_tensors
from model import Chameleon, ChameleonConfig, LoRALinear, apply_lora, merge_lora


def save_checkpoint(ckpt_dir: str, model: nn.Module, cfg, model_cfg: ChameleonConfig,
                    optimizer: torch.optim.Optimizer | None = None, step: int = 0, sampler=None, metrics=None,
                    tok=None):
    """Write a resumable checkpoint atomically: the previous one stays until the new one is complete on disk.
    cfg: the run's train.TrainConfig (stored in meta.json); tok: the TextTokenizer it was trained with (its
    fingerprint is stored)."""
    tag = {"step": str(step)}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    flat = {}
    if optimizer is not None:
        # AdamW state flattened by parameter name, so no pickle is ever needed to resume.
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for k, v in optimizer.state.get(p, {}).items():
                    flat[f"{names[id(p)]}::{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    meta = {
        "step": step,
        "train_config": dataclasses.asdict(cfg),
        "model_config": model_cfg.to_dict(),
        "lora": cfg.lora_r > 0 and any(isinstance(m, LoRALinear) for m in model.modules()),
        "sampler": sampler.state() if sampler is not None else None,
        "metrics": metrics or {},
        "tokenizer": tokenizer_fingerprint(tok) if tok is not None else None,
    }
    with atomic_dir(ckpt_dir) as tmp:
        for name, tensors in (("model", state), ("optim", flat if optimizer is not None else None), ("rng", rng)):
            if tensors is not None:
                path = os.path.join(tmp, f"{name}.safetensors")
                try:
                    save_file(tensors, path, metadata=tag)
                except Exception as e:  # safetensors' own error type (a full disk): an OSError naming the file
                    raise OSError(f"{path}: cannot write ({e})") from None
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            f.write(json.dumps(meta, indent=1))


def checkpoint_dir(ckpt_dir: str) -> str | None:
    """The folder that holds the checkpoint `ckpt_dir`: itself, or, when a save was killed between its two renames,
    its complete `<ckpt_dir>.old` (only if marked as ours). None when there is none. Nothing is moved or deleted."""
    old = os.path.normpath(ckpt_dir) + ".old"
    if os.path.isfile(os.path.join(ckpt_dir, "meta.json")):
        return ckpt_dir
    if not os.path.exists(ckpt_dir) and is_ours(old) and os.path.isfile(os.path.join(old, "meta.json")):
        return old
    return None


def has_checkpoint(ckpt_dir: str) -> bool:
    """True when ckpt_dir holds a checkpoint (or the complete previous one of a save killed half-way)."""
    return checkpoint_dir(ckpt_dir) is not None


def read_meta(ckpt_dir: str, tok=None) -> dict:
    """meta.json of a checkpoint, checked (a worldboot checkpoint, a model config that builds and fits in memory,
    made with the text tokenizer `tok` if given)."""
    folder = checkpoint_dir(ckpt_dir)
    if folder is None:
        raise UserError(f"{ckpt_dir}: no checkpoint here (meta.json missing)")
    path = os.path.join(folder, "meta.json")
    meta = read_json(path, "checkpoint metadata")
    missing = [k for k in ("step", "train_config", "model_config") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{path}: not a worldboot checkpoint (no {', '.join(missing)})")
    if not isinstance(meta["step"], int) or isinstance(meta["step"], bool) or meta["step"] < 0:
        raise UserError(f"{path}: 'step' must be an integer >= 0, got {meta['step']!r}")
    if not isinstance(meta["train_config"], dict):
        raise UserError(f"{path}: 'train_config' must be an object")
    check_model_config(meta["model_config"], f"{path}: model_config")
    meta["folder"] = folder
    check_tokenizer(meta, tok, ckpt_dir)
    return meta


def check_model_config(d, source: str) -> None:
    """A model config read from a file, checked like a flag before anything is built: every field of the type of
    its default, sizes > 0, heads that divide the width and the key/value heads that divide the heads; then
    check_fits. UserError naming `source` and the field."""
    if not isinstance(d, dict):
        raise UserError(f"{source}: must be an object")
    for f in dataclasses.fields(ChameleonConfig):
        if f.name not in d or f.name == "vq":
            continue
        v, kind = d[f.name], type(f.default)
        ok = isinstance(v, bool) if kind is bool else (isinstance(v, (int, float) if kind is float else kind)
                                                        and not isinstance(v, bool))
        if not ok:
            raise UserError(f"{source}: {f.name} must be {kind.__name__}, got {v!r}")
    for k in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "n_inner", "max_seq_len"):
        if k in d and d[k] <= 0:
            raise UserError(f"{source}: {k} must be > 0, got {d[k]}")
    cfg = ChameleonConfig.from_dict({k: v for k, v in d.items() if k != "vq"})
    if cfg.n_embd % cfg.n_head or cfg.n_head % cfg.n_kv_head or cfg.head_dim % 2:
        raise UserError(f"{source}: n_embd {cfg.n_embd}, n_head {cfg.n_head}, n_kv_head {cfg.n_kv_head}: the heads "
                        "must divide the width into even head sizes, and the key/value heads the heads")
    if not 0 <= cfg.image_token_start <= cfg.image_token_end <= cfg.vocab_size:
        raise UserError(f"{source}: image ids [{cfg.image_token_start}, {cfg.image_token_end}) must lie in the "
                        f"vocabulary of {cfg.vocab_size}")
    check_fits(cfg, source)


def check_fits(cfg: ChameleonConfig, source: str) -> None:
    """Refuse a model whose fp32 weights alone exceed this machine's memory, before allocating them."""
    E, kv = cfg.n_embd, cfg.n_embd // cfg.n_head * cfg.n_kv_head
    n = 2 * cfg.vocab_size * E + cfg.n_layer * (2 * E * E + 2 * E * kv + 3 * E * cfg.n_inner)  # embed, lm_head,
    # attention, SwiGLU (norms and the VQ encoder are small)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: unknown, not checked
        return
    if 4 * n > memory:
        raise UserError(f"{source}: a model of {n / 1e9:.1f} B parameters needs {4 * n / 2**30:.0f} GiB for its "
                        f"fp32 weights alone; this machine has {memory / 2**30:.0f} GiB")


def tokenizer_fingerprint(tok) -> dict:
    """What binds a checkpoint to its text tokenizer: the vocabulary's size and a hash of its (name, id) pairs."""
    vocab = sorted(tok.tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"vocab_size": tok.vocab_size, "vocab_sha256": digest}


def check_tokenizer(meta: dict, tok, ckpt_dir: str) -> None:
    """Refuse a checkpoint beside another tokenizer than it was trained with (one line naming both). A checkpoint
    saved before fingerprints were recorded is loaded with a note (its vocabulary must still cover the tokenizer)."""
    if tok is None:
        return
    saved, now = meta.get("tokenizer"), tokenizer_fingerprint(tok)
    where = getattr(tok, "source", "the tokenizer")
    if saved is None and meta["model_config"].get("vocab_size", 0) >= tok.vocab_size:
        print(f"note: {ckpt_dir} records no tokenizer fingerprint (saved by an older worldboot): not checked "
              f"against {where}", file=sys.stderr)
    elif saved != now:
        had = f"{saved['vocab_size']} ids, vocabulary {saved['vocab_sha256']}" if saved else \
            f"{meta['model_config'].get('vocab_size')} ids"
        raise UserError(f"{ckpt_dir} was trained with another tokenizer ({had}) than {where} ({now['vocab_size']} "
                        f"ids, vocabulary {now['vocab_sha256']}): use the tokenizer it was trained with")


def load_model(ckpt_dir: str, device=None, merge: bool = True, role: str | None = None,
               image_size: int | None = None, tok=None) -> tuple[Chameleon, dict]:
    """A worldboot checkpoint -> (model, meta). LoRA adapters are merged unless merge=False. device None: CUDA when
    there is one (bootstrap.py, search.py and eval.py pass none), else the CPU. `role` ("dm" / "wm"),
    `image_size` and the text tokenizer `tok` are checked against what the checkpoint was trained with (a
    pre-trained model may be either role). Reads only."""
    meta = read_meta(ckpt_dir, tok)
    tc = meta["train_config"]
    if role and tc.get("task") not in (role, "pretrain"):
        raise UserError(f"{ckpt_dir}: a {tc.get('task')} checkpoint, used here as the {role}")
    if image_size and tc.get("image_size", image_size) != image_size:
        raise UserError(f"{ckpt_dir}: trained on {tc['image_size']}px images, used with --image_size={image_size}")
    mcfg = ChameleonConfig.from_dict(meta["model_config"])
    model = Chameleon(mcfg)
    if meta.get("lora"):
        apply_lora(model, tc["lora_r"], tc["lora_alpha"], tc["lora_dropout"], tc["lora_targets"])
    _load_weights(model, os.path.join(meta["folder"], "model.safetensors"), meta["step"])
    if meta.get("lora") and merge:
        merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.to(device or inference_device()), meta


# ----------------------------------------------------------------------------------------------------------------
# Inference on the device: where bootstrap.py, search.py and eval.py run their models and the VQ tokenizer, and how
# many sequences they batch there (the --max_batch flag; 0 = auto_batch)

MAX_BATCH = 64  # the most sequences batched at once: what every sampler and scorer used before memory was read, so
# the small models' batches (and the random draws that follow them) stay as they were
MEMORY_HEADROOM = 0.9  # the share of the free memory a batch plans to fill: the rest covers the caching allocator's
# fragmentation, kernels' workspaces and what sequence_bytes leaves out


def inference_device() -> torch.device:
    """CUDA when there is one, else the CPU: load_model's default, and where the scripts put the VQ tokenizer."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_memory(device) -> int:
    """Bytes a batch can still take on `device`. CUDA: the driver's free memory plus what torch's caching allocator
    holds unused (a freed KV cache stays reserved); CPU: /proc/meminfo's MemAvailable (not Linux: no limit)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 1 << 62


def sequence_bytes(cfg: ChameleonConfig, seq_len: int, dtype_bytes: int, kv_cache: bool = True,
                   logit_rows: int = 1) -> int:
    """Memory one sequence of seq_len tokens adds to a batch: its KV cache when generating (keys and values of every
    layer: 2 x n_layer x kv width x seq_len x dtype bytes), one layer's activations (a forward frees each layer's
    before the next: residual, q/k/v and attention output, 4 x n_embd, and the SwiGLU's gate, up and product,
    3 x n_inner, per token) and its logits (logit_rows x vocab: fp32 logits, their softmax and the sampler's fp64
    cumulative sum, 16 bytes each). The weights are not in it: auto_batch reads the free memory after loading."""
    kv = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * seq_len * dtype_bytes if kv_cache else 0
    return kv + seq_len * (4 * cfg.n_embd + 3 * cfg.n_inner) * dtype_bytes + logit_rows * cfg.vocab_size * 16


def batch_limit(cfg: ChameleonConfig, seq_len: int, dtype_bytes: int, free: int, kv_cache: bool = True,
                logit_rows: int = 1) -> int:
    """How many such sequences fit MEMORY_HEADROOM of `free` bytes: at least 1, at most MAX_BATCH."""
    per = sequence_bytes(cfg, seq_len, dtype_bytes, kv_cache, logit_rows)
    return max(1, min(MAX_BATCH, int(free * MEMORY_HEADROOM) // per))


def auto_batch(model: nn.Module, seq_len: int, kv_cache: bool = True, logit_rows: int = 1) -> int:
    """The batch of a sampler or scorer given --max_batch=0: batch_limit at the model's shapes and weight dtype
    against the free memory of its device, read now (the loaded models' weights are already out of it)."""
    w = next(model.parameters())
    return batch_limit(model.config, seq_len, w.element_size(), free_memory(w.device), kv_cache, logit_rows)


def _load_weights(model: nn.Module, path: str, step: int, fsdp: bool = False):
    state = read_tensors(path)
    with safe_open(path, "pt") as f:
        file_step = (f.metadata() or {}).get("step")
    if file_step is not None and int(file_step) != int(step):
        raise UserError(f"{path}: holds step {file_step} but meta.json says {step} (interrupted save?)")
    # the same key-set / shape report as Chameleon.from_pretrained (one readable error listing every problem)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, {k: (path, tuple(v.shape)) for k, v in state.items()}, path, strict=True)
    for k, v in model.state_dict().items():  # values that would load silently and score as if nothing were wrong
        if v.is_floating_point() and not state[k].is_floating_point():
            raise UserError(f"{path}: {k} holds {state[k].dtype} values, not floating-point weights")
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise UserError(f"{path}: {k} holds NaN or infinite values")
    if fsdp:  # every rank read the whole file; each keeps its own shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def restore_training(ckpt_dir, model, optimizer, sampler, fsdp: bool = False) -> int:
    """Resume: load weights, AdamW state, the data order and torch's RNG (the only global generator training draws
    from: LoRA dropout) from ckpt_dir; returns its step."""
    meta = read_meta(ckpt_dir)
    ckpt_dir = meta["folder"]
    _load_weights(model, os.path.join(ckpt_dir, "model.safetensors"), meta["step"], fsdp)
    flat = read_tensors(os.path.join(ckpt_dir, "optim.safetensors"))
    params = dict(model.named_parameters())
    for key, v in flat.items():
        name, k = key.split("::")
        p = params[name]
        # fused AdamW (CUDA) wants its step on the parameter's device and its moments in the parameter's memory layout
        if k == "step":
            optimizer.state[p][k] = v.to(p.device) if optimizer.defaults.get("fused") else v
        else:
            optimizer.state[p][k] = _shard_like(v, p) if fsdp else torch.empty_like(p).copy_(v)
    sampler.load(meta["sampler"])
    rng = read_tensors(os.path.join(ckpt_dir, "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta["step"]


# FSDP: the full state gathered to rank 0 for save_checkpoint, and a full tensor split back into this rank's shard


def fsdp_full_state(model: nn.Module, optimizer, cfg):
    """Collective (every rank calls it): the full weights and AdamW state, gathered one tensor at a time to rank 0's
    CPU. Rank 0 gets (a plain Chameleon holding them, an object read like its optimizer), so save_checkpoint writes
    them unchanged; the other ranks get (None, None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # cpu_offload: only rank 0 keeps tensors
    weights = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
    if dist.get_rank() != 0:
        return None, None
    state = optim_state["state"]  # {parameter name: {"step", "exp_avg", "exp_avg_sq"}}
    with torch.device("meta"):
        copy = Chameleon(model.config)
    if cfg.lora_r > 0:
        apply_lora(copy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    copy.load_state_dict(weights, assign=True)
    params = dict(copy.named_parameters())
    optim = SimpleNamespace(param_groups=[{"params": [params[n] for n in state]}],
                            state={params[n]: s for n, s in state.items()})
    return copy, optim


def _shard_like(v: torch.Tensor, p) -> torch.Tensor:
    """A full tensor read from a checkpoint -> this rank's shard of it, laid out like the sharded parameter p."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
