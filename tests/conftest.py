"""Shared fixtures: a tiny text tokenizer with 16 image codes and a tiny model, small enough for CPU tests."""

import os
import socket
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # flat modules at the repo root

torch.set_num_threads(1)  # tiny models: one thread is faster than two on a 2-core machine

ACTIONS = ["move the red circle left", "remove the blue square", "put the green triangle next to the red circle",
           "recolour the blue square to yellow", "swap the red circle and the blue square", "add a purple circle"]


@pytest.fixture(scope="session")
def tiny_tok():
    from tokenizer import TextTokenizer

    corpus = ACTIONS * 4 + [" What action turns the first image into the second? Action:", " Edit:", " Draw:",
                            " Describe the image:"]
    return TextTokenizer.train(corpus, vocab_size=400, n_image_codes=16)


def tiny_model(tok, seed: int = 0, n_layer: int = 2, n_embd: int = 64):
    from model import Chameleon, ChameleonConfig

    torch.manual_seed(seed)
    cfg = ChameleonConfig.preset("tiny", vocab_size=tok.vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=4,
                                 n_kv_head=2, n_inner=128, max_seq_len=128, image_token_start=tok.image_offset,
                                 image_token_end=tok.image_offset + tok.n_image_codes)
    return Chameleon(cfg)


def torchrun2(worker: str, *args: str) -> subprocess.CompletedProcess:
    """Run tests/<worker> as a 2-process torchrun job (gloo, CPU, one thread each) on a port that is free now (a fixed
    port failed when another job on the machine held it). Fails the test with the job's output when it fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", os.path.join(os.path.dirname(__file__), worker), *args]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def ddp_case():
    """A fixed model and global batch of 8 WM sequences with unequal loss weights (tests/test_ddp.py)."""
    from tokenizer import TextTokenizer
    from train import collate
    from train_world import wm_example

    tok = TextTokenizer.train(ACTIONS * 4, vocab_size=400, n_image_codes=16)
    model = tiny_model(tok)
    g = torch.Generator().manual_seed(0)
    ex = []
    for i in range(8):
        src, tgt = torch.randint(0, 16, (4,), generator=g), torch.randint(0, 16, (4,), generator=g)
        ex.append(wm_example(tok, src, tgt, ACTIONS[i % 6], token_weights=torch.rand(4, generator=g) * 3))
    ids, weights = collate(ex, tok.pad_id)
    batch = torch.randperm(8, generator=g)
    return model, ids, weights, batch


def fsdp_case(out_dir: str, **overrides):
    """(tokenizer, 16 WM training examples with unequal loss weights, 4 validation examples, TrainConfig) for
    tests/test_fsdp.py: the same case in the 2-process FSDP worker and in the single-process reference."""
    from tokenizer import TextTokenizer
    from train import TrainConfig
    from train_world import wm_example

    tok = TextTokenizer.train(ACTIONS * 4, vocab_size=400, n_image_codes=16)
    g = torch.Generator().manual_seed(0)
    ex = []
    for i in range(20):
        src, tgt = torch.randint(0, 16, (4,), generator=g), torch.randint(0, 16, (4,), generator=g)
        ex.append(wm_example(tok, src, tgt, ACTIONS[i % 6], token_weights=torch.rand(4, generator=g) * 3))
    kw = dict(task="wm", out_dir=out_dir, steps=4, batch_size=8, grad_accum=2, lr=3e-3, warmup=2, eval_every=2,
              save_every=2, quiet=True, seed=0, lora_dropout=0.0, dtype="float32")  # exact equalities are fp32's
    return tok, ex[:16], ex[16:], TrainConfig(**{**kw, **overrides})
