"""2-process torchrun (gloo, CPU): DDP gradients equal the single-process gradients on the same global batch."""


import torch
from conftest import ddp_case, torchrun2
from safetensors.torch import load_file

from train import forward_backward


def test_ddp_two_processes_match_single_process(tmp_path):
    out = tmp_path / "grads.safetensors"
    torchrun2("ddp_worker.py", str(out))
    ddp = load_file(str(out))

    model, ids, weights, batch = ddp_case()
    loss = forward_backward(model, ids, weights, batch, rank=0, world=1, grad_accum=1, device=torch.device("cpu"))
    assert torch.allclose(ddp.pop("__loss__"), loss.reshape(1), atol=1e-6)
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(single) == set(ddp)
    for n in single:
        assert torch.allclose(ddp[n], single[n], atol=1e-6, rtol=1e-5), n
