"""Fast CPU tests of model.py: shapes, causality, KV cache, sampling, generation, checkpoints, the 7B layout."""

import dataclasses
import json
import os

import pytest
import torch

import model as model_module
from common import autocast
from model import (
    Chameleon,
    ChameleonConfig,
    CheckpointError,
    KVCache,
    apply_lora,
    generate_image,
    generate_text,
    sample,
    token_logprobs,
)

V, IMG_LO, IMG_HI = 64, 10, 42  # tiny vocab with image ids 10..41


def tiny(**kw):
    cfg = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_inner=48, max_seq_len=64,
               image_token_start=IMG_LO, image_token_end=IMG_HI)
    cfg.update(kw)
    torch.manual_seed(0)
    m = Chameleon(ChameleonConfig(**cfg)).eval()
    with torch.no_grad():  # QK-norm starts at identity; randomise it so the tests exercise it
        for n, p in m.named_parameters():
            if "_norm" in n:
                p.normal_()
    return m


def ids(B=2, T=12, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_fp32_logits():
    m = tiny()
    logits = m(ids())
    assert logits.shape == (2, 12, V) and logits.dtype == torch.float32
    assert m(ids(), last_only=True).shape == (2, 1, V)
    assert m.num_params() == sum(p.numel() for p in m.parameters())


def test_causality():
    m = tiny()
    a, b = ids(seed=1), ids(seed=2)
    b[:, :7] = a[:, :7]  # same past, different future
    with torch.no_grad():
        la, lb = m(a), m(b)
    torch.testing.assert_close(la[:, :7], lb[:, :7], rtol=0, atol=0)
    assert not torch.allclose(la[:, 7:], lb[:, 7:])


@pytest.mark.parametrize("swin", [False, True])
def test_kv_cache_matches_full_forward(swin):
    m = tiny(swin_norm=swin)
    x = ids(T=16)
    with torch.no_grad():
        full = m(x, mask_image_logits=False)
        cache = KVCache.for_model(m, 2, 20)
        parts = [m(x[:, :9], cache, mask_image_logits=False), m(x[:, 9:12], cache, mask_image_logits=False)]
        parts += [m(x[:, t:t + 1], cache, mask_image_logits=False) for t in range(12, 16)]  # token by token
    assert cache.pos == 16
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="full"):
        m(x[:, :5], cache)


@pytest.mark.parametrize("n_kv_head,swin,dtype,lora", [(4, False, "float32", False), (2, True, "float32", True),
                                                       (2, False, "bfloat16", False), (4, True, "bfloat16", True)])
def test_decode_step_gives_the_module_path_bit_for_bit(monkeypatch, n_kv_head, swin, dtype, lora):
    # without autograd a one-token CPU step takes model.decode_step; with it, the modules: same bits (fp32 and bf16
    # autocast, GQA, swin-norm, LoRA-wrapped projections, batch 1 and 3), so sampling draws the same tokens
    m = tiny(n_kv_head=n_kv_head, swin_norm=swin)
    if lora:
        apply_lora(m, 4, 8.0, 0.0, "q_proj,down_proj")
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_()  # the adapters start at zero: make them count
    calls = []
    fast = model_module.decode_step
    monkeypatch.setattr(model_module, "decode_step", lambda *a: calls.append(1) or fast(*a))
    for B in (1, 3):
        x = ids(B=B, T=20)
        out = []
        for grad in (True, False):
            with autocast(dtype, "cpu"), torch.set_grad_enabled(grad):
                cache = KVCache.for_model(m, B, 20)
                steps = [m(x[:, :4], cache)] + [m(x[:, t:t + 1], cache) for t in range(4, 20)]  # prefill, 16 steps
            out.append(torch.cat(steps, 1).detach())
        torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)
        with pytest.raises(ValueError, match="full"), torch.no_grad():
            m(x[:, :1], cache)
    assert len(calls) == 2 * 16 + 2  # every no-grad step (and each full-cache call) took the fast path


