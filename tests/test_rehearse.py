"""rehearse.py: its flags, the GPU check's CPU dry run, the rehearsal's folder ownership, and (slow) the rehearsal
of every full-scale README command at the small size."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="rehearse.py builds its checkpoints with transformers")

import bench  # noqa: E402
import rehearse  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_arguments():
    for bad in (["--gpu_parts=a,d"], ["--part_limits=1,2"], ["--scaling=xx:1:2"], ["--scaling=dm:1"]):
        with pytest.raises(SystemExit):
            rehearse.parse_args(bad)
    args = rehearse.parse_args(["--gpu_check", "--device=cuda", "--dtype=bfloat16", "--out=/x/g.json"])
    parts = rehearse.gpu_check_parts(args, "/tmp/t")
    assert sorted(parts) == ["a", "b", "c"]
    assert sum(limit for _, _, limit in parts.values()) <= 450  # under 8 minutes with the processes' start-up
    a, b, c = (argv for argv, _, _ in parts.values())
    assert "--device=cuda" in a and "--dtype=bfloat16" in b and "--preset=chameleon-7b" in b and "--config=" in b
    for argv in (a, b):  # bench.py's own parser takes every flag it is given
        bench.parse_args(argv[1:])
    # part c's flags are reproduce.py's: its parser accepts them and they shorten the gpu preset
    import reproduce
    from train import parse_config

    cfg = parse_config(reproduce.ReproConfig, c[1:], defaults=reproduce.PRESETS["gpu"])
    assert (cfg.preset, cfg.device, cfg.n_layer, cfg.n_embd) == ("gpu", "cuda", 8, 512)
    assert cfg.ft_steps < reproduce.PRESETS["gpu"]["ft_steps"] and cfg.n_train < reproduce.PRESETS["gpu"]["n_train"]


def test_gpu_check_cpu_dry_run(tmp_path):
    """Parts a and b at micro size on the CPU write their numbers; a part that runs over its limit is killed and
    recorded, and the JSON still holds the others."""
    out = tmp_path / "g.json"
    rehearse.main(["--gpu_check", "--device=cpu", "--quick", "--threads=1", "--gpu_parts=a,b,c", f"--out={out}",
                "--part_limits=120,120,0.5"])
    saved = json.loads(out.read_text())
    a, b, c = (saved["parts"][k] for k in "abc")
    assert a["status"] == "ok" and a["results"]["train step (2x16)"]["tok_s_ours"] > 0
    assert a["results"]["best-of-2 (64 tok)"]["cost_vs_1_ours"] > 0
    assert b["status"] == "ok" and b["results"]["preset_tok_s"]["chameleon-7b"]["decode 64 b2"] > 0
    assert c["rc"] == "timeout" and c["status"].startswith("failed") and c["seconds"] < 10
    assert "decode 64 b2 tok/s" in saved["table_md"] and "| part c | failed" in saved["table_md"]


def test_refuses_a_folder_it_did_not_write(tmp_path):
    """A --dir that exists, is not empty and carries no marker is refused in one line before anything is deleted."""
    d = tmp_path / "mine"
    (d / "runs").mkdir(parents=True)
    (d / "runs" / "precious.txt").write_text("keep me")
    res = subprocess.run([sys.executable, str(ROOT / "rehearse.py"), f"--dir={d}", "--size=small"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "not written by worldboot" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and (d / "runs" / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_rehearsal_small(tmp_path):
    """Every full-scale README command, read out of README.md, runs against small Anole- and Liquid-layout
    checkpoints built with transformers."""
    out = tmp_path / "rehearsal.json"
    rec = rehearse.main(["--size=small", f"--dir={tmp_path / 'r'}", "--threads=1",
                         "--scaling=dm:1:200,wm:1:200:full,vq:2", f"--out={out}"])
    saved = json.loads(out.read_text())
    stages = ["build", "convert", "dm", "bootstrap", "wm", "search", "eval"]
    assert [(s["model"], s["stage"]) for s in saved["stages"]] == [(m, s) for m in ("anole", "liquid") for s in stages]
    assert all(s["rc"] == 0 and s["peak_rss_gib"] > 0 for s in saved["stages"])
    assert len(rec["stages"][2]["s_per_step"]) == 3 and len(saved["probes"]) == 6
    r = tmp_path / "r"
    for f in ("anole/model.safetensors.index.json", "liquid/model.safetensors.index.json",
              "liquid/vqgan_decoder.safetensors"):
        assert (r / f).exists()
    for m in ("anole", "liquid"):
        assert (r / "runs" / m / "search.png").exists()
        assert "all" in json.loads((r / "runs" / m / "eval" / "results.json").read_text())["wm"]
    assert json.loads((r / "runs/liquid/dm/ckpt/meta.json").read_text())["model_config"]["gemma_norm"]
