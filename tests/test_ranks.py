"""A fixed chunk count (ranks.py, reproduce.py --foundation_ranks): two rank processes and one process computing the
two chunks in turn give bit-identical weights, for the VQGAN and for the pre-training."""

import dataclasses

import torch
from conftest import fsdp_case, tiny_model

from ranks import Chunks, launch
from runner import train_chunked
from tokenizer import VQConfig, train_vqgan


def both(fn, tmp_path, *args, **kw):
    """fn run with 2 chunks as 2 rank processes and in one process: (processes' result, one process's result)."""
    return tuple(launch(fn, 2, processes, str(tmp_path / f"p{processes}"), *args, **kw) for processes in (True, False))


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


VQ = dict(steps=6, batch_size=8, lr=3e-3, ae_warmup=2, dead_code_window=3, log_every=2, progress=False)


def tiny_vq():
    cfg = VQConfig(embed_dim=8, num_embeddings=256, latent_channels=8, resolution=16, base_channels=32,
                   channel_multiplier=(1, 2), num_res_blocks=1, attn_type="none", recon_loss="mse")
    return torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1, cfg


def test_vqgan_two_rank_processes_equal_two_chunks_in_one(tmp_path):
    """Warm-up, k-means init, quantised steps and a dead-code restart inside the window: every weight is equal."""
    images, cfg = tiny_vq()
    (m2, h2), (m1, h1) = both(train_vqgan, tmp_path, images, cfg, **VQ)
    assert sum(h1["restarted"]) > 0  # the restart at step 3 ran (it draws from all chunks' encoder outputs)
    assert h2 == h1
    assert_same_weights(m2.state_dict(), m1.state_dict())
    # the chunks change the arithmetic (that is why --foundation_ranks enters the stage hashes), not the method
    m0, _ = train_vqgan(images, cfg, **VQ)
    assert not torch.equal(m0.quantize.embedding.weight, m1.quantize.embedding.weight)


def test_one_chunk_is_the_computation_without_chunks():
    """Chunks(1) splits nothing and exchanges nothing."""
    x = torch.arange(6.0)
    c = Chunks()
    assert c.split(x)[0] is x and c.gather([x]) is x and c.total([x]) is x and list(c.mine) == [0]
    assert [list(Chunks(4, r, 2).mine) for r in (0, 1)] == [[0, 1], [2, 3]]


def test_pretraining_two_rank_processes_equal_grad_accum_two(tmp_path):
    """DDP over 2 gloo processes (1 micro-step each) against 1 process with grad_accum=2, a few AdamW steps."""
    tok, ex, _, cfg = fsdp_case(str(tmp_path / "run"), grad_accum=1, eval_every=0, save_every=0)
    outs = []
    for processes in (True, False):
        tcfg = dataclasses.replace(cfg, out_dir=str(tmp_path / f"run{processes}"))
        outs.append(launch(train_chunked, 2, processes, str(tmp_path), tcfg, ex, tok, model=tiny_model(tok)))
    (m2, h2), (m1, h1) = outs
    assert [r["loss"] for r in h2] == [r["loss"] for r in h1]
    assert [r["grad_norm"] for r in h2] == [r["grad_norm"] for r in h1]
    assert_same_weights(m2.state_dict(), m1.state_dict())

