"""Worker for tests/test_fsdp.py, launched by torchrun with 2 ranks: train.train with --fsdp=true in each setting the
test compares against one process, each writing its checkpoint under argv[1]; then per-rank sharded-state bytes."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest helpers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from conftest import fsdp_case, tiny_model  # noqa: E402

from train import collate, forward_backward, fsdp_shard, setup_distributed, train  # noqa: E402

torch.set_num_threads(1)
rank, world, device = setup_distributed()
base = sys.argv[1]


def run(name, model_seed=0, **kw):
    tok, ex, val, cfg = fsdp_case(os.path.join(base, name), fsdp=True, **kw)
    return train(cfg, ex, tok, val, evaluate=lambda m, s: 1 / 0, model=tiny_model(tok, seed=model_seed))


run("full", grad_checkpoint=True)  # the evaluate hook above would fail: under FSDP it must be skipped
run("resumed", stop_at=2)
run("resumed", model_seed=99, resume=True)  # a different init: everything must come from the checkpoint
run("lora", lora_r=4, lora_targets="q_proj,v_proj,down_proj")
run("bf16", dtype="bfloat16")

# bytes of weights, gradients and AdamW state this rank holds after one step, sharded vs not
tok, ex, _, cfg = fsdp_case(base)
model = tiny_model(tok)
full = sum(p.numel() * p.element_size() for p in model.parameters())
fsdp_shard(model, cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids, weights = collate(ex, tok.pad_id)
forward_backward(model, ids, weights, torch.arange(8), rank, world, 2, device)
opt.step()
local = lambda t: t.to_local().numel() * t.element_size()  # noqa: E731
mine = {"weights": sum(local(p) for p in model.parameters()), "grads": sum(local(p.grad) for p in model.parameters()),
        "adam": sum(local(v) for s in opt.state.values() for v in s.values() if v.dim() > 0), "unsharded_weights": full}
with open(os.path.join(base, f"memory_rank{rank}.json"), "w") as f:
    json.dump(mine, f)
dist.barrier()  # no rank tears gloo down while another still uses it (that aborted a rank now and then)
dist.destroy_process_group()
