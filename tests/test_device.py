"""Full scale on the device: the VQ tokenizer where the models run (ImageTokenizer.to_inference) and the batches of
the samplers and scorers sized by memory (checkpoint.auto_batch, the scripts' --max_batch)."""

import copy

import pytest
import torch
from conftest import ACTIONS, tiny_model

import checkpoint
import train_world
from checkpoint import MAX_BATCH, auto_batch, batch_limit
from model import ChameleonConfig
from tokenizer import ImageTokenizer, VQConfig
from train_dynamics import predict_actions, score_actions
from train_world import generate_targets, score_targets

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_vq() -> tuple[ImageTokenizer, torch.Tensor]:
    """The world's VQ layout with random weights, its codebook drawn from its own encoder outputs (so the 24 images
    use many codes, with near-ties among them), and the images."""
    torch.manual_seed(0)
    vq = ImageTokenizer(VQConfig.world()).eval()
    x = torch.rand(24, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vq.encode_features(x).permute(0, 2, 3, 1).reshape(-1, vq.cfg.embed_dim)  # (24 * 64, D)
        vq.quantize.embedding.weight.copy_(z[torch.randperm(len(z))[: vq.cfg.num_embeddings]])
    return vq, x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vq_on_the_inference_path_equals_the_plain_path(device, dtype):
    """Codes: equal (the encoder and the fp32 distance stay fp32, batched or one image at a time). Pixels: equal in
    fp32 on the CPU; a bf16 decoder (or a GPU's kernels) within 0.1 of the [-1, 1] range per pixel and 0.01 on
    average (measured on this VQ: 0.055 and 0.005 in bf16)."""
    plain, x = random_vq()
    codes = torch.cat([plain.encode(x[i : i + 1]) for i in range(len(x))])  # (24, 64), one image at a time
    pixels = plain.decode(codes)
    assert codes.unique().numel() > 100
    fast = copy.deepcopy(plain).to_inference(device, dtype)
    assert next(fast.encoder.parameters()).dtype == torch.float32 and next(fast.decoder.parameters()).dtype == dtype
    with torch.no_grad():
        assert torch.equal(fast.encode(x.to(device)).cpu(), codes)
    got = fast.decode(codes)  # CPU codes in, CPU fp32 pixels out, whatever the tokenizer's device
    assert got.device == codes.device and got.dtype == torch.float32 and got.shape == pixels.shape
    if device == "cpu" and dtype == torch.float32:
        assert torch.equal(got, pixels)
    else:
        assert (got - pixels).abs().max() < 0.1 and (got - pixels).abs().mean() < 0.01


def test_auto_batch_for_anole_7b_on_an_80_gb_gpu():
    """docs/full_scale.md, "--max_batch". eval.py --n=4 at 7B holds the WM and the DM in fp32 (load_model):
    2 x 7,043,090,432 x 4 B = 56.34 GB, so 23.66 GB of an 80 GB GPU stay free. A 2,100-token candidate's fp32 KV
    cache is 2 x 32 layers x 4,096 x 2,100 x 4 B = 2.202 GB, one layer's activations 2,100 x (4 x 4,096 + 3 x
    11,008) x 4 B = 0.415 GB, its sampling logits 65,536 x 16 B = 1 MB: 2.618 GB. 0.9 x 23.66 / 2.618 = 8.1 -> 8
    candidates per batch (not 64: 134 GB of cache). Teacher-forced scoring of a WM candidate (no cache; 1,025 rows
    of logits, 1.07 GB): 14. In bf16 (weights 28.17 GB, 51.83 GB free; 1.310 GB per candidate): 35."""
    cfg = ChameleonConfig.preset("chameleon-7b")
    weights = 7_043_090_432
    assert batch_limit(cfg, 2100, 4, 80 * 10**9 - 2 * weights * 4) == 8
    assert batch_limit(cfg, 2100, 4, 80 * 10**9 - 2 * weights * 4, kv_cache=False, logit_rows=1025) == 14
    assert batch_limit(cfg, 2100, 2, 80 * 10**9 - 2 * weights * 2) == 35
    assert batch_limit(cfg, 2100, 4, 10**9) == 1  # never 0
    assert batch_limit(cfg, 10, 4, 10**15) == MAX_BATCH


def test_tiny_models_keep_the_batch_of_64(tiny_tok):
    """The small models' auto batch is the old fixed 64 (so their numbers stay), given 100 MB free."""
    model = tiny_model(tiny_tok)
    assert auto_batch(model, model.config.max_seq_len) == MAX_BATCH == 64
    assert batch_limit(model.config, model.config.max_seq_len, 4, 100 * 2**20) == 64


def test_max_batch_bounds_every_batch_and_greedy_results_do_not_depend_on_it(tiny_tok, monkeypatch):
    """--max_batch bounds the rows of every generation batch, also below one item's n candidates. Greedy outputs
    and teacher-forced scores do not depend on it. Sampled ones do: one generator feeds each batch step by step
    (not one stream per item), so another batch size gives other draws from the same distribution; the auto batch
    of the small models is the old 64, so their draws stay as they were."""
    tok = tiny_tok
    wm, dm = tiny_model(tok, seed=1), tiny_model(tok, seed=2)
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(0, 16, (5, 4), generator=g), torch.randint(0, 16, (5, 4), generator=g)
    rows = []
    real = train_world.generate_image
    monkeypatch.setattr(train_world, "generate_image", lambda m, p, **kw: rows.append(len(p)) or real(m, p, **kw))
    acts = ACTIONS[:5]
    greedy = generate_targets(wm, tok, src, acts, n_samples=3, temperature=0.0)  # (5, 3, L)
    assert max(rows) > 2
    rows.clear()
    assert torch.equal(generate_targets(wm, tok, src, acts, n_samples=3, temperature=0.0, max_batch=2), greedy)
    assert rows and max(rows) <= 2  # an item's 3 candidates split over two batches
    assert predict_actions(dm, tok, src, tgt, batch=1) == predict_actions(dm, tok, src, tgt)
    for fn, model in ((score_actions, dm), (score_targets, wm)):
        one, full = fn(model, tok, src, tgt, acts, batch=1), fn(model, tok, src, tgt, acts)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(one, full))
    sample = lambda **kw: generate_targets(wm, tok, src, acts, 3, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(sample(), sample(max_batch=64))  # auto = 64 here
    assert not torch.equal(sample(), sample(max_batch=1))  # the draws follow the batches
    # auto reads the free memory: a device without room for even one sequence still gets batches of 1
    monkeypatch.setattr(checkpoint, "free_memory", lambda device: 0)
    rows.clear()
    generate_targets(wm, tok, src, acts, n_samples=3, temperature=0.0)
    assert rows == [1] * 15


@pytest.mark.parametrize("script,config,required", [("bootstrap", "BootstrapConfig", []),
                                                     ("search", "SearchConfig", ["--image=x.png", "--action=go"]),
                                                     ("eval", "EvalConfig", [])])
def test_scripts_take_max_batch(script, config, required):
    import importlib

    from common import parse_config

    cls = getattr(importlib.import_module(script), config)
    assert parse_config(cls, required).max_batch == 0  # auto
    assert parse_config(cls, required + ["--max_batch=3"]).max_batch == 3
    with pytest.raises(SystemExit):
        parse_config(cls, required + ["--max_batch=-1"])
