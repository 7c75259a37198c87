"""Bad inputs, as a demanding user gives them: each must end with a non-zero exit and one or two lines that name the
culprit (flag, file or item), no traceback, and nothing written or deleted (the whole workspace is compared)."""

import dataclasses
import importlib
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = "move the red circle " + "very " * 300 + "far left"


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_tok):
    """A workspace: tokenizers, a tiny labelled data set, DM and WM checkpoints, and broken variants of each."""
    from safetensors.torch import load_file, save_file

    from checkpoint import save_checkpoint
    from common import MARKER
    from model import Chameleon, ChameleonConfig
    from tokenizer import ImageTokenizer, TextTokenizer, VQConfig
    from train import TrainConfig

    w = tmp_path_factory.mktemp("ws")
    tok = w / "tok"
    ImageTokenizer(dataclasses.replace(VQConfig.world(), num_embeddings=16)).save(tok / "vq")
    tiny_tok.save(tok / "tokenizer.json")
    (w / "data" / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(8):
        for s in ("in", "out"):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(w / f"data/img/{i}_{s}.png")
        items.append(dict(id=f"it{i}", input=f"img/{i}_in.png", output=f"img/{i}_out.png", task="t",
                          instruction="remove the blue square"))
    write = lambda name, obj: (w / "data" / name).write_text(json.dumps(obj))
    write("train.json", items)
    write("empty.json", [])
    write("genonly.json", [{k: v for k, v in it.items() if k != "output"} for it in items])
    write("dict.json", {"items": items})
    write("badoutput.json", [dict(items[0], output=5)])
    write("long.json", [dict(it, instruction=LONG) if i == 3 else it for i, it in enumerate(items)])
    write("surrogate.json", [dict(items[0], instruction="\ud800")])  # json.dumps writes it as the escape \ud800
    latin1 = json.dumps([dict(items[0], instruction="caf\u00e9")], ensure_ascii=False).encode("latin-1")
    (w / "data" / "latin1.json").write_bytes(latin1)
    png = lambda typ, data: struct.pack(">I", len(data)) + typ + data + struct.pack(">I", zlib.crc32(typ + data))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)  # 900 M pixels: PIL refuses to decode it
    (w / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png(b"IHDR", header) + png(b"IEND", b""))
    torch.manual_seed(0)
    mcfg = ChameleonConfig.preset("tiny", vocab_size=tiny_tok.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=1,
                                  n_inner=64, max_seq_len=256, image_token_start=tiny_tok.image_offset,
                                  image_token_end=tiny_tok.image_offset + 16)
    for role in ("dm", "wm"):
        (w / role).mkdir()
        (w / role / MARKER).write_text("written by worldboot (train_dynamics.py)\n")  # as a training run leaves it
        save_checkpoint(str(w / role / "ckpt"), Chameleon(mcfg), TrainConfig(task=role, data="-"), mcfg, step=1,
                        tok=tiny_tok)
    for name in ("nometa", "trunc"):
        save_checkpoint(str(w / name), Chameleon(mcfg), TrainConfig(task="wm", data="-"), mcfg, step=1, tok=tiny_tok)
    meta = json.loads((w / "nometa" / "meta.json").read_text())
    del meta["model_config"]
    (w / "nometa" / "meta.json").write_text(json.dumps(meta))
    with open(w / "trunc" / "model.safetensors", "r+b") as f:
        f.truncate(200)
    (w / "badtok" / "vq").mkdir(parents=True)
    for f in ("vq/config.json", "tokenizer.json"):
        (w / "badtok" / f).write_bytes((tok / f).read_bytes())
    (w / "badtok" / "vq" / "model.safetensors").write_bytes((tok / "vq" / "model.safetensors").read_bytes()[:300])
    (w / "hfbad").mkdir()
    (w / "hfbad" / "tokenizer.json").write_bytes((tok / "tokenizer.json").read_bytes())
    (w / "hfbad" / "config.json").write_text('{"vq_config": {"embed_dim": 256,}')
    for name, change in (("heads0", dict(n_head=0)), ("heads7", dict(n_head=7)), ("strwidth", dict(n_embd="32"))):
        save_checkpoint(str(w / name), Chameleon(mcfg), TrainConfig(task="wm", data="-"), mcfg, step=1, tok=tiny_tok)
        meta = json.loads((w / name / "meta.json").read_text())
        meta["model_config"].update(change)  # tampered by hand
        (w / name / "meta.json").write_text(json.dumps(meta))
    for name, bad in (("nanw", lambda t: torch.full_like(t, float("nan"))), ("int8w", lambda t: t.to(torch.int8))):
        save_checkpoint(str(w / name), Chameleon(mcfg), TrainConfig(task="wm", data="-"), mcfg, step=1, tok=tiny_tok)
        state = load_file(w / name / "model.safetensors")
        state["lm_head.weight"] = bad(state["lm_head.weight"])
        save_file(state, w / name / "model.safetensors", metadata={"step": "1"})
    (w / "truncjson" / "vq").mkdir(parents=True)  # a tokenizer.json cut short
    for f in ("vq/config.json", "vq/model.safetensors"):
        (w / "truncjson" / f).write_bytes((tok / f).read_bytes())
    (w / "truncjson" / "tokenizer.json").write_bytes((tok / "tokenizer.json").read_bytes()[:500])
    (w / "othertok" / "vq").mkdir(parents=True)  # the same image tokenizer, another text tokenizer
    for f in ("vq/config.json", "vq/model.safetensors"):
        (w / "othertok" / f).write_bytes((tok / f).read_bytes())
    TextTokenizer.train(["a quite different corpus of words"] * 4, vocab_size=300, n_image_codes=16).save(
        w / "othertok" / "tokenizer.json")
    Image.new("RGB", (1, 1_000_000)).save(w / "tall.png")  # 1 x 1,000,000 pixels: a resize to 32 px would make 1 G
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}}, w / "vqgan.ckpt")
    (w / "foreign").mkdir()
    (w / "userout").mkdir()
    (w / "userout" / "results.json").write_text('{"mine": 1}')
    (w / "foreign" / "notes.txt").write_text("mine")
    (w / "aurora" / "images").mkdir(parents=True)
    (w / "aurora" / "train.json").write_text("[]")
    (w / "aurora" / "images" / "a.png").write_bytes(b"x")
    (w / "cwd").mkdir()
    return w