def test_generators_return_normal_tensors():
    # they run under torch.inference_mode; what they return must work with autograd and in-place writes after it
    m = tiny()
    for out in (generate_image(m, ids(), 3, boi_id=4), generate_text(m, ids(), 3)):
        assert not out.is_inference()
        out[0, 0] = IMG_LO  # an in-place write to an inference tensor outside that mode raises
    m(out).sum().backward()  # and autograd may save it (the embedding's backward keeps its indices)


def test_swin_norm_changes_the_function():
    a, b = tiny(), tiny(swin_norm=True)
    b.load_state_dict(a.state_dict())  # same parameters, different placement of the norms
    with torch.no_grad():
        assert not torch.allclose(a(ids()), b(ids()))


def test_gqa_equals_mha_with_repeated_kv_heads():
    g = tiny(n_kv_head=2)
    m = tiny(n_kv_head=4)
    hd = g.config.head_dim
    sd = g.state_dict()
    for k, v in list(sd.items()):
        if any(s in k for s in ("k_proj", "v_proj")):  # (n_kv*hd, C): kv head j serves query heads 2j, 2j+1
            sd[k] = v.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
        elif "k_norm" in k:  # (n_kv, hd)
            sd[k] = v.repeat_interleave(2, dim=0)
    assert g.model.layers[0].self_attn.k_proj.weight.shape == (2 * hd, 32)
    m.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(g(ids()), m(ids()), rtol=1e-5, atol=1e-5)


def test_image_logit_mask_default_on_and_switch_off():
    m = tiny()
    assert ChameleonConfig().mask_image_logits
    lo = m(ids())
    assert (lo[..., IMG_LO:IMG_HI] == torch.finfo(torch.float32).min).all()
    assert (lo[..., :IMG_LO] > -1e30).all() and (lo[..., IMG_HI:] > -1e30).all()
    m.config.mask_image_logits = False
    assert (m(ids())[..., IMG_LO:IMG_HI] > -1e30).all()
    assert (m(ids(), mask_image_logits=True)[..., IMG_LO:IMG_HI] < -1e30).all()


