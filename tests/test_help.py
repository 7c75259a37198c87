"""--help that helps: every user-facing flag of every script prints its explanation (the config field's comment,
common.field_help) and its allowed values; internal flags are hidden; a flag a script does not use is rejected."""

import importlib
import re

import pytest

SCRIPTS = ["train", "train_dynamics", "train_world", "train_tokenizer", "tokenizer", "bootstrap", "search", "eval",
           "world", "reproduce", "bench", "rehearse", "report"]


def help_text(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        importlib.import_module(name).main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def flag_blocks(text: str) -> dict[str, str]:
    """{flag: its help text} from argparse's output (an entry starts with two spaces and --)."""
    blocks, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (--\w+)( \S+)?\s*(.*)$", line)
        if m:
            name, blocks[m.group(1)] = m.group(1), m.group(3)
        elif name and line.startswith("   "):
            blocks[name] += " " + line.strip()
        else:
            name = None
    return blocks


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_explains_itself(name, capsys):
    blocks = flag_blocks(help_text(name, capsys))
    assert len(blocks) >= 2, name
    for flag, text in blocks.items():
        if flag == "--help":
            continue
        explanation = text.split("[")[0].strip()
        assert len(explanation) >= 8, f"{name}.py {flag}: no explanation in --help ({text!r})"
        assert "internal" not in explanation, f"{name}.py shows the internal flag {flag}"
        if flag != "--debug":
            assert re.search(r"\[(allowed: .*; )?(default: .*|required)\]$", text), f"{name}.py {flag}: {text!r}"


def test_allowed_values_are_shown(capsys):
    blocks = flag_blocks(help_text("train_world", capsys))
    assert "allowed: one of image, batch" in blocks["--weight_norm"]
    assert "allowed: 0..1" in blocks["--weight_mix"]
    assert "required" in blocks["--data"]


def test_flags_a_script_does_not_use_are_rejected(capsys):
    import train_dynamics
    import train_world

    for script, flag in [(train_dynamics, f) for f in ("--weighting=recognition", "--weight_mix=0.5",
                                                        "--weight_norm=image", "--task=wm", "--gen_share=0.1")] + [
            (train_world, "--texts=x.json"), (train_world, "--task=dm")]:
        with pytest.raises(SystemExit) as e:
            script.main([flag, "--data=x.json"])
        assert e.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


def test_train_py_default_task_is_its_own(tmp_path):
    from common import parse_config
    from train import WM_ONLY, TrainConfig

    cfg = parse_config(TrainConfig, ["--data=x.json"], defaults={"task": "pretrain"}, exclude=WM_ONLY)
    assert cfg.task == "pretrain"


def test_eq2_reading_has_one_source():
    """The scripts' default Eq. 2 reading is the one the main job validated (reproduce takes it from TrainConfig)."""
    from reproduce import ReproConfig
    from train import TrainConfig

    assert (ReproConfig().weight_norm, ReproConfig().weight_mix) == (TrainConfig().weight_norm,
                                                                    TrainConfig().weight_mix) == ("batch", 0.5)


def test_field_help_reads_continuation_lines():
    from common import field_help
    from reproduce import ReproConfig

    h = field_help(ReproConfig)
    assert h["jobs"].startswith("worker processes on a CPU") and h["jobs"].endswith("only the wall time does")
    assert "---" not in h["n_train"] and "the world" not in h["threads"][-40:]
