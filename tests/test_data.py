"""Tests of data.py: the benchmark loader (round trip, bad inputs), image loading, video pair selection."""

import json

import numpy as np
import pytest
from PIL import Image

import data
import world
from data import BenchmarkError, load_benchmark, select_keyframes, video_pairs, write_benchmark


def make_bench(root, n=4):
    """A mini benchmark on disk: n items rendered by world.py, the last without an output."""
    (root / "imgs").mkdir(parents=True)
    scenes = world.generate(world.WorldConfig(n_train=n, n_val=0, n_test=0, n_comp=0, n_videos=0,
                                              n_captions=0))["train"]
    recs = []
    for i, r in enumerate(scenes):
        world.render(r["src"]).save(root / "imgs" / f"{i}_in.png")
        world.render(r["tgt"]).save(root / "imgs" / f"{i}_out.png")
        rec = dict(id=r["id"], input=f"imgs/{i}_in.png", instruction=r["instruction"], output=f"imgs/{i}_out.png",
                   task="world", src_scene=r["src"].to_json(), action=r["action"].to_json())
        if i == n - 1:
            del rec["output"]
        recs.append(rec)
    return recs


def write(path, recs):
    path.write_text(json.dumps(recs, indent=1))
    return path


def test_roundtrip(tmp_path):
    recs = make_bench(tmp_path)
    items = load_benchmark(write(tmp_path / "test.json", recs))
    assert len(items) == 4 and [it.id for it in items] == [r["id"] for r in recs]
    assert items[0].input_path == tmp_path / "imgs/0_in.png" and items[0].scorable
    assert not items[-1].scorable and items[-1].output_path is None
    assert items[0].extra["src_scene"] == recs[0]["src_scene"]
    write_benchmark(items, tmp_path / "copy" / "bench.json")
    again = load_benchmark(tmp_path / "copy" / "bench.json")
    assert [(a.id, a.input_path.resolve(), a.instruction, a.output_path and a.output_path.resolve(), a.task, a.extra)
            for a in again] == [(a.id, a.input_path.resolve(), a.instruction, a.output_path and
                                 a.output_path.resolve(), a.task, a.extra) for a in items]
    # the world's judge works from a loaded item
    assert world.judge_item(items[0], Image.open(items[0].output_path))["score"] == 10


def test_jsonl_prompt_alias_and_missing_id(tmp_path):
    recs = make_bench(tmp_path, n=2)
    for r in recs:
        r["prompt"] = r.pop("instruction")
        del r["id"]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    items = load_benchmark(tmp_path / "b.jsonl")
    assert [it.id for it in items] == ["world-0", "world-1"]
    assert items[0].instruction == recs[0]["prompt"]


def test_aurora_style_root(tmp_path):
    # AURORA: data/magicbrush/train.json with paths "data/magicbrush/images/..." relative to the repo root
    img_dir = tmp_path / "data" / "magicbrush" / "images"
    img_dir.mkdir(parents=True)
    world.render(world.Scene()).save(img_dir / "0-input.png")
    world.render(world.Scene()).save(img_dir / "0-output.png")
    rec = dict(input="data/magicbrush/images/0-input.png", output="data/magicbrush/images/0-output.png",
               instruction="add a dog", mask="0-mask.png")
    items = load_benchmark(write(tmp_path / "data" / "magicbrush" / "train.json", [rec]))
    assert items[0].input_path == img_dir / "0-input.png" and items[0].extra == {"mask": "0-mask.png"}
    items = load_benchmark(tmp_path / "data" / "magicbrush" / "train.json", image_root=tmp_path)
    assert len(items) == 1


@pytest.mark.parametrize("breakage, message", [
    (lambda r, root: r.update(input="imgs/nope.png"), "missing image file"),
    (lambda r, root: (root / "imgs" / "1_in.png").write_bytes(b"not a png"), "unreadable image file"),
    (lambda r, root: r.update(output="imgs/gone.png"), "gone.png"),
    (lambda r, root: r.pop("input"), "missing field 'input'"),
    (lambda r, root: r.pop("instruction"), "missing field 'instruction'"),
    (lambda r, root: r.update(instruction="   "), "empty instruction"),
])
def test_bad_items_skipped_or_raised(tmp_path, capsys, breakage, message):
    recs = make_bench(tmp_path)
    breakage(recs[1], tmp_path)
    path = write(tmp_path / "test.json", recs)
    items = load_benchmark(path)
    assert len(items) == 3 and recs[1]["id"] not in [it.id for it in items]
    err = capsys.readouterr().err
    assert "item 1 (id train-00001)" in err and message in err
    with pytest.raises(BenchmarkError, match=message):
        load_benchmark(path, strict=True)


