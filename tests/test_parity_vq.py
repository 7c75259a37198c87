"""Parity of tokenizer.py against transformers' Chameleon VQ-VAE (encoder, quantiser, checkpoint layout) and image
processor. Skipped when transformers is not installed (it is a test-only dependency, pinned in
requirements-dev.txt)."""

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers", reason="transformers (the reference implementation) is not installed")

from transformers import ChameleonConfig, ChameleonForConditionalGeneration, ChameleonVQVAEConfig  # noqa: E402
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE  # noqa: E402

from data import preprocess_image  # noqa: E402
from tokenizer import ImageTokenizer, VQConfig, hf_to_ours, image_token_name  # noqa: E402

# transformers' own tiny test config (base_channels 32 for GroupNorm(32), channel_multiplier [1, 2], embed_dim 5),
# with a few more codes so argmin has real choices; one variant adds attention blocks on the down path.
TINY = dict(embed_dim=5, num_embeddings=12, latent_channels=32, resolution=16, base_channels=32,
            channel_multiplier=[1, 2], num_res_blocks=2)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (GroupNorm scales/shifts too, which start at 1/0), so a mis-wired block shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # keep GroupNorm gains near 1
            p.copy_(scale + 0.3 * torch.randn(p.shape, generator=g))


def hf_vq(**overrides) -> ChameleonVQVAE:
    hf = ChameleonVQVAE(ChameleonVQVAEConfig(**{**TINY, **overrides})).eval()
    randomise(hf, seed=0)
    return hf


@pytest.mark.parametrize("overrides", [{}, {"attn_resolutions": [16, 8]}, {"attn_type": "none"}],
                         ids=["mid-attn", "down-attn", "no-attn"])
def test_encoder_and_codes_match_hf(overrides):
    hf = hf_vq(**overrides)
    cfg = VQConfig.from_dict(hf.config.to_dict())
    ours = ImageTokenizer(cfg, with_decoder=False).eval()
    sd = {hf_to_ours(k): v for k, v in hf.state_dict().items()}  # identity name map
    ours.load_state_dict(sd, strict=True)

    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        out = hf.encode(x, return_dict=True)
        feats_hf = hf.quant_conv(hf.encoder(x))
        feats = ours.encode_features(x)
        codes = ours.encode(x)
        z_q, losses, codes_fwd = ours.quantize(feats)
    assert feats.shape == (4, 5, 8, 8)
    assert torch.allclose(feats, feats_hf, atol=1e-5, rtol=0)
    assert torch.equal(codes.view(-1), out.image_tokens.view(-1))  # raster order, same argmin
    assert torch.equal(codes, codes_fwd)
    assert len(set(codes.view(-1).tolist())) > 1  # the check is not vacuous
    assert torch.allclose(z_q, out.quantized_last_hidden_state, atol=1e-6)
    # HF (taming legacy=True) weights the codebook term by beta; ours weights the commitment term (VQ-VAE paper).
    # The two named terms rebuild HF's number exactly.
    assert torch.allclose(losses["commitment"] + hf.quantize.beta * losses["codebook"], out.embedding_loss)


def test_from_pretrained_reads_hf_checkpoint(tmp_path):
    """Save a tiny ChameleonForConditionalGeneration with transformers (sharded, so with an index file) and read its
    `model.vqmodel.*` back through ImageTokenizer.from_pretrained."""
    n_codes = TINY["num_embeddings"]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({image_token_name(c): 4 + c for c in range(n_codes)})
    vocab.update({"<eoss>": 4 + n_codes, "<racm3:break>": 5 + n_codes, "<image>": 6 + n_codes})
    cfg = ChameleonConfig(vocab_size=32, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, vq_config=TINY, vocabulary_map=vocab,
                          image_token_id=vocab["<image>"])
    model = ChameleonForConditionalGeneration(cfg).eval()
    randomise(model.model.vqmodel, seed=3)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()

    ours = ImageTokenizer.from_pretrained(tmp_path)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref = model.model.vqmodel.encode(x, return_dict=True)
        assert torch.equal(ours.encode(x).view(-1), ref.image_tokens.view(-1))
        assert torch.allclose(ours.encode_features(x), model.model.vqmodel.quant_conv(ref.last_hidden_state),
                              atol=1e-5, rtol=0)


@pytest.mark.parametrize("size_wh", [(37, 23), (23, 37), (16, 16)])
def test_preprocess_matches_hf_image_processor(size_wh):
    from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil

    g = torch.Generator().manual_seed(4)
    rgba = (torch.rand(size_wh[1], size_wh[0], 4, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(rgba, "RGBA")
    proc = ChameleonImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    ref = torch.as_tensor(proc(img, return_tensors="pt")["pixel_values"][0])
    ours = preprocess_image(img, 16)
    assert ours.shape == ref.shape == (3, 16, 16)
    assert torch.allclose(ours, ref.float(), atol=1e-5, rtol=0)