def snapshot(root):
    return {os.path.relpath(os.path.join(d, f), root): (os.path.getsize(os.path.join(d, f)),
                                                        os.path.getmtime(os.path.join(d, f)))
            for d, dirs, files in os.walk(root) for f in files + [x for x in dirs]}


TRAIN = ["--tokenizer_dir={ws}/tok", "--init={ws}/dm/ckpt", "--out_dir={ws}/cwd/run", "--batch_size=4", "--quiet=true"]
SEARCH = ["--wm={ws}/wm/ckpt", "--dm={ws}/dm/ckpt", "--tokenizer_dir={ws}/tok", "--image={ws}/data/img/0_in.png",
          "--action=remove the blue square", "--out={ws}/cwd/s.png"]
EVAL = ["--wm={ws}/wm/ckpt", "--dm={ws}/dm/ckpt", "--tokenizer_dir={ws}/tok", "--data={ws}/data/train.json",
        "--out={ws}/cwd/eval"]
DATA = "--data={ws}/data/train.json"
CASES = [  # (script, argv, text the message must contain)
    # flags: range, type, choices, abbreviations
    ("train_dynamics", [DATA, *TRAIN, "--steps=0"], "--steps"),
    ("train_dynamics", [DATA, *TRAIN, "--grad_accum=0"], "--grad_accum"),
    ("train_dynamics", [DATA, *TRAIN, "--batch_size=0"], "--batch_size"),
    ("train_dynamics", [DATA, *TRAIN, "--ste=5"], "--ste"),
    ("train_dynamics", [DATA, *TRAIN, "--lr=nan"], "--lr"),
    ("train_dynamics", [DATA, *TRAIN, "--lr=inf"], "--lr"),
    ("train_dynamics", [DATA, *TRAIN, "--resume=maybe"], "--resume"),
    ("train_dynamics", [DATA, *TRAIN, "--lora_r=4", "--lora_targets=qproj"], "--lora_targets"),
    ("train_world", [DATA, *TRAIN, "--lora_r=-1"], "--lora_r"),
    ("train_world", [DATA, *TRAIN, "--save_every=-1"], "--save_every"),
    ("train_world", [DATA, *TRAIN, "--dtype=fp8"], "--dtype"),
    ("train_world", [DATA, *TRAIN, "--weight_mix=-0.5"], "--weight_mix"),
    ("train_world", [DATA, *TRAIN, "--weight_norm=token"], "--weight_norm"),
    ("train", [DATA, *TRAIN, "--task=bogus"], "--task"),
    ("train_dynamics", [DATA, *TRAIN, "--image_size=16"], "--image_size=16"),
    ("search", SEARCH + ["--n=0"], "--n"),
    ("search", SEARCH + ["--n=100000"], "--n"),
    ("search", SEARCH + ["--temperature=-1"], "--temperature"),
    ("search", SEARCH + ["--cfg_scale=-2"], "--cfg_scale"),
    ("search", SEARCH + ["--action=   "], "--action"),
    ("eval", EVAL + ["--n=0"], "--n"),
    ("eval", EVAL + ["--task=bogus"], "--task"),
    ("eval", EVAL + ["--wm="], "--wm"),
    ("bootstrap", ["--dm={ws}/dm/ckpt", "--k=0"], "--k"),
    ("reproduce", ["--out={ws}/cwd/r", "--device=tpu"], "--device"),
    ("reproduce", ["--out={ws}/cwd/r", "--preset=huge"], "--preset"),
    ("reproduce", ["--out={ws}/cwd/r", "--search_n=0,2"], "--search_n"),
    ("reproduce", ["--out={ws}/cwd/r", "--replicates=0"], "--replicates"),
    ("reproduce", ["--out={ws}/cwd/r", "--nuisance=2"], "--nuisance"),
    ("reproduce", ["--out={ws}/cwd/r", "--eq2_select=image:0.5,batch"], "--eq2_select"),
    ("world", ["--out={ws}/cwd/w", "--n_train=-1"], "--n_train"),
    ("tokenizer", ["--out={ws}/cwd/x.safetensors"], "--ckpt"),
    # data
    ("train_dynamics", ["--data={ws}/data/empty.json", *TRAIN], "empty.json"),
    ("train_dynamics", ["--data={ws}/data/genonly.json", *TRAIN], "genonly.json"),
    ("train_dynamics", ["--data={ws}/data/dict.json", *TRAIN], "dict.json: expected a JSON list"),
    ("train_dynamics", ["--data={ws}/data/latin1.json", *TRAIN], "latin1.json: not UTF-8"),
    ("train_dynamics", ["--data={ws}/data/surrogate.json", *TRAIN], "lone surrogate"),
    ("train_dynamics", ["--data={ws}/data/badoutput.json", *TRAIN], "field 'output'"),
    ("train_dynamics", ["--data={ws}/data/long.json", *TRAIN], "item it3"),
    ("train", ["--task=pretrain", "--data={ws}/data/dict.json", *TRAIN], "dict.json"),
    ("search", [*SEARCH[:3], "--image={ws}/bomb.png", *SEARCH[4:]], "bomb.png"),
    ("search", [*SEARCH[:4], f"--action={LONG}", SEARCH[5]], "action 'move the red circle very"),
    ("eval", [*EVAL[:4], "--out={ws}/foreign"], "not written by worldboot"),
    # checkpoints and tokenizers
    ("search", ["--wm={ws}/dm/ckpt", *SEARCH[1:]], "a dm checkpoint, used here as the wm"),
    ("search", [SEARCH[0], "--dm={ws}/wm/ckpt", *SEARCH[2:]], "a wm checkpoint, used here as the dm"),
    ("search", SEARCH + ["--image_size=48"], "--image_size=48"),
    ("search", ["--wm={ws}/nometa", *SEARCH[1:]], "model_config"),
    ("search", ["--wm={ws}/trunc", *SEARCH[1:]], "trunc/model.safetensors"),
    ("search", ["--wm={ws}/nowhere", *SEARCH[1:]], "nowhere"),
    ("search", [*SEARCH[:2], "--tokenizer_dir={ws}/badtok", *SEARCH[3:]], "badtok/vq/model.safetensors"),
    ("search", [*SEARCH[:2], "--tokenizer_dir={ws}/hfbad", *SEARCH[3:]], "hfbad/config.json"),
    # folders that are not ours, finished runs
    ("world", ["--out={ws}/aurora"], "not written by worldboot"),
    ("reproduce", ["--preset=smoke", "--out={ws}/foreign"], "not written by worldboot"),
    ("train_dynamics", [DATA, *TRAIN[:2], "--out_dir={ws}/foreign", "--batch_size=4"], "not written by worldboot"),
    ("train_dynamics", [DATA, *TRAIN[:2], "--out_dir={ws}/dm", "--batch_size=4"], "holds a checkpoint"),
    ("eval", [*EVAL[:4], "--out={ws}/userout"], "not written by worldboot"),  # a folder holding results.json
    ("tokenizer", ["--ckpt={ws}/vqgan.ckpt", "--out={ws}/data/train.json"], "train.json exists"),
    # tampered checkpoints, tokenizers that do not match, values that used to load silently
    ("search", ["--wm={ws}/heads0", *SEARCH[1:]], "n_head must be > 0"),
    ("search", ["--wm={ws}/heads7", *SEARCH[1:]], "n_head 7"),
    ("search", ["--wm={ws}/strwidth", *SEARCH[1:]], "n_embd must be int"),
    ("search", ["--wm={ws}/nanw", *SEARCH[1:]], "lm_head.weight holds NaN"),
    ("search", ["--wm={ws}/int8w", *SEARCH[1:]], "lm_head.weight holds torch.int8"),
    ("search", [*SEARCH[:2], "--tokenizer_dir={ws}/truncjson", *SEARCH[3:]], "truncjson/tokenizer.json"),
    ("search", [*SEARCH[:2], "--tokenizer_dir={ws}/othertok", *SEARCH[3:]], "trained with another tokenizer"),
    ("eval", [*EVAL[:2], "--tokenizer_dir={ws}/othertok", *EVAL[3:]], "othertok/tokenizer.json"),
    # sizes checked before anything is allocated, outputs before any long work
    ("train_dynamics", ["--data=/dev/zero", *TRAIN], "/dev/zero: not a regular file"),
    ("search", [*SEARCH[:3], "--image={ws}/tall.png", *SEARCH[4:]], "tall.png: 1 x 1000000 pixels"),
    ("train_dynamics", [DATA, *TRAIN[:1], "--init=scratch", *TRAIN[2:], "--n_embd=100000"], "--n_embd=100000"),
    ("search", [*SEARCH[:5], "--out={ws}/cwd/x.txt"], "x.txt: must end with .png"),
    ("train_tokenizer", ["--data={ws}/cwd", "--out={ws}/cwd/tok"], "train.json missing"),
    # single output files that exist (a user's file must not be replaced without --force)
    ("bootstrap", ["--dm={ws}/dm/ckpt", "--out={ws}/data/train.json"], "train.json exists"),
    ("search", [*SEARCH[:5], "--out={ws}/data/train.json"], "train.json exists"),
]


