"""Worker for tests/test_ddp.py, launched by torchrun: one DDP forward/backward of a fixed global batch; rank 0
saves the (all-reduced) gradients to argv[1]."""

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest helpers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from conftest import ddp_case  # noqa: E402

from train import forward_backward, setup_distributed  # noqa: E402

torch.set_num_threads(1)
rank, world, device = setup_distributed()
model, ids, weights, batch = ddp_case()
ddp = torch.nn.parallel.DistributedDataParallel(model)
loss = forward_backward(ddp, ids, weights, batch, rank, world, grad_accum=2, device=device)
dist.all_reduce(loss)
if rank == 0:
    grads = {n: p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None}
    grads["__loss__"] = loss.reshape(1)
    save_file(grads, sys.argv[1])
dist.barrier()  # no rank tears gloo down while another still uses it (that aborted a rank now and then)
dist.destroy_process_group()
