"""Nothing lost: readers never write, a folder is ours only by its marker, every script leaves a folder of user files
as it was, a checkpoint is bound to its tokenizer, a full disk is one line, text never becomes control ids."""

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import tiny_model
from test_bad_inputs import EVAL, ROOT, SEARCH, TRAIN, ws  # noqa: F401 (ws: the shared workspace fixture)


def tree_hash(*roots) -> str:
    """A hash of every name and every byte under the given paths (files or folders)."""
    h = hashlib.sha256()
    for root in roots:
        for d, dirs, files in sorted(os.walk(root)) if os.path.isdir(root) else [("", [], [root])]:
            dirs.sort()
            for f in sorted(files) + dirs:
                p = os.path.join(d, f)
                h.update(os.path.relpath(p, root).encode() + b"\0")
                if os.path.isfile(p):
                    h.update(open(p, "rb").read())
    return h.hexdigest()


def call(script, argv, monkeypatch) -> int:
    """script.main through common.run, as from the command line; the exit code (0 when it returned)."""
    from common import run

    monkeypatch.setattr(sys, "argv", [script + ".py", *argv])
    try:
        run(importlib.import_module(script).main)
    except SystemExit as e:
        return e.code
    return 0


def test_a_reader_leaves_old_and_tmp_byte_identical(ws, tmp_path, monkeypatch, capsys):  # noqa: F811
    """search, eval, bootstrap-style loading and --init read X; the user's X.old and X.tmp stay as they are (before:
    loading ran the crash recovery and deleted both)."""
    from checkpoint import load_model

    monkeypatch.chdir(tmp_path)
    x = tmp_path / "X"
    shutil.copytree(ws / "wm" / "ckpt", x)
    for name in ("X.old", "X.tmp"):  # the user's folders, one even holding a meta.json
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
        (tmp_path / name / "meta.json").write_text("{}")
    theirs = (tmp_path / "X.old", tmp_path / "X.tmp")
    before, before_theirs = tree_hash(*theirs, x), tree_hash(*theirs)
    fmt = lambda args: [a.format(ws=ws) for a in args]
    assert call("search", fmt([f"--wm={x}", *SEARCH[1:5], f"--out={tmp_path}/s.png"]), monkeypatch) == 0
    assert call("eval", fmt([f"--wm={x}", *EVAL[2:4], f"--out={tmp_path}/ev"]), monkeypatch) == 0
    load_model(str(x), role="wm")
    assert call("train_world", fmt(["--data={ws}/data/train.json", TRAIN[0], f"--init={x}", f"--out_dir={tmp_path}/r",
                                    "--batch_size=4", "--steps=1", "--quiet=true"]), monkeypatch) == 0
    assert tree_hash(*theirs, x) == before
    # with X gone, a user's X.old (no marker) is not taken for an interrupted save, nor renamed
    shutil.rmtree(x)
    assert call("search", fmt([f"--wm={x}", *SEARCH[1:5], f"--out={tmp_path}/s2.png"]), monkeypatch) == 2
    assert "no checkpoint here" in capsys.readouterr().err
    assert tree_hash(*theirs) == before_theirs
    assert (tmp_path / "X.old" / "notes.txt").read_text() == "mine" and not x.exists()


def user_folder(root):
    """A folder of a user's files, named as worldboot names its outputs."""
    u = root / "user"
    for rel, text in [("ckpt/meta.json", "{}"), ("ckpt/model.safetensors", "weights"), ("ckpt.old/a", "a"),
                      ("ckpt.tmp/b", "b"), ("vq/config.json", "{}"), ("metrics.jsonl", '{"step": 1}\n' * 100),
                      ("results.json", "{}"), ("results.json.tmp", "x"), ("items.jsonl", "{}\n"), ("samples.png", "p"),
                      ("search.png", "p"), ("synthetic.json", "[]"), ("vqgan.safetensors", "v"), ("train.json", "[]"),
                      ("tokenizer.json", "{}"), ("manifest.json", "{}"), ("stage_hash.txt", "h"), ("report.md", "r")]:
        (u / rel).parent.mkdir(parents=True, exist_ok=True)
        (u / rel).write_text(text)
    return u