@pytest.mark.parametrize("script,argv,culprit", CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_bad_input_is_one_clear_error_and_changes_nothing(ws, script, argv, culprit, capsys, monkeypatch):
    from common import run

    monkeypatch.chdir(ws / "cwd")
    monkeypatch.delenv("WORLDBOOT_DEBUG", raising=False)
    argv = [a.format(ws=ws) for a in argv]
    monkeypatch.setattr(sys, "argv", [script + ".py", *argv])
    before = snapshot(ws)
    with pytest.raises(SystemExit) as e:
        run(importlib.import_module(script).main)
    err = capsys.readouterr().err
    assert e.value.code not in (0, None), err
    assert culprit in err, err
    assert "Traceback" not in err
    assert len([x for x in err.splitlines() if not x.startswith("warning: skipped")]) <= 2, err
    assert snapshot(ws) == before


def test_scripts_print_one_line_without_traceback_and_debug_shows_it(ws):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "world.py"), f"--out={ws}/aurora"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not written by worldboot" in r.stderr
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, WORLDBOOT_DEBUG="1"))
    assert r.returncode != 0 and "Traceback" in r.stderr
    assert sorted(os.listdir(ws / "aurora")) == ["images", "train.json"]


def test_16_bit_png_keeps_its_grey_level(tmp_path):
    from data import preprocess_image

    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(path)  # 50% grey in 16 bits
    assert Image.open(path).mode.startswith("I")
    x = preprocess_image(path, 8)
    assert abs(float(x.mean()) - (128 * 0.0078 - 1)) < 0.01  # not white (0.99)


