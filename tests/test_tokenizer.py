"""Tests for tokenizer.py: VQ image tokenizer, its training, checkpoint I/O, preprocessing and the text tokenizer."""

import json
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from data import HF_RESCALE, preprocess_image, to_pil
from tokenizer import (
    ImageTokenizer,
    TextTokenizer,
    VectorQuantizer,
    VQConfig,
    codebook_usage,
    convert_vqgan_ckpt,
    image_token_code,
    image_token_name,
    train_vqgan,
)


def tiny_cfg(**kw) -> VQConfig:
    """A small VQ config that still has every kind of block (attention at 8x8, a channel change, 2 levels)."""
    base = dict(embed_dim=8, num_embeddings=16, latent_channels=32, resolution=16, base_channels=32,
                channel_multiplier=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
    base.update(kw)
    return VQConfig(**base)


def shapes(n: int, gen: torch.Generator, size: int = 32) -> torch.Tensor:
    """n images of 1-3 flat-coloured rectangles/circles on white, (n, 3, size, size) in [-1, 1]."""
    palette = torch.tensor([[1, 0, 0], [0, 0.6, 0], [0, 0, 1], [1, 0.8, 0], [0.6, 0, 0.8], [0, 0, 0]])
    img = torch.ones(n, 3, size, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            col = palette[int(torch.randint(0, len(palette), (1,), generator=gen))]
            cx, cy = torch.randint(4, size - 4, (2,), generator=gen).tolist()
            r = int(torch.randint(3, 8, (1,), generator=gen))
            if torch.rand(1, generator=gen) < 0.5:
                m = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r
            else:
                m = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
            img[i][:, m] = col[:, None]
    return img * 2 - 1


# ----------------------------------------------------------------------------------------------------------------
# config and shapes


def test_presets():
    c = VQConfig.chameleon()
    assert (c.grid, c.n_tokens, c.num_embeddings, c.embed_dim, c.decoder_num_res_blocks) == (32, 1024, 8192, 256, 3)
    w = VQConfig.world()
    assert (w.resolution, w.grid, w.n_tokens, w.downsample) == (32, 8, 64, 4)
    assert VQConfig.from_dict(json.loads(json.dumps(w.to_dict()))) == w
    with pytest.raises(ValueError, match="GroupNorm"):
        VQConfig(base_channels=48)


def test_encode_decode_shapes():
    torch.manual_seed(0)
    cfg = VQConfig.world()
    m = ImageTokenizer(cfg).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        feats = m.encode_features(x)
        codes = m.encode(x)
        y = m.decode(codes)
        recon, losses, codes2 = m(x)
    assert feats.shape == (2, cfg.embed_dim, 8, 8)
    assert codes.shape == (2, 64) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < cfg.num_embeddings
    assert y.shape == (2, 3, 32, 32) and y.min() >= -1 and y.max() <= 1
    assert recon.shape == x.shape and torch.equal(codes, codes2)
    assert set(losses) == {"recon", "codebook", "commitment", "vq", "loss"}
    # HF checkpoints have no decoder: encoding still works, decoding says why it cannot
    enc_only = ImageTokenizer(cfg, with_decoder=False)
    assert not any(k.startswith("decoder.") for k in enc_only.state_dict())
    with pytest.raises(RuntimeError, match="with_decoder=False"):
        enc_only.decode(codes)


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    m = ImageTokenizer(tiny_cfg())
    _, losses, _ = m(torch.rand(2, 3, 16, 16) * 2 - 1)
    losses["recon"].backward()
    # the reconstruction loss reaches the encoder only through the straight-through estimator ...
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0
    assert m.quant_conv.weight.grad.abs().sum() > 0
    # ... and never the codebook (the argmin lookup is bypassed in the backward pass)
    g = m.quantize.embedding.weight.grad
    assert g is None or g.abs().sum() == 0


def test_vq_losses_hand_checked():
    q = VectorQuantizer(VQConfig(embed_dim=2, num_embeddings=2, beta=0.5))
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    z = torch.tensor([0.8, 0.6]).view(1, 2, 1, 1).requires_grad_(True)
    # |z - e0|^2 = 1.0, |z - e1|^2 = 0.04 + 0.16 = 0.2 -> code 1; both losses are the mean over D=2: 0.1
    z_q, losses, codes = q(z)
    assert codes.tolist() == [[1]]
    assert torch.allclose(z_q, torch.tensor([1.0, 1.0]).view(1, 2, 1, 1))
    assert math.isclose(losses["codebook"].item(), 0.1, rel_tol=1e-5)
    assert math.isclose(losses["commitment"].item(), 0.1, rel_tol=1e-5)
    assert math.isclose(losses["vq"].item(), 0.1 + 0.5 * 0.1, rel_tol=1e-5)
    # codebook loss moves only the code: d/de1 mean((e1 - z)^2) = (e1 - z) = [0.2, 0.4]
    losses["codebook"].backward(retain_graph=True)
    assert torch.allclose(q.embedding.weight.grad, torch.tensor([[0.0, 0.0], [0.2, 0.4]]))
    assert z.grad is None or z.grad.abs().sum() == 0
    # commitment loss moves only the encoder output: d/dz mean((z - e1)^2) = (z - e1) = [-0.2, -0.4]
    q.embedding.weight.grad = None
    losses["commitment"].backward()
    assert torch.allclose(z.grad.view(2), torch.tensor([-0.2, -0.4]))
    assert q.embedding.weight.grad is None or q.embedding.weight.grad.abs().sum() == 0


def test_quantiser_picks_nearest_code_in_raster_order():
    q = VectorQuantizer(VQConfig(embed_dim=3, num_embeddings=4))
    book = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    with torch.no_grad():
        q.embedding.weight.copy_(book)
    # a 2x3 feature map whose position (r, c) is near code want[r][c]
    want = [[3, 0, 1], [2, 2, 3]]
    z = torch.stack([torch.stack([book[k] + 0.1 * torch.tensor([0.3, -0.2, 0.1]) for k in row]) for row in want])
    z = z.permute(2, 0, 1).unsqueeze(0)  # (1, 3, 2, 3)
    _, _, codes = q(z)
    assert codes.tolist() == [[3, 0, 1, 2, 2, 3]]
    assert q.nearest(book).tolist() == [0, 1, 2, 3]


def test_codebook_usage():
    u = codebook_usage(torch.tensor([0, 0, 1, 1]), 4)
    assert u["usage"] == 0.5 and math.isclose(u["perplexity"], 2.0)
    assert math.isclose(codebook_usage(torch.arange(8), 8)["perplexity"], 8.0)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    m = ImageTokenizer(tiny_cfg()).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    m.save(tmp_path / "vq")
    m2 = ImageTokenizer.load(tmp_path / "vq")
    assert m2.cfg == m.cfg and m2.with_decoder
    with torch.no_grad():
        assert torch.equal(m.encode(x), m2.encode(x))
        assert torch.equal(m.decode(m.encode(x)), m2.decode(m2.encode(x)))
    enc = ImageTokenizer(tiny_cfg(), with_decoder=False)
    enc.save(tmp_path / "enc")
    assert not ImageTokenizer.load(tmp_path / "enc").with_decoder
    with pytest.raises(FileNotFoundError, match="config.json"):
        ImageTokenizer.load(tmp_path / "nowhere")


class NotATensor:
    """A Python object torch.load(weights_only=True) must refuse to unpickle."""


def fake_vqgan_ckpt(model: ImageTokenizer) -> dict:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)  # training-only weights, dropped on conversion
    return {"state_dict": sd, "global_step": 7}


def test_convert_vqgan_ckpt_round_trip(tmp_path):
    torch.manual_seed(0)
    m = ImageTokenizer(tiny_cfg())
    ckpt = tmp_path / "vqgan.ckpt"
    torch.save(fake_vqgan_ckpt(m), ckpt)
    info = convert_vqgan_ckpt(ckpt, tmp_path / "vqgan.safetensors")
    assert info["dropped"] == ["loss.discriminator.main.0.weight"]
    sd = load_file(str(tmp_path / "vqgan.safetensors"))
    assert "quantize.embedding.weight" in sd and "decoder.up.1.upsample.conv.weight" in sd
    assert "decoder.up.0.block.1.nin_shortcut.weight" not in sd  # only the first block of a level changes channels
    m2 = ImageTokenizer(tiny_cfg())
    m2.load_state_dict(sd)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_convert_vqgan_ckpt_refuses_pickled_objects(tmp_path):
    m = ImageTokenizer(tiny_cfg())
    bad = tmp_path / "evil.ckpt"
    torch.save({**fake_vqgan_ckpt(m), "hyper_parameters": NotATensor()}, bad)
    with pytest.raises(ValueError, match=r"weights_only=True\) refused .*evil\.ckpt"):
        convert_vqgan_ckpt(bad, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    # the documented escape hatch for a trusted file: load it yourself and pass the dict
    obj = torch.load(bad, weights_only=False)
    convert_vqgan_ckpt(obj, tmp_path / "out.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        convert_vqgan_ckpt(tmp_path / "missing.ckpt", tmp_path / "x.safetensors")


def write_hf_dir(d, model: ImageTokenizer, shards: int = 1, edit=None):
    """A directory laid out like an HF Chameleon checkpoint: config.json with vq_config, `model.vqmodel.*` tensors
    next to some language-model tensors, in one file or in shards with an index."""
    d.mkdir(parents=True, exist_ok=True)
    hf = {f"model.vqmodel.{k}": v.clone() for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    hf["model.embed_tokens.weight"] = torch.randn(10, 4)
    hf["lm_head.weight"] = torch.randn(10, 4)
    if edit:
        edit(hf)
    vq = model.cfg.to_dict()
    for k in ("out_channels", "decoder_num_res_blocks", "beta", "recon_loss"):  # not HF fields
        vq.pop(k)
    (d / "config.json").write_text(json.dumps({"model_type": "chameleon", "vq_config": {**vq, "model_type":
                                                                                         "chameleon_vqgan"}}))
    keys = sorted(hf)
    if shards == 1:
        save_file(hf, str(d / "model.safetensors"))
        return
    wmap = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: hf[k] for k in keys[s::shards]}
        save_file(part, str(d / name))
        wmap.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


@pytest.mark.parametrize("shards", [1, 3])
def test_from_pretrained(tmp_path, shards):
    torch.manual_seed(0)
    m = ImageTokenizer(tiny_cfg()).eval()
    write_hf_dir(tmp_path / "hf", m, shards=shards)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    enc = ImageTokenizer.from_pretrained(tmp_path / "hf")
    assert not enc.with_decoder and enc.cfg.embed_dim == 8
    assert torch.equal(enc.encode(x), m.encode(x))
    # the decoder comes from the converted original checkpoint
    torch.save(fake_vqgan_ckpt(m), tmp_path / "vqgan.ckpt")
    convert_vqgan_ckpt(tmp_path / "vqgan.ckpt", tmp_path / "vqgan.safetensors")
    full = ImageTokenizer.from_pretrained(tmp_path / "hf", decoder_path=tmp_path / "vqgan.safetensors")
    with torch.no_grad():
        assert torch.equal(full.decode(full.encode(x)), m.decode(m.encode(x)))


def test_from_pretrained_errors(tmp_path):
    m = ImageTokenizer(tiny_cfg())

    def rename(sd):
        sd["model.vqmodel.encoder.conv_in.weightX"] = sd.pop("model.vqmodel.encoder.conv_in.weight")

    write_hf_dir(tmp_path / "renamed", m, edit=rename)
    with pytest.raises(ValueError) as e:
        ImageTokenizer.from_pretrained(tmp_path / "renamed")
    msg = str(e.value)
    assert "model.safetensors" in msg and "renamed" in msg
    assert "missing keys (1):\n    encoder.conv_in.weight  expected shape" in msg
    assert "unexpected keys (1):\n    encoder.conv_in.weightX" in msg

    def reshape(sd):
        sd["model.vqmodel.quantize.embedding.weight"] = torch.randn(17, 8)

    write_hf_dir(tmp_path / "shape", m, shards=2, edit=reshape)
    with pytest.raises(ValueError, match=r"(?s)model.safetensors.index.json.*shape mismatches \(1\):\n    "
                                         r"quantize.embedding.weight  expected \[16, 8\], found \[17, 8\]"):
        ImageTokenizer.from_pretrained(tmp_path / "shape")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ImageTokenizer.from_pretrained(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------------------
# training


def check_training(cfg: VQConfig, steps: int, batch_size: int, max_ratio: float, min_usage: float):
    def source(n, gen):
        return shapes(n, gen, size=cfg.resolution)

    t0 = time.time()
    model, hist = train_vqgan(source, cfg, steps=steps, batch_size=batch_size, lr=3e-3, seed=0,
                              dead_code_window=20, log_every=20, progress=False)
    elapsed = time.time() - t0
    test = shapes(64, torch.Generator().manual_seed(123), size=cfg.resolution)
    with torch.no_grad():
        codes = model.encode(test)
        err = (model.decode(codes) - test).abs().mean().item()
    usage = codebook_usage(codes, model.cfg.num_embeddings)
    print(f"train_vqgan: {elapsed:.1f}s, recon L1 {hist['recon_init']:.3f} -> {err:.3f} (held-out), usage {usage}")
    assert err < max_ratio * hist["recon_init"]
    assert hist["usage"][-1] > min_usage  # dead-code restarts keep the codebook in use during training
    assert usage["usage"] > min_usage / 2 and usage["perplexity"] > 8
    assert set(hist) >= {"step", "loss", "recon", "codebook", "commitment", "usage", "perplexity", "restarted"}
    assert not model.training


def test_train_vqgan_reconstructs_shapes():
    """Training mechanics on a small 16x16 tokenizer (fast); the world preset itself is the slow test below."""
    torch.manual_seed(0)
    cfg = VQConfig(embed_dim=16, num_embeddings=64, latent_channels=32, resolution=16, base_channels=32,
                   channel_multiplier=(1, 2), num_res_blocks=1, decoder_num_res_blocks=1)
    check_training(cfg, steps=60, batch_size=16, max_ratio=0.7, min_usage=0.5)


@pytest.mark.slow
def test_train_vqgan_world_preset():
    torch.manual_seed(0)
    check_training(VQConfig.world(), steps=300, batch_size=32, max_ratio=0.25, min_usage=0.5)


# ----------------------------------------------------------------------------------------------------------------
# image preprocessing


def test_preprocess_modes(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    x = preprocess_image(rgba, 8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    white, zero = 255 * HF_RESCALE - 1, -1.0
    assert torch.allclose(x[:, 0, 0], torch.tensor([white] * 3), atol=1e-6)
    assert torch.allclose(x[:, 4, 4], torch.tensor([white, zero, zero]), atol=1e-6)
    gray = preprocess_image(Image.new("L", (8, 8), 128), 8)
    assert torch.allclose(gray, torch.full((3, 8, 8), 128 * HF_RESCALE - 1), atol=1e-6)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    assert torch.allclose(preprocess_image(pal, 8)[:, 3, 3], torch.tensor([zero, zero, white]), atol=1e-6)
    pal.info["transparency"] = 1  # palette transparency is composited onto white too
    assert torch.allclose(preprocess_image(pal, 8), torch.full((3, 8, 8), white), atol=1e-6)
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "g.png")
    green = preprocess_image(tmp_path / "g.png", 8)
    assert torch.allclose(green[:, 2, 2], torch.tensor([zero, white, zero]), atol=1e-6)


def test_preprocess_resize_and_centre_crop():
    # portrait 20x40 whose top and bottom 10 rows are black: shortest side is already 20, so no resampling,
    # and the centre crop keeps rows 10..29 -> all white
    a = np.zeros((40, 20, 3), np.uint8)
    a[10:30] = 255
    x = preprocess_image(Image.fromarray(a), 20)
    assert x.shape == (3, 20, 20) and torch.allclose(x, torch.full_like(x, 255 * HF_RESCALE - 1), atol=1e-6)
    # landscape 60x30 -> shortest side 10 (LANCZOS), i.e. 20x10, then crop the middle 10 columns
    b = np.zeros((30, 60, 3), np.uint8)
    b[:, 15:45] = (0, 0, 255)
    y = preprocess_image(Image.fromarray(b), 10)
    assert y.shape == (3, 10, 10)
    assert torch.allclose(y[:, :, 3:7], torch.tensor([-1.0, -1.0, 255 * HF_RESCALE - 1]).view(3, 1, 1), atol=0.02)
    # a uniform image stays uniform through resize
    z = preprocess_image(Image.new("RGB", (64, 48), (10, 20, 30)), 16)
    assert torch.allclose(z[:, 5, 5], torch.tensor([10, 20, 30.0]) * HF_RESCALE - 1, atol=1e-5)


def test_preprocess_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.png"):
        preprocess_image(tmp_path / "no_such.png", 8)
    (tmp_path / "junk.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="junk.png"):
        preprocess_image(tmp_path / "junk.png", 8)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # truncated file
    with pytest.raises(ValueError, match="cut.png"):
        preprocess_image(tmp_path / "cut.png", 8)


def test_to_pil_round_trip():
    x = preprocess_image(Image.new("RGB", (8, 8), (200, 100, 0)), 8)
    img = to_pil(x)
    assert img.mode == "RGB" and img.size == (8, 8)
    # x*0.0078-1 then (x+1)/2*255 is ~0.5% below the original (HF's 0.0078 is not exactly 2/255), truncated
    assert img.getpixel((0, 0)) == (198, 99, 0)
    assert to_pil(torch.full((3, 2, 2), 5.0)).getpixel((0, 0)) == (255, 255, 255)  # clamped


# ----------------------------------------------------------------------------------------------------------------
# text tokenizer

TEXTS = ["move the red square left", "push the blue circle up", "the green triangle falls down",
         "rotate the yellow square", "nothing happens"] * 20


def test_text_tokenizer_round_trip(tmp_path):
    tok = TextTokenizer.train(TEXTS, vocab_size=400, n_image_codes=64)
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.image_offset, tok.n_image_codes) == (0, 1, 2, 4, 64)
    assert (tok.eoi_id, tok.boi_id) == (68, 69)
    assert tok.vocab_size <= 400 and tok.vocab_size > 4 + 64 + 2 + 256
    for s in ["move the red square left", "Ünïcode ✓ and  double  spaces\n", "", " leading space"]:
        ids = tok.encode(s)
        assert all(not tok.is_image_id(i) and i not in (tok.bos_id, tok.eos_id) for i in ids)
        assert tok.decode(ids) == s
    codes = torch.tensor([[0, 5, 63]])
    ids = tok.image_ids(codes)
    assert ids.tolist() == [[4, 9, 67]] and torch.equal(tok.image_codes(ids), codes)
    assert tok.tok.id_to_token(9) == "IMGIMGFZ"
    with pytest.raises(ValueError):
        tok.image_ids(torch.tensor([64]))
    # decode drops specials and image tokens
    mixed = [tok.bos_id] + tok.encode("push") + [tok.boi_id, 10, 11, tok.eoi_id] + tok.encode(" up") + [tok.eos_id]
    assert tok.decode(mixed) == "push up"
    tok.save(tmp_path / "tok" / "tokenizer.json")
    tok2 = TextTokenizer.from_file(tmp_path / "tok" / "tokenizer.json")
    assert tok2.encode("push the blue circle up") == tok.encode("push the blue circle up")
    assert (tok2.boi_id, tok2.eoi_id, tok2.image_offset, tok2.vocab_size) == (69, 68, 4, tok.vocab_size)
    with pytest.raises(ValueError, match="vocab_size"):
        TextTokenizer.train(TEXTS, vocab_size=300, n_image_codes=64)


def test_image_token_names():
    assert image_token_name(0) == "IMGIMGAZ" and image_token_name(8191) == "IMGIMGIBJBZ"
    assert all(image_token_code(image_token_name(c)) == c for c in (0, 7, 10, 99, 8191))
    assert image_token_code("IMGIMGZ") is None and image_token_code("hello") is None
    assert image_token_code("IMGIMGAKZ") is None


def test_chameleon_layout_tokenizer_json(tmp_path):
    """A hand-built tokenizer.json in Chameleon's layout: <s> 0, <pad> 1, </s> 2, <unk> 3, 8192 image tokens at
    4..8195, <eoss> 8196, <racm3:break> 8197, then text tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    names = ["<s>", "<pad>", "</s>", "<unk>"] + [image_token_name(c) for c in range(8192)] + ["<eoss>",
                                                                                             "<racm3:break>"]
    vocab = {n: i for i, n in enumerate(names)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(n, special=True) for n in names])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    t = TextTokenizer.from_file(path)
    assert (t.image_offset, t.n_image_codes, t.boi_id, t.eoi_id, t.bos_id, t.pad_id, t.eos_id) == \
        (4, 8192, 8197, 8196, 0, 1, 2)
    assert t.image_ids(torch.tensor([0, 8191])).tolist() == [4, 8195]
    assert t.decode(t.encode("hi there")) == "hi there"


def test_text_tokenizer_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        TextTokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(ValueError, match="bad.json"):
        TextTokenizer.from_file(tmp_path / "bad.json")


def test_train_tokenizer_script_writes_both_tokenizers(tmp_path):
    """Stage 2 on its own (train_tokenizer.py): a VQGAN and a BPE trained on a world data folder, loadable as
    train.load_tokenizers loads reproduce.py's."""
    import train_tokenizer
    import world
    from train import load_tokenizers

    world.build(str(tmp_path / "data"), world.WorldConfig(n_train=14, n_val=7, n_test=7, n_comp=7, n_videos=2,
                                                          n_captions=10), log=lambda s: None)
    train_tokenizer.main([f"--data={tmp_path / 'data'}", f"--out={tmp_path / 'tok'}", "--vq_downsample=8",
                          "--vq_codes=16", "--vq_warmup=2", "--vq_steps=2", "--vq_batch=4", "--vq_images=8",
                          "--bpe_vocab=400"])
    image_tok, tok = load_tokenizers(str(tmp_path / "tok"))
    assert image_tok.cfg.grid == 4 and image_tok.cfg.num_embeddings == 16 and tok.n_image_codes == 16
    codes = image_tok.encode(torch.zeros(1, 3, 32, 32))
    assert codes.shape == (1, 16) and tok.is_image_id(int(tok.image_ids(codes)[0, 0]))
    assert tok.decode(tok.encode(" Edit: remove the red circle")) == " Edit: remove the red circle"
