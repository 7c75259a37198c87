"""2-process torchrun (gloo, CPU): DDP gradients equal the single-process gradients on the same global batch."""

import os
import subprocess
import sys

import torch
from conftest import ddp_case
from safetensors.torch import load_file

from train import forward_backward


def test_ddp_two_processes_match_single_process(tmp_path):
    out = tmp_path / "grads.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --standalone: a free port of its own (a fixed one failed when another job on the machine held it)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(os.path.dirname(__file__), "ddp_worker.py"), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ddp = load_file(str(out))

    model, ids, weights, batch = ddp_case()
    loss = forward_backward(model, ids, weights, batch, rank=0, world=1, grad_accum=1, device=torch.device("cpu"))
    assert torch.allclose(ddp.pop("__loss__"), loss.reshape(1), atol=1e-6)
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(single) == set(ddp)
    for n in single:
        assert torch.allclose(ddp[n], single[n], atol=1e-6, rtol=1e-5), n
