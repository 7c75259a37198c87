"""Parity of model.py's Gemma family (Liquid's base) with transformers' GemmaForCausalLM on tiny random configs:
head_dim apart from hidden / heads, tied and untied embeddings, MQA and GQA, sharded checkpoints with an index.
fp32 logits within 1e-4, greedy decoding with the KV cache equal to the full forward, and Liquid's tokenizer
layout."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (parity tests need it)")

from model import Chameleon, KVCache, generate_text  # noqa: E402
from rehearse import build_liquid  # noqa: E402
from tokenizer import TextTokenizer, VQConfig  # noqa: E402

N_TEXT = 300  # text ids; the 16 image ids follow (Liquid: code + the tokenizer's length)
VQ = VQConfig(embed_dim=8, num_embeddings=16, latent_channels=32, resolution=16, base_channels=32,
              channel_multiplier=(1, 2), num_res_blocks=1)


@pytest.mark.parametrize("heads,kv_heads,head_dim,tied,shards", [(4, 1, 24, True, 3), (4, 2, 8, False, 2),
                                                                  (2, 2, 16, True, 1)])
def test_logits_and_greedy_match_hf(tmp_path, heads, kv_heads, head_dim, tied, shards):
    hf = build_liquid(tmp_path, hidden=32, heads=heads, kv_heads=kv_heads, head_dim=head_dim, inner=48, n_text=N_TEXT,
                      vq=VQ, layers=2, tied=tied, shards=shards)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shards > 1)
    ours = Chameleon.from_pretrained(tmp_path)
    c = ours.config
    assert (c.head_dim, c.n_kv_head, c.tie_embeddings, c.qk_norm) == (head_dim, kv_heads, tied, False)
    assert (c.image_token_start, c.image_token_end, c.vq) == (N_TEXT, N_TEXT + 16, None)
    assert ("lm_head.weight" in ours.state_dict()) == (not tied)

    idx = torch.randint(0, N_TEXT + 16, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(idx).logits, ours(idx, mask_image_logits=False)
    assert (got - want).abs().max().item() <= 1e-4

    # greedy decoding through the KV cache (HF's generate and ours) = argmax of the full forward at every step
    c.mask_image_logits = False  # HF's Gemma knows no image ids
    our_out = generate_text(ours, idx, 8, allowed=torch.ones(c.vocab_size, dtype=torch.bool), temperature=0)
    hf_out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=8, min_new_tokens=8,
                         do_sample=False, pad_token_id=0)[:, idx.shape[1]:]
    assert torch.equal(our_out, hf_out)
    with torch.no_grad():
        full = ours(torch.cat([idx, our_out], 1), mask_image_logits=False)[:, idx.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(full, our_out)


def test_bf16_cache_matches_forward(tmp_path):
    """In bf16 (the fine-tuning dtype) a cached decode step gives the full forward's logits at that position."""
    build_liquid(tmp_path, hidden=32, heads=4, kv_heads=1, head_dim=24, inner=48, n_text=N_TEXT, vq=VQ, layers=2)
    ours = Chameleon.from_pretrained(tmp_path, dtype=torch.bfloat16)
    idx = torch.randint(0, N_TEXT, (1, 9), generator=torch.Generator().manual_seed(2))
    cache = KVCache.for_model(ours, 1, 16)
    with torch.no_grad():
        ours(idx[:, :-1], kv_cache=cache)
        step = ours(idx[:, -1:], kv_cache=cache)[:, -1]
        full = ours(idx)[:, -1]
    assert (step - full).abs().max().item() <= 0.05 * full.abs().max().item()


def test_liquid_tokenizer_layout(tmp_path):
    build_liquid(tmp_path, hidden=32, heads=2, kv_heads=2, head_dim=16, inner=48, n_text=N_TEXT, vq=VQ)
    tok = TextTokenizer.from_file(tmp_path / "tokenizer.json", n_image_codes=16)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.image_offset, tok.vocab_size) == (0, 1, 2, N_TEXT, N_TEXT + 16)
    assert tok.image_ids(torch.tensor([0, 15])).tolist() == [N_TEXT, N_TEXT + 15] and tok.boi_id in tok.special_ids
    assert tok.decode(tok.encode("push the red cube")) == "push the red cube"


def test_hf_reads_our_checkpoint(tmp_path):
    """What save_pretrained writes for a Gemma-family model loads in transformers with the same logits."""
    build_liquid(tmp_path / "hf", hidden=32, heads=4, kv_heads=2, head_dim=24, inner=48, n_text=N_TEXT, vq=VQ, layers=2)
    ours = Chameleon.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # make sure the weights really travel
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.GemmaForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    idx = torch.randint(0, N_TEXT + 16, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx, mask_image_logits=False)).abs().max().item() <= 1e-4
