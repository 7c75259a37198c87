"""Parity of model.py with transformers' ChameleonForConditionalGeneration (5.24.0) on tiny random configs.

HF writes a sharded checkpoint (model.safetensors.index.json); our from_pretrained must read it and give the same
fp32 logits (<= 1e-4) and the same greedy continuation; HF must also read what our save_pretrained writes.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (parity tests need it)")
pytest.importorskip("tokenizer", reason="tokenizer.py (the VQ encoder inside the checkpoint) is not available")

from model import Chameleon, generate_text  # noqa: E402

VOCAB, IMG_LO, IMG_HI = 99, 20, 40  # image ids 20..39, named IMGIMG...Z like Chameleon's


def hf_config(swin_norm: bool):
    vmap = {f"tok{i}": i for i in range(VOCAB)}
    for i in range(IMG_LO, IMG_HI):  # code c -> "IMGIMG" + digits of c as letters A..J + "Z"
        vmap.pop(f"tok{i}")
        vmap["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i - IMG_LO)) + "Z"] = i
    vq = dict(embed_dim=5, num_embeddings=5, latent_channels=8, resolution=16, base_channels=32,
              channel_multiplier=[1, 2], num_res_blocks=1)
    return transformers.ChameleonConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, swin_norm=swin_norm, vocabulary_map=vmap,
        vq_config=vq, bos_token_id=0, eos_token_id=2, pad_token_id=1, attn_implementation="eager")


def hf_model(swin_norm: bool):
    torch.manual_seed(0)
    hf = transformers.ChameleonForConditionalGeneration(hf_config(swin_norm)).eval()
    with torch.no_grad():  # norms start at identity (weight 1, bias 0): randomise them so they are exercised
        for n, p in hf.named_parameters():
            if "norm" in n and "vqmodel" not in n:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if n.endswith("weight") else 0.0))
    return hf


@pytest.mark.parametrize("swin_norm", [False, True])
def test_logits_and_greedy_match_hf(tmp_path, swin_norm):
    hf = hf_model(swin_norm)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")  # force a sharded checkpoint
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = Chameleon.from_pretrained(tmp_path)
    c = ours.config
    assert (c.image_token_start, c.image_token_end, c.n_kv_head, c.swin_norm) == (IMG_LO, IMG_HI, 2, swin_norm)

    idx = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(idx).logits
        got = ours(idx)
    assert got.shape == want.shape
    masked = want <= torch.finfo(want.dtype).min
    assert masked[..., IMG_LO:IMG_HI].all() and torch.equal(masked, got <= torch.finfo(got.dtype).min)
    assert (got[~masked] - want[~masked]).abs().max().item() <= 1e-4

    # greedy continuation, image mask on as in HF; both stop at eos (2) and pad with it
    hf_out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False,
                         eos_token_id=2, pad_token_id=2)[:, idx.shape[1]:]
    our_out = generate_text(ours, idx, 20, eos_id=2, temperature=0)
    assert torch.equal(our_out, hf_out)

    # the VQ encoder inside the checkpoint gives the same codes
    px = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        hf_codes = hf.model.vqmodel.encode(px).image_tokens.view(2, -1)
        our_codes = ours.model.vqmodel.encode(px)
    assert torch.equal(our_codes, hf_codes)


def test_hf_reads_our_checkpoint(tmp_path):
    ours = Chameleon.from_pretrained(_saved_hf(tmp_path / "hf"))
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # make sure the weights really travel
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / "ours",
                                                                        attn_implementation="eager").eval()
    idx = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = hf(idx).logits, ours(idx)
    keep = want > torch.finfo(want.dtype).min
    assert torch.equal(keep, got > torch.finfo(got.dtype).min)
    assert (got[keep] - want[keep]).abs().max().item() <= 1e-4


def _saved_hf(path):
    hf_model(False).save_pretrained(path)
    return path
