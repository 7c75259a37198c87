"""eval.py and metrics.py on a written mini world benchmark: baselines through the judge, the LLM-judge switch,
draw.py's grids."""

import pytest
import torch
from PIL import Image

import world
from data import load_items, preprocess_image, to_pil
from draw import save_grid
from eval import score_by_task
from metrics import item_scores, judge_items, llm_judge_config


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    cfg = world.WorldConfig(n_train=14, n_val=7, n_test=14, n_comp=7, n_videos=3, n_captions=10)
    paths = world.build(str(out), cfg, log=lambda s: None)
    return paths


def test_copy_source_scores_zero_and_truth_ten(mini):
    items = load_items(mini["test"]) + load_items(mini["test_comp"])
    copy = torch.stack([preprocess_image(it.input_path, 32) for it in items])
    truth = torch.stack([preprocess_image(it.output_path, 32) for it in items])
    c, t = judge_items(item_scores(items, copy)), judge_items(item_scores(items, truth))
    assert c["success"] == 0 and c["score"] == 0 and c["l1"] > 0
    assert t["success"] == 10 and t["minimal"] == 10 and t["l1"] == 0
    by_task = score_by_task(items, truth)
    assert set(by_task) == {"world", "world_comp", "all"} and by_task["world_comp"]["n"] == 7


def test_llm_judge_needs_its_environment(monkeypatch, capsys):
    for k in ("JUDGE_BASE_URL", "JUDGE_MODEL", "JUDGE_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    assert llm_judge_config() is None
    assert "JUDGE_API_KEY" in capsys.readouterr().out
    monkeypatch.setenv("JUDGE_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("JUDGE_MODEL", "m")
    monkeypatch.setenv("JUDGE_API_KEY", "k")
    assert llm_judge_config() == ("http://127.0.0.1:9/v1", "m", "k")


def test_save_grid_places_enlarged_images_under_their_titles(tmp_path, mini):
    items = load_items(mini["test"])[:2]
    rows = [[preprocess_image(it.input_path, 32), preprocess_image(it.output_path, 32)] for it in items]
    path = tmp_path / "g.png"
    save_grid(rows, [["a", "b"]] * 2, str(path), title="t", row_titles=[it.instruction for it in items])
    img = Image.open(path)
    # 32 px images are enlarged 4x to 128; pad 4, title 18, row title 14, caption 14
    assert img.size == (4 + 2 * (128 + 4), 18 + 2 * (14 + 128 + 14 + 4) + 4)
    for r, c in ((0, 0), (1, 1)):
        src = to_pil(rows[r][c])
        x0, y0 = 4 + c * (128 + 4), 18 + 4 + r * (14 + 128 + 14 + 4) + 14
        for x, y in ((0, 0), (13, 21), (31, 31)):
            assert img.getpixel((x0 + 4 * x + 2, y0 + 4 * y + 2)) == src.getpixel((x, y))