def test_sampler():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, V, generator=g)
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample(logits, top_k=1, generator=g), logits.argmax(-1))
    s1 = sample(logits, 1.0, generator=torch.Generator().manual_seed(3))
    s2 = sample(logits, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2)
    # hand-made distribution: p = [0.5, 0.3, 0.15, 0.05]
    lg = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2000, 1)
    draw = lambda **kw: set(sample(lg, generator=torch.Generator().manual_seed(1), **kw).tolist())
    assert draw(top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keep the top two
    assert draw(top_p=0.5) == {0}  # the top token alone reaches 0.5
    assert draw(top_p=0.9) == {0, 1, 2}
    assert draw(top_k=2) == {0, 1}
    assert draw() == {0, 1, 2, 3}


def test_sampler_draws_the_softmax_distribution():
    # the inverse-CDF draw must match softmax frequencies, and never pick an id of probability 0
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    lg = p.log().repeat(20000, 1)
    counts = torch.bincount(sample(lg, generator=torch.Generator().manual_seed(0)), minlength=5).float() / 20000
    torch.testing.assert_close(counts, p, rtol=0, atol=0.015)
    assert counts[4] == 0


def test_weights_stored_input_major_with_hf_shapes(tmp_path):
    m = tiny()  # decode speed-up: Linear weights are (out, in) views of (in, out) storage
    w = m.model.layers[0].self_attn.q_proj.weight
    assert w.shape == (32, 32) and w.t().is_contiguous()
    assert tuple(m.lm_head.weight.shape) == (V, 32) and m.lm_head.weight.t().is_contiguous()
    m.save_pretrained(tmp_path)
    m2 = Chameleon.from_pretrained(tmp_path)
    assert m2.model.layers[1].mlp.down_proj.weight.t().is_contiguous()  # re-laid out after loading
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_token_logprobs():
    logits, x = torch.randn(2, 6, V), ids(T=6)
    want = logits[:, :-1].log_softmax(-1).gather(-1, x[:, 1:, None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, x), want)


def test_generate_text_restricts_to_text_and_pads_after_eos():
    m = tiny()
    m.config.mask_image_logits = False  # a model trained to emit images: text generation must still avoid them
    g = torch.Generator().manual_seed(0)
    out = generate_text(m, ids(), 15, temperature=1.5, generator=g)
    assert out.shape == (2, 15)
    assert ((out < IMG_LO) | (out >= IMG_HI)).all()
    # greedy equals argmax over a full forward, step by step
    x = ids()
    greedy = generate_text(m, x, 5, temperature=0)
    for t in range(5):
        lg = m(torch.cat([x, greedy[:, :t]], 1))[:, -1]
        lg[:, IMG_LO:IMG_HI] = float("-inf")
        assert torch.equal(greedy[:, t], lg.argmax(-1))
    # eos: make token 3 the only allowed one -> every row stops after one step
    mask = torch.zeros(V, dtype=torch.bool)
    mask[3] = True
    out = generate_text(m, x, 6, eos_id=3, allowed=mask, pad_id=0)
    assert out.shape == (2, 1) and (out == 3).all()
    mask = torch.zeros(V, dtype=torch.bool)
    mask[[3, 5]] = True
    out = generate_text(m, x, 6, eos_id=3, allowed=mask, pad_id=0, temperature=1.0, generator=g)
    assert set(out.unique().tolist()) <= {0, 3, 5}
    for row in out.tolist():
        if 3 in row:
            assert all(t == 0 for t in row[row.index(3) + 1:])


def test_generate_image():
    m = tiny()  # mask_image_logits is True: generate_image must lift it
    BOI = 4
    g = torch.Generator().manual_seed(0)
    out = generate_image(m, ids(), 9, boi_id=BOI, generator=g)
    assert out.shape == (2, 9) and ((out >= IMG_LO) & (out < IMG_HI)).all()
    x = ids()
    x[:, -1] = BOI  # prompt already ends with BOI: not appended twice -> same as the prompt without it
    a = generate_image(m, x, 5, BOI, temperature=0)
    b = generate_image(m, x[:, :-1], 5, BOI, temperature=0)
    assert torch.equal(a, b)
    # greedy = argmax over image ids of a full forward
    lg = m(torch.cat([x, a[:, :2]], 1), mask_image_logits=False)[:, -1, IMG_LO:IMG_HI]
    assert torch.equal(a[:, 2], lg.argmax(-1) + IMG_LO)
    # CFG: scale 1 = no guidance; equal-length (batched) and different-length (two caches) unconditional prompts
    assert torch.equal(generate_image(m, x, 5, BOI, temperature=0, cfg_scale=1.0, uncond_idx=ids(T=12, seed=5)), a)
    for u in (ids(B=1, T=12, seed=5), ids(B=1, T=3, seed=5), None):
        out = generate_image(m, x, 6, BOI, temperature=0.9, top_k=10, top_p=0.9, generator=g, cfg_scale=3.0,
                             uncond_idx=u)
        assert out.shape == (2, 6) and ((out >= IMG_LO) & (out < IMG_HI)).all()
    # CFG by hand at step 0 (uncond of a different length)
    u = ids(T=4, seed=7)
    out = generate_image(m, x, 1, BOI, temperature=0, cfg_scale=2.5, uncond_idx=u)
    c = m(x, mask_image_logits=False)[:, -1]
    un = m(torch.cat([u, torch.full((2, 1), BOI)], 1), mask_image_logits=False)[:, -1]
    assert torch.equal(out[:, 0], (un + 2.5 * (c - un))[:, IMG_LO:IMG_HI].argmax(-1) + IMG_LO)
    # Anole's 3-way guidance runs and stays in range
    out = generate_image(m, x, 4, BOI, generator=g, cfg_scale=3.0, image_idx=ids(T=5, seed=9), image_cfg_scale=1.2)
    assert out.shape == (2, 4) and ((out >= IMG_LO) & (out < IMG_HI)).all()


def test_gradient_checkpointing_same_grads():
    x = ids(T=10)
    grads = []
    for ckpt in (False, True):
        m = tiny(gradient_checkpointing=ckpt).train()
        loss = -token_logprobs(m(x, mask_image_logits=False), x).mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_config_round_trip():
    c = ChameleonConfig.preset("tiny", vocab_size=300, swin_norm=True)
    assert c.n_layer == 4 and c.vocab_size == 300 and c.mask_image_logits
    d = json.loads(json.dumps(c.to_dict()))
    assert ChameleonConfig.from_dict(d) == c
    with pytest.raises(ValueError):
        ChameleonConfig.preset("huge")


def test_config_round_trip_with_vq():
    pytest.importorskip("tokenizer")
    c = ChameleonConfig.preset("chameleon-7b")
    d = json.loads(json.dumps(c.to_dict()))
    c2 = ChameleonConfig.from_dict(d)
    assert c2 == c and dataclasses.asdict(c2.vq) == dataclasses.asdict(c.vq)
    # the HF mapping recovers the same transformer (image ids from the IMGIMG names)
    h = ChameleonConfig.from_hf(c.to_hf())
    assert (h.n_layer, h.n_embd, h.n_inner, h.image_token_start, h.image_token_end) == (32, 4096, 11008, 4, 8196)


# ------------------------------------------------------------------------------------------------- checkpoints


def _save(m, path):
    m.save_pretrained(path)
    return os.path.join(path, "model.safetensors")


def test_save_load_round_trip(tmp_path):
    m = tiny(swin_norm=True)
    _save(m, tmp_path)
    m2 = Chameleon.from_pretrained(tmp_path)
    assert m2.config == m.config
    torch.testing.assert_close(m2(ids()), m(ids()), rtol=0, atol=0)
    m3 = Chameleon.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert m3.lm_head.weight.dtype == torch.bfloat16 and m3(ids()).dtype == torch.float32


def test_bad_checkpoints_give_one_readable_error(tmp_path):
    from safetensors.torch import load_file, save_file

    m = tiny()
    f = _save(m, tmp_path)
    sd = load_file(f)
    sd["model.layers.0.self_attn.q_proj.weight_renamed"] = sd.pop("model.layers.0.self_attn.q_proj.weight")
    sd["model.norm.weight"] = torch.ones(7)
    save_file(sd, f)
    with pytest.raises(CheckpointError) as e:
        Chameleon.from_pretrained(tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "missing keys (1)" in msg and "model.layers.0.self_attn.q_proj.weight  expected shape [32, 32]" in msg
    assert "unexpected keys (1)" in msg and "q_proj.weight_renamed" in msg
    assert "model.norm.weight  expected [32], found [7] in model.safetensors" in msg
    # truncated file: the error names the file
    _save(m, tmp_path)
    data = open(f, "rb").read()
    for cut in (len(data) // 2, 20):
        with open(f, "wb") as fh:
            fh.write(data[:cut])
        with pytest.raises(CheckpointError, match="model.safetensors"):
            Chameleon.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------- 7B layout


def test_chameleon_7b_on_meta_matches_hf_layout():
    pytest.importorskip("tokenizer")
    with torch.device("meta"):
        m = Chameleon(ChameleonConfig.preset("chameleon-7b"))
    assert m.num_params() == 7_043_090_432
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    hf_cfg = transformers.ChameleonConfig(vocabulary_map={"<image>": 8711})  # HF defaults = Chameleon-7B
    with torch.device("meta"):
        hf = transformers.ChameleonForConditionalGeneration(hf_cfg)
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours == theirs
