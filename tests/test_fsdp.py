"""2-process torchrun FSDP (gloo, CPU) against one process: losses, weights, resume, checkpoint layout, LoRA, bf16."""

import json
import os
import time

import pytest
import torch
from conftest import fsdp_case, tiny_model, torchrun2
from safetensors.torch import load_file

from checkpoint import load_model
from train import train


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """One torchrun job (2 ranks) runs every FSDP setting of tests/fsdp_worker.py; returns its output folder."""
    out = tmp_path_factory.mktemp("fsdp")
    t0 = time.time()
    torchrun2("fsdp_worker.py", str(out))
    print(f"fsdp worker: {time.time() - t0:.1f} s")
    return out


def single(tmp_path, **kw):
    """The same training in one process, no FSDP: (model, history)."""
    tok, ex, val, cfg = fsdp_case(str(tmp_path), **kw)
    return train(cfg, ex, tok, val, model=tiny_model(tok))


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def assert_weights_close(sharded: dict, reference: dict, atol=3e-5):
    assert set(sharded) == set(reference)
    for k in reference:
        diff = (sharded[k] - reference[k]).abs().max()
        assert torch.allclose(sharded[k], reference[k], atol=atol, rtol=1e-4), (k, diff)


def test_fsdp_matches_single_process(fsdp_runs, tmp_path):
    """FSDP (2 ranks, half the batch each, gradient checkpointing) = one process: every loss, val loss and weight."""
    model, hist = single(tmp_path)
    rows = metrics(fsdp_runs / "full")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r, h in zip(rows, hist):
        assert r["loss"] == pytest.approx(h["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-4)
    assert rows[-1]["val_loss"] == pytest.approx(hist[-1]["val_loss"], rel=1e-5)
    assert_weights_close(load_file(str(fsdp_runs / "full" / "ckpt" / "model.safetensors")), model.state_dict())
    ref = load_file(str(tmp_path / "ckpt" / "optim.safetensors"))  # AdamW moments, gathered from both ranks
    assert_weights_close(load_file(str(fsdp_runs / "full" / "ckpt" / "optim.safetensors")), ref, atol=1e-6)


def test_fsdp_resume_equals_uninterrupted(fsdp_runs):
    """Stopped at step 2 under FSDP, resumed from a differently initialised model: the same weights and state."""
    for name in ("model", "optim"):
        full = load_file(str(fsdp_runs / "full" / "ckpt" / f"{name}.safetensors"))
        resumed = load_file(str(fsdp_runs / "resumed" / "ckpt" / f"{name}.safetensors"))
        assert_weights_close(resumed, full, atol=1e-7)
    assert [r["loss"] for r in metrics(fsdp_runs / "resumed")] == [r["loss"] for r in metrics(fsdp_runs / "full")]


def test_fsdp_checkpoint_loads_in_one_process(fsdp_runs, tmp_path):
    """The FSDP checkpoint is an ordinary one: checkpoint.load_model, then the HF layout and back."""
    from model import Chameleon

    model, meta = load_model(str(fsdp_runs / "full" / "ckpt"))
    assert meta["step"] == 4 and meta["train_config"]["fsdp"] is True
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    model.save_pretrained(tmp_path / "hf")
    assert torch.allclose(Chameleon.from_pretrained(tmp_path / "hf")(x), model(x), atol=1e-6)


def test_fsdp_lora_matches_single_process(fsdp_runs, tmp_path):
    """LoRA under FSDP (frozen base sharded, adapters trained) = LoRA in one process."""
    kw = dict(lora_r=4, lora_targets="q_proj,v_proj,down_proj")
    model, hist = single(tmp_path, **kw)
    assert [r["loss"] for r in metrics(fsdp_runs / "lora")] == pytest.approx([h["loss"] for h in hist], rel=1e-5)
    assert_weights_close(load_file(str(fsdp_runs / "lora" / "ckpt" / "model.safetensors")), model.state_dict())
    merged, meta = load_model(str(fsdp_runs / "lora" / "ckpt"))
    assert meta["lora"] and "lora_A" not in " ".join(merged.state_dict())


def test_fsdp_bf16_mixed_precision_on_cpu(fsdp_runs):
    """--dtype=bfloat16 under FSDP computes in bf16, also on CPU/gloo: near fp32, not equal; fp32 shards saved."""
    fp32 = [r["loss"] for r in metrics(fsdp_runs / "full")]
    bf16 = [r["loss"] for r in metrics(fsdp_runs / "bf16")]
    assert bf16 == pytest.approx(fp32, rel=3e-2) and bf16 != fp32
    w = load_file(str(fsdp_runs / "bf16" / "ckpt" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in w.values())


def test_fsdp_shards_state_per_rank(fsdp_runs):
    """Each of 2 ranks holds half of the weights, gradients and AdamW moments (printed for the README)."""
    ranks = [json.load(open(fsdp_runs / f"memory_rank{r}.json")) for r in range(2)]
    full = ranks[0]["unsharded_weights"]
    for m in ranks:
        print({k: v / 1024 for k, v in m.items()}, "KiB")
        assert m["weights"] == m["grads"] and m["adam"] == 2 * m["weights"]
        assert m["weights"] <= 0.51 * full
    assert sum(m["weights"] for m in ranks) == full


def test_fsdp_needs_torchrun(tmp_path):
    tok, ex, _, cfg = fsdp_case(str(tmp_path), fsdp=True)
    with pytest.raises(ValueError, match="torchrun"):
        train(cfg, ex, tok, model=tiny_model(tok))
