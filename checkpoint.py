"""Checkpoints of worldboot's training runs: one folder <dir>/model.safetensors, optim.safetensors, rng.safetensors,
meta.json, written by common.atomic_dir (a kill at any instant leaves the previous checkpoint or the new one, never a
mix), read back by load_model (bootstrap.py, search.py, eval.py, reproduce.py) and by train.py's --resume. With FSDP
the state is gathered to rank 0 first and written unchanged. Harness: I/O, not the paper's method.
"""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from common import UserError, atomic_dir, check_keys, read_json, read_tensors, recover_dir
from model import Chameleon, ChameleonConfig, LoRALinear, apply_lora, merge_lora


def save_checkpoint(ckpt_dir: str, model: nn.Module, cfg, model_cfg: ChameleonConfig,
                    optimizer: torch.optim.Optimizer | None = None, step: int = 0, sampler=None, metrics=None):
    """Write a resumable checkpoint atomically: the previous one stays until the new one is complete on disk.
    cfg: the run's train.TrainConfig (stored in meta.json)."""
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
    }
    with atomic_dir(ckpt_dir) as tmp:
        for name, tensors in (("model", state), ("optim", flat if optimizer is not None else None), ("rng", rng)):
            if tensors is not None:
                save_file(tensors, os.path.join(tmp, f"{name}.safetensors"), metadata=tag)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            f.write(json.dumps(meta, indent=1))


def has_checkpoint(ckpt_dir: str) -> bool:
    """True when ckpt_dir holds a checkpoint (after undoing a save that was killed half-way)."""
    return recover_dir(ckpt_dir) and os.path.exists(os.path.join(ckpt_dir, "meta.json"))


def read_meta(ckpt_dir: str) -> dict:
    if not has_checkpoint(ckpt_dir):
        raise UserError(f"{ckpt_dir}: no checkpoint here (meta.json missing)")
    path = os.path.join(ckpt_dir, "meta.json")
    meta = read_json(path, "checkpoint metadata")
    missing = [k for k in ("step", "train_config", "model_config") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{path}: not a worldboot checkpoint (no {', '.join(missing)})")
    return meta


def load_model(ckpt_dir: str, device=None, merge: bool = True, role: str | None = None,
               image_size: int | None = None) -> tuple[Chameleon, dict]:
    """A worldboot checkpoint -> (model, meta). LoRA adapters are merged unless merge=False. device None: CUDA when
    there is one (bootstrap.py, search.py and eval.py pass none), else the CPU. `role` ("dm" / "wm") and
    `image_size` are checked against what the checkpoint was trained as (a pre-trained model may be either)."""
    meta = read_meta(ckpt_dir)
    tc = meta["train_config"]
    if role and tc.get("task") not in (role, "pretrain"):
        raise UserError(f"{ckpt_dir}: a {tc.get('task')} checkpoint, used here as the {role}")
    if image_size and tc.get("image_size", image_size) != image_size:
        raise UserError(f"{ckpt_dir}: trained on {tc['image_size']}px images, used with --image_size={image_size}")
    mcfg = ChameleonConfig.from_dict(meta["model_config"])
    model = Chameleon(mcfg)
    if meta.get("lora"):
        apply_lora(model, tc["lora_r"], tc["lora_alpha"], tc["lora_dropout"], tc["lora_targets"])
    _load_weights(model, os.path.join(ckpt_dir, "model.safetensors"), meta["step"])
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
    if fsdp:  # every rank read the whole file; each keeps its own shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def restore_training(ckpt_dir, model, optimizer, sampler, fsdp: bool = False) -> int:
    """Resume: load weights, AdamW state, the data order and torch's RNG (the only global generator training draws
    from: LoRA dropout) from ckpt_dir; returns its step."""
    meta = read_meta(ckpt_dir)
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
