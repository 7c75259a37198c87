"""The method on Liquid (a Gemma-based base model) end to end: the README's full-scale commands, read out of README.md
as the rehearsal reads them, run in this process against a tiny random Liquid-shaped folder built with transformers
(no download): VQGAN conversion, DM and WM fine-tuning with LoRA (the WM with Eq. 2's weighting), bootstrap, search
and eval with --init=hf:liquid. Also: Liquid's preprocessing, its loading errors, and the README block's parser."""

import importlib
import json

import pytest
from PIL import Image

pytest.importorskip("transformers", reason="the Liquid-shaped checkpoint is built with transformers")

import rehearse  # noqa: E402
from common import UserError  # noqa: E402
from data import pad_square, preprocess_image  # noqa: E402
from tokenizer import LIQUID_PAD, ImageTokenizer, VQConfig  # noqa: E402
from train import load_tokenizers  # noqa: E402

VQ = VQConfig(embed_dim=8, num_embeddings=16, latent_channels=32, resolution=16, base_channels=32,
              channel_multiplier=(1, 2), num_res_blocks=1)


def test_method_on_liquid(tmp_path, monkeypatch):
    rehearse.rehearsal_data(str(tmp_path), 16)
    rehearse.build_liquid(tmp_path / "liquid", hidden=32, heads=4, kv_heads=1, head_dim=24, inner=48, n_text=300,
                          vq=VQ, shards=2)
    size = ["--image_size=16"]
    fit = [*size, "--epochs=0", "--steps=2", "--batch_size=2", "--grad_accum=1", "--quiet", "--eval_every=0"]
    overrides = dict(dm=fit, wm=fit, bootstrap=size, search=[*size, "--n=2"], eval=[*size, "--n=2"])
    commands = rehearse.readme_commands("liquid", overrides)
    assert [s for s, _ in commands] == ["convert", "dm", "bootstrap", "wm", "search", "eval"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JUDGE_BASE_URL", raising=False)
    for _, argv in commands:
        importlib.import_module(argv[0][:-3]).main(argv[1:])
    meta = json.loads((tmp_path / "runs/liquid/wm/ckpt/meta.json").read_text())
    c = meta["model_config"]
    assert (c["gemma_norm"], c["tie_embeddings"], c["head_size"], c["image_token_start"]) == (True, True, 24, 300)
    assert meta["lora"] and meta["train_config"]["weighting"] == "recognition"
    assert (tmp_path / "runs/liquid/search.png").exists() and json.loads((tmp_path / "runs/liquid/synthetic.json")
                                                                          .read_text())
    assert "all" in json.loads((tmp_path / "runs/liquid/eval/results.json").read_text())["wm"]
    image_tok, tok = load_tokenizers("liquid")  # Liquid's preprocessing and id layout reach every script
    assert image_tok.pad_colour == LIQUID_PAD and (tok.image_offset, tok.n_image_codes) == (300, 16)


def test_liquid_preprocessing_pads_to_a_square():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = pad_square(img, LIQUID_PAD)
    assert sq.size == (40, 40) and sq.getpixel((0, 0)) == LIQUID_PAD and sq.getpixel((20, 20)) == (255, 0, 0)
    assert [sq.getpixel((0, y)) for y in (9, 10, 29, 30)] == [LIQUID_PAD, (255, 0, 0), (255, 0, 0), LIQUID_PAD]
    x = preprocess_image(img, 16, pad=LIQUID_PAD)  # the whole image, not a centre crop
    assert x.shape == (3, 16, 16) and x[0, 0, 0] < x[0, 8, 8]


def test_liquid_folder_errors_name_the_file(tmp_path):
    rehearse.build_liquid(tmp_path, hidden=32, heads=2, kv_heads=2, head_dim=16, inner=48, n_text=300, vq=VQ)
    with pytest.raises(UserError, match="vqgan_decoder.safetensors"):  # no VQ model in a Liquid checkpoint
        ImageTokenizer.from_pretrained(tmp_path)
    vq = ImageTokenizer(VQ)
    vq.encoder = None  # a converted file without the encoder
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(tmp_path / "vqgan_decoder.safetensors"))
    with pytest.raises(UserError, match="vqgan_decoder.safetensors"):
        ImageTokenizer.from_pretrained(tmp_path, tmp_path / "vqgan_decoder.safetensors")
    (tmp_path / "tokenizer.json").write_text("{")
    from model import Chameleon
    with pytest.raises(ValueError, match="tokenizer.json"):
        Chameleon.from_pretrained(tmp_path)


def test_readme_block_parser(tmp_path):
    """The README's real block reads; a line the rehearsal does not understand is an error naming it."""
    assert len(rehearse.readme_commands("anole", {})) == 6
    readme = tmp_path / "README.md"
    head = "text\n<!-- full-scale: x -->\n```bash\nMODEL=anole\n"
    readme.write_text(head + "python eval.py \\\n  --wm=runs/$MODEL/wm --n=4\n```\n")
    assert rehearse.readme_commands("liquid", {"eval": ["--n=2"]}, str(readme)) == \
        [("eval", ["eval.py", "--wm=runs/liquid/wm", "--n=4", "--n=2"])]
    for bad, line in (("cp a b\n", 5), ("python nope.py --x=1\n", 5), ("python eval.py --x=$OTHER\n", 5),
                      ("python eval.py \\\n", 5)):
        readme.write_text(head + bad + "```\n")
        with pytest.raises(UserError, match=f"README.md:{line}"):
            rehearse.readme_commands("anole", {}, str(readme))
    readme.write_text("no block here\n")
    with pytest.raises(UserError, match="full-scale"):
        rehearse.readme_commands("anole", {}, str(readme))
