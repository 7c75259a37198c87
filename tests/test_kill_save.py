"""A training process SIGKILLed at any point inside a checkpoint save resumes to bit-identical weights."""

import json
import os
import shutil
import signal

import pytest
import torch
from conftest import ACTIONS, tiny_model

import checkpoint as checkpoint_mod
from checkpoint import load_model
from train import TrainConfig, train
from train_dynamics import dm_example


def cfg(out, **kw):
    return TrainConfig(**{**dict(task="dm", data="-", out_dir=str(out), steps=4, batch_size=4, lr=3e-3, warmup=1,
                                 eval_every=0, save_every=2, quiet=True, seed=0), **kw})


def examples(tok):
    g = torch.Generator().manual_seed(0)
    return [dm_example(tok, torch.randint(0, 16, (4,), generator=g), torch.randint(0, 16, (4,), generator=g),
                       ACTIONS[i % 6]) for i in range(8)]


def run_and_kill_at(n: int, out, tok, ex) -> bool:
    """Train in a forked child that SIGKILLs itself at the n-th file-system event of the run (a file written, an
    fsync, a rename, a deletion); True when it was killed (False: the run had fewer events and finished)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        count = [0]

        def event(f):
            def wrapped(*a, **k):
                r = f(*a, **k)
                count[0] += 1
                if count[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                return r
            return wrapped

        try:
            checkpoint_mod.save_file = event(checkpoint_mod.save_file)  # a weights file written (not yet fsynced)
            os.fsync, os.replace = event(os.fsync), event(os.replace)  # a file (or folder) made durable; replaced
            os.rename, shutil.rmtree = event(os.rename), event(shutil.rmtree)  # the folder swap
            train(cfg(out), ex, tok, model=tiny_model(tok))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_inside_save_resumes_bit_identical(tiny_tok, tmp_path):
    tok, ex = tiny_tok, examples(tiny_tok)
    ref, _ = train(cfg(tmp_path / "ref"), ex, tok, model=tiny_model(tok))
    killed_at = []
    for n in range(1, 40):
        out = tmp_path / f"kill{n}"
        if not run_and_kill_at(n, out, tok, ex):
            break  # past the last event: every point of both saves was tried
        killed_at.append(n)
        saved = any(os.path.exists(out / d / "meta.json") for d in ("ckpt", "ckpt.old"))
        # from a checkpoint, the starting model's weights must not matter; without one, the run starts over
        model, _ = train(cfg(out, resume=True), ex, tok, model=tiny_model(tok, seed=99 if saved else 0))
        for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), (n, k)
        assert torch.equal(load_model(str(out / "ckpt"))[0].lm_head.weight, ref.lm_head.weight), n
        steps = [json.loads(r)["step"] for r in open(out / "metrics.jsonl")]
        assert steps == [1, 2, 3, 4], (n, steps)  # no step repeated after the resume
        assert not os.path.exists(out / "ckpt.old") and not os.path.exists(out / "ckpt.tmp"), n
        shutil.rmtree(out)
    assert len(killed_at) >= 28, killed_at  # per save: 3 files written, 4 file + 1 folder fsyncs, 2 renames, 2
    # deletions; plus the folder marker and the metrics rewrite


def test_a_finished_run_is_not_replaced_and_changed_settings_are_listed(tiny_tok, tmp_path):
    from common import UserError

    tok, ex = tiny_tok, examples(tiny_tok)
    train(cfg(tmp_path), ex, tok, model=tiny_model(tok))
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="--resume=true continues it"):
        train(cfg(tmp_path), ex, tok, model=tiny_model(tok))
    with pytest.raises(UserError, match=r"batch_size 4 -> 8; lr 0.003 -> 0.01"):
        t = cfg(tmp_path, resume=True)
        t.lr, t.batch_size = 0.01, 8
        train(t, ex, tok, model=tiny_model(tok))
    with pytest.raises(UserError, match="task 'dm' -> 'wm'"):
        t = cfg(tmp_path, resume=True)
        t.task = "wm"  # a DM folder resumed as a WM
        train(t, ex, tok, model=tiny_model(tok))
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    train(cfg(tmp_path, force=True), ex, tok, model=tiny_model(tok))  # explicitly: start over
    assert [json.loads(r)["step"] for r in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_an_error_in_the_last_evaluation_still_saves(tiny_tok, tmp_path):
    tok, ex = tiny_tok, examples(tiny_tok)

    def broken(model, step):
        raise RuntimeError("judge crashed")

    with pytest.raises(RuntimeError, match="judge crashed"):
        train(cfg(tmp_path, save_every=0), ex, tok, val_examples=ex, evaluate=broken, model=tiny_model(tok))
    assert json.load(open(tmp_path / "ckpt" / "meta.json"))["step"] == 4


def test_ctrl_c_saves_at_the_next_step_and_stops(tiny_tok, tmp_path):
    tok, ex = tiny_tok, examples(tiny_tok)

    def press_ctrl_c(model, step):
        os.kill(os.getpid(), signal.SIGINT)
        return {}

    # as from a terminal: a runner started in the background (`cmd &` in a script) inherits SIGINT ignored, and then
    # training rightly leaves Ctrl-C alone (common.py)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt, match="stopped after step 1"):
            train(cfg(tmp_path, eval_every=1, save_every=0), ex, tok, val_examples=ex, evaluate=press_ctrl_c,
                  model=tiny_model(tok))
    finally:
        signal.signal(signal.SIGINT, before)
    assert json.load(open(tmp_path / "ckpt" / "meta.json"))["step"] == 1


def fork(fn) -> int:
    """Run fn() in a forked child (a signal that ends the process ends only the child); its PID. The child exits 0
    when fn returns, 130 on KeyboardInterrupt, 2 on a UserError, 1 on another error."""
    from common import UserError, release_locks

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except KeyboardInterrupt:
            code = 130
        except UserError:
            code = 2
        finally:
            release_locks()  # what the end of a process does (os._exit skips it)
            os._exit(code)
    return pid


def exit_code(pid: int) -> int:
    """The exit code of a forked child; -N when signal N ended it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_save_at_the_next_step_and_stop(tiny_tok, tmp_path, sig):
    """What `kill`, `timeout`, `docker stop` and SLURM send: saved like Ctrl-C, not lost."""
    tok, ex = tiny_tok, examples(tiny_tok)

    def send(model, step):
        os.kill(os.getpid(), getattr(signal, sig))
        return {}

    def child():  # the signal at its default, as in a terminal (under nohup, say, SIGHUP starts ignored and stays so)
        signal.signal(getattr(signal, sig), signal.SIG_DFL)
        train(cfg(tmp_path, eval_every=1, save_every=0), ex, tok, val_examples=ex, evaluate=send, model=tiny_model(tok))

    code = exit_code(fork(child))
    assert code == 130, code  # (before: killed by the signal, -15 / -1, nothing saved)
    assert json.load(open(tmp_path / "ckpt" / "meta.json"))["step"] == 1
    model, _ = train(cfg(tmp_path, resume=True), ex, tok, model=tiny_model(tok, seed=99))
    ref, _ = train(cfg(tmp_path / "ref"), ex, tok, model=tiny_model(tok))
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)  # resumed = uninterrupted


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_two_writers_on_one_folder_one_is_refused_naming_the_other(tiny_tok, tmp_path, capsys):
    import subprocess
    import sys
    import time

    from common import UserError

    tok, ex = tiny_tok, examples(tiny_tok)

    def slow(model, step):
        time.sleep(0.3)  # both runs are in their loops at the same time
        return {}

    errors = tmp_path.parent / f"{tmp_path.name}.err"  # what the refused run said (outside the folder compared)

    def race():
        try:
            train(cfg(tmp_path, eval_every=1), ex, tok, val_examples=ex, evaluate=slow, model=tiny_model(tok))
        except UserError as e:
            errors.write_text(str(e))
            raise

    pids = [fork(race) for _ in range(2)]
    codes = sorted(exit_code(p) for p in pids)
    assert "being written by another run (PID" in errors.read_text()
    assert codes == [0, 2], codes  # one ran, the other was refused naming the holder's PID
    assert [json.loads(r)["step"] for r in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]  # not interleaved
    assert not os.path.exists(tmp_path / ".worldboot.lock")  # released when the run ended

    # a holder that stays: refused up front, naming it; once it is killed, its lock is stale and taken over
    out = tmp_path / "held"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {root!r}); import common; "
                               f"common.claim_dir({str(out)!r}, 'holder'); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            train(cfg(out), ex, tok, model=tiny_model(tok))
    finally:
        holder.kill()
        holder.wait()
    train(cfg(out), ex, tok, model=tiny_model(tok))
    assert f"stale lock of PID {holder.pid}" in capsys.readouterr().err