def test_malformed_json_names_line(tmp_path):
    recs = make_bench(tmp_path, n=2)
    text = json.dumps(recs, indent=1).splitlines()
    text[5] = text[5] + " ,,"
    (tmp_path / "bad.json").write_text("\n".join(text))
    with pytest.raises(BenchmarkError, match=r"bad\.json:6"):
        load_benchmark(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text(json.dumps(recs[0]) + "\n\n{oops\n")
    with pytest.raises(BenchmarkError, match=r"bad\.jsonl:3"):
        load_benchmark(tmp_path / "bad.jsonl")


def test_load_image_errors_name_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        data.load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG junk")
    with pytest.raises(ValueError, match="junk.png"):
        data.load_image(tmp_path / "junk.png")
    Image.new("RGBA", (40, 20), (0, 0, 0, 0)).save(tmp_path / "t.png")
    img = data.load_image(tmp_path / "t.png", size=16)
    assert img.size == (16, 16) and img.getpixel((8, 8)) == (255, 255, 255)  # transparency onto white


def test_select_keyframes_spacing_and_k():
    d = np.array([0, 0.0, 0.2, 0.0, 0.5, 0.4, 0.0, 0.3, 0.1, 0.0])
    assert select_keyframes(d, k=10, spacing=1) == [2, 4, 5, 7, 8]  # every changed frame, holds excluded
    assert select_keyframes(d, k=2, spacing=1) == [4, 5]
    assert select_keyframes(d, k=10, spacing=2) == [2, 4, 7]  # 5 is next to 4, 8 next to 7
    assert select_keyframes(d, k=10, spacing=3) == [4, 7]  # 2 is 2 from 4
    assert select_keyframes(d, k=6, spacing=20) == [4]


def test_video_pairs_on_frames(tmp_path):
    rng = np.random.default_rng(0)
    base = np.full((32, 32, 3), 240, np.uint8)
    frames = [base.copy()]
    change = {2: 4, 4: 16, 5: 10, 7: 12}  # frame -> side of the changed square (bigger = larger difference)
    for t in range(1, 9):
        f = frames[-1].copy()
        if t in change:
            f[:change[t], :change[t]] = rng.integers(0, 255, 3)
        frames.append(f)
    vd = tmp_path / "vid"
    vd.mkdir()
    for t, f in enumerate(frames):
        Image.fromarray(f).save(vd / f"{t:03d}.png")
    pairs = video_pairs(vd, k=3, spacing=2)
    assert [(p.src_index, p.tgt_index) for p in pairs] == [(1, 2), (3, 4), (6, 7)]
    assert pairs[1].src_path == vd / "003.png" and pairs[1].tgt_path == vd / "004.png" and pairs[1].diff > 0
    assert [p.tgt_index for p in video_pairs(vd, k=6, spacing=1)] == [2, 4, 5, 7]
    (vd / "005.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="005.png"):
        video_pairs(vd, k=3, spacing=2)


def test_world_videos_pairs_match_hidden_truth(tmp_path):
    cfg = world.WorldConfig(n_train=7, n_val=0, n_test=0, n_comp=7, n_videos=4, n_captions=0)
    paths = world.build(tmp_path / "d", cfg, log=lambda *a: None)
    hidden = json.loads(open(paths["videos_hidden"]).read())
    pairs = data.all_video_pairs(paths["videos_dir"], k=cfg.video_k, spacing=cfg.video_spacing)
    changed = {(v, st["t"]) for v, h in hidden.items() for st in h["steps"] if not st["hold"]}
    assert pairs and all((p.video, p.tgt_index) in changed for p in pairs)
    for split in ("train", "test_comp"):
        items = load_benchmark(paths[split], strict=True)
        assert all(it.scorable and it.task.startswith("world") for it in items)