def test_item_whose_image_is_under_another_root_is_reported(tmp_path, capsys):
    from data import load_benchmark

    sub = tmp_path / "sub"
    (sub / "images").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    for p in ("sub/a.png", "sub/images/b.png", "images/b.png"):  # images/b.png exists under both roots
        Image.new("RGB", (4, 4)).save(tmp_path / p)
    (sub / "t.json").write_text(json.dumps([{"input": "sub/a.png", "instruction": "x"},
                                            {"input": "images/b.png", "instruction": "y"}]))
    items = load_benchmark(sub / "t.json")  # the first item puts the root at tmp_path
    assert [it.id for it in items] == ["item-0"] and "ambiguous image root" in capsys.readouterr().err


def test_eval_generates_items_without_output_and_scores_none(ws, monkeypatch, capsys):
    """The README's promise: items without `output` are generated, not scored (no crash on an empty baseline)."""
    import eval as eval_mod

    monkeypatch.chdir(ws / "cwd")
    out = ws / "cwd" / "gen_eval"
    eval_mod.main([f"--wm={ws}/wm/ckpt", f"--tokenizer_dir={ws}/tok", f"--data={ws}/data/genonly.json",
                   f"--out={out}"])
    res = json.loads((out / "results.json").read_text())
    assert res["baselines"] == {} and res["wm"]["all"]["n"] == 8 and "l1" not in res["wm"]["all"]
    assert (out / "samples.png").exists()