def test_no_script_deletes_or_overwrites_a_users_files(ws, tmp_path, monkeypatch):  # noqa: F811
    """Every script, its outputs pointed at a folder of user files: each is refused, and the folder's hash is the
    same before and after (before: train_dynamics took the folder for its own and cut metrics.jsonl to 2 rows,
    eval.py replaced results.json, the VQGAN converter replaced its --out)."""
    monkeypatch.chdir(tmp_path)
    u = user_folder(tmp_path)
    (tmp_path / "caps.json").write_text(json.dumps([{"image": f"{ws}/data/img/{i}_in.png", "caption": "a red circle"}
                                                    for i in range(8)]))
    for name in ("train", "val", "captions"):  # what train_tokenizer.py checks for in a world.py folder
        (tmp_path / "world" / f"{name}.json").parent.mkdir(exist_ok=True)
        (tmp_path / "world" / f"{name}.json").write_text("[]")
    data = f"--data={ws}/data/train.json"
    train = [a.format(ws=ws) for a in TRAIN[:2]] + ["--batch_size=4", "--steps=2", "--quiet=true"]
    runs = [
        ("train_dynamics", [data, *train, f"--out_dir={u}"]),
        ("train_world", [data, *train, f"--out_dir={u}"]),
        ("train", ["--task=pretrain", f"--data={tmp_path}/caps.json", *train, f"--out_dir={u}"]),
        ("train_tokenizer", [f"--data={tmp_path}/world", f"--out={u}"]),
        ("world", [f"--out={u}"]),
        ("eval", [*[a.format(ws=ws) for a in EVAL[:4]], f"--out={u}"]),
        ("eval", ["--task=dm", *[a.format(ws=ws) for a in EVAL[1:4]], f"--out={u}"]),
        ("search", [*[a.format(ws=ws) for a in SEARCH[:5]], f"--out={u}/search.png"]),
        ("bootstrap", [f"--dm={ws}/dm/ckpt", f"--tokenizer_dir={ws}/tok", f"--videos={ws}/data",
                       f"--out={u}/synthetic.json"]),
        ("tokenizer", [f"--ckpt={ws}/vqgan.ckpt", f"--out={u}/vqgan.safetensors"]),
        ("reproduce", ["--preset=smoke", f"--out={u}"]),
    ]
    before = tree_hash(u)
    for script, argv in runs:
        code = call(script, argv, monkeypatch)
        assert tree_hash(u) == before, (script, argv)
        assert code not in (0, None), (script, argv)  # refused, not silently done elsewhere


def test_a_checkpoint_is_bound_to_its_tokenizer(tiny_tok, tmp_path, capsys):
    from checkpoint import load_model, save_checkpoint
    from common import UserError
    from tokenizer import TextTokenizer
    from train import TrainConfig

    other = TextTokenizer.train(["another corpus entirely"] * 4, vocab_size=300, n_image_codes=16)
    model = tiny_model(tiny_tok)
    save_checkpoint(str(tmp_path / "new"), model, TrainConfig(task="wm", data="-"), model.config, tok=tiny_tok)
    load_model(str(tmp_path / "new"), tok=tiny_tok)
    with pytest.raises(UserError, match=rf"another tokenizer \({tiny_tok.vocab_size} ids.*\({other.vocab_size} ids"):
        load_model(str(tmp_path / "new"), tok=other)
    # a checkpoint from before fingerprints: loads, with one line saying it was not checked
    save_checkpoint(str(tmp_path / "old"), model, TrainConfig(task="wm", data="-"), model.config)
    capsys.readouterr()
    load_model(str(tmp_path / "old"), tok=tiny_tok)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records no tokenizer fingerprint" in err


def test_resume_without_a_checkpoint_says_so(tiny_tok, tmp_path, capsys):
    from test_kill_save import cfg, examples

    from train import train

    train(cfg(tmp_path / "typo", resume=True, steps=1, quiet=False), examples(tiny_tok), tiny_tok,
          model=tiny_model(tiny_tok))
    assert "--resume=true, but" in capsys.readouterr().out  # (before: silently from step 0)


def test_a_full_disk_during_a_save_is_one_line_naming_the_file_and_keeps_the_checkpoint(tiny_tok, tmp_path, capsys,
                                                                                      monkeypatch):
    from safetensors import SafetensorError

    import checkpoint
    from common import run
    from train import TrainConfig

    model = tiny_model(tiny_tok)
    save = lambda: checkpoint.save_checkpoint(str(tmp_path / "ckpt"), model, TrainConfig(task="wm", data="-"),
                                              model.config, step=1, tok=tiny_tok)
    save()
    before = tree_hash(tmp_path / "ckpt")

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')

    monkeypatch.setattr(checkpoint, "save_file", full)
    monkeypatch.delenv("WORLDBOOT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        run(save)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "ckpt.tmp/model.safetensors" in err
    assert "No space left on device" in err
    assert tree_hash(tmp_path / "ckpt") == before and not (tmp_path / "ckpt.tmp").exists()


def test_text_that_spells_a_special_token_is_text(tiny_tok):
    text = "<s> move </s> <racm3:break> IMGIMGAZ <eoss> <pad>"
    ids = tiny_tok.encode(text)
    assert not set(ids) & tiny_tok.special_ids and not any(tiny_tok.is_image_id(i) for i in ids)
    assert tiny_tok.decode(ids) == text


def test_bench_uses_the_error_handler(ws):  # noqa: F811
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--config=", f"--results={ws}/foreign"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT, WORLDBOOT_DEBUG="0"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "foreign" in r.stderr, r.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_no_space_left_names_the_file():
    from common import append_line

    with pytest.raises(OSError, match="No space left on device: /dev/full"):  # (before: the metrics row named none)
        append_line("/dev/full", "{}")
