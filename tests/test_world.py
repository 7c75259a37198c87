"""Tests of world.py: rendering, the detector, actions and their language, the judge, the splits, build()."""

import json
import os
import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

import world
from world import (
    COLOURS,
    SHAPES,
    TEMPLATES,
    VERBS,
    Action,
    Obj,
    Scene,
    WorldConfig,
    apply,
    candidates,
    combos,
    describe,
    generate,
    heldout_combos,
    judge,
    outcomes,
    parse,
    parse_action,
    render,
    sample_action,
    sample_scene,
)

SMALL = dict(n_train=28, n_val=14, n_test=14, n_comp=21, n_videos=6, n_captions=10)


def random_scenes(n, seed=0, **kw):
    rng = random.Random(seed)
    return [sample_scene(rng, **kw) for _ in range(n)]


def random_triplets(n_per_verb, seed=0):
    """(scene, action, rng) with n_per_verb actions of every verb."""
    rng, out = random.Random(seed), []
    for verb in VERBS:
        got = 0
        while got < n_per_verb:
            s = sample_scene(rng)
            a = sample_action(s, rng, verbs=(verb,))
            if a is not None:
                out.append((s, a))
                got += 1
    return out


@pytest.fixture(scope="module")
def small_data():
    return generate(WorldConfig(**SMALL))


def test_render_deterministic():
    a = [render(s).tobytes() for s in random_scenes(20, seed=3)]
    b = [render(s).tobytes() for s in random_scenes(20, seed=3)]
    assert a == b
    img = render(random_scenes(1)[0])
    assert img.size == (32, 32) and img.mode == "RGB"
    # pixel-exact: only the background and palette colours occur (no anti-aliasing)
    allowed = {world.BACKGROUND, *COLOURS.values()}
    assert {tuple(p) for p in np.asarray(img).reshape(-1, 3)} <= allowed


def test_shapes_distinct_at_8px():
    masks = {s: world.shape_mask(s, 8) for s in SHAPES}
    assert [int(m.sum()) for m in masks.values()] == [36, 24, 24]
    for a in SHAPES:
        for b in SHAPES:
            if a != b:
                assert (masks[a] != masks[b]).sum() >= 12
    # margin: the outer ring of every cell is background, so neighbouring objects never touch
    for m in masks.values():
        assert not m[0].any() and not m[-1].any() and not m[:, 0].any() and not m[:, -1].any()


def test_parse_render_roundtrip_1000():
    scenes = random_scenes(1000, seed=1, min_objects=1, max_objects=6)
    assert all(parse(render(s)) == s for s in scenes)


@pytest.mark.parametrize("blur, sigma", [(0.6, 0.03), (1.0, 0.06)])
def test_parse_robust_to_noise_and_blur(blur, sigma):
    rng = np.random.default_rng(0)
    bad = 0
    for s in random_scenes(200, seed=2):
        img = render(s).filter(ImageFilter.GaussianBlur(blur))
        x = np.asarray(img, np.float32) / 255 + rng.normal(0, sigma, (32, 32, 3))
        bad += parse(np.clip(x, 0, 1)) != s
    assert bad == 0


def test_parse_robust_to_down_up_sampling():
    # a crude stand-in for a VQ reconstruction: half resolution and back
    for s in random_scenes(100, seed=6):
        assert parse(render(s).resize((16, 16), Image.BILINEAR).resize((32, 32), Image.BILINEAR)) == s


def test_parse_other_sizes():
    for size, grid in ((48, 4), (64, 8), (36, 6)):
        for s in random_scenes(50, seed=4, grid=grid):
            assert parse(render(s, size, grid), grid) == s


def test_copy_source_scores_zero_and_ground_truth_ten():
    for s, a in random_triplets(40):
        assert judge(s, a, render(s))["success"] == 0, (s, a)
        assert judge(s, a, s)["score"] == 0
        for t in outcomes(s, a):  # every valid outcome, through the image path
            assert judge(s, a, render(t)) == dict(success=10, minimal=10, score=10), (s, a, t)


def test_ground_truth_scores_ten_for_every_test_item(small_data):
    for split in ("test", "test_comp", "val", "train"):
        for r in small_data[split]:
            assert judge(r["src"], r["action"], render(r["tgt"]))["score"] == 10
            assert judge(r["src"], r["action"], render(r["src"]))["success"] == 0


def test_judge_partial_scores():
    r, b, g = ("red", "circle"), ("blue", "square"), ("green", "triangle")
    s = Scene((Obj(0, 0, *r), Obj(0, 3, *b), Obj(3, 3, *g)))
    # swap with only one object in place: half success
    half = Scene((Obj(0, 3, *r), Obj(3, 3, *g)))
    assert judge(s, Action("swap", r, ref=b), half)["success"] == 5
    # add at a cell, object drawn elsewhere: 5
    add = Action("add", ("cyan", "circle"), cell=(2, 2))
    assert judge(s, add, s.replace(None, Obj(1, 1, "cyan", "circle")))["success"] == 5
    # correct move but a bystander vanished: minimal 5 (1 of 2 bystanders kept)
    mv = Action("move", r, direction="down")
    out = Scene((Obj(1, 0, *r), Obj(3, 3, *g)))
    assert judge(s, mv, out) == dict(success=10, minimal=5, score=5)
    # correct move plus a spurious object: 2 kept of (2 bystanders + 1 spurious)
    out = Scene((Obj(1, 0, *r), Obj(0, 3, *b), Obj(3, 3, *g), Obj(2, 2, "yellow", "square")))
    assert judge(s, mv, out)["minimal"] == 7
    # a duplicate of the moved object fails success (the object must be at exactly one cell)
    dup = Scene((Obj(0, 0, *r), Obj(1, 0, *r), Obj(0, 3, *b), Obj(3, 3, *g)))
    assert judge(s, mv, dup)["success"] == 0
    # next_to: the reference object must stay put
    nt = Action("next_to", r, ref=g)
    ok = Scene((Obj(2, 3, *r), Obj(0, 3, *b), Obj(3, 3, *g)))
    assert judge(s, nt, ok)["score"] == 10
    moved_ref = Scene((Obj(2, 3, *r), Obj(0, 3, *b), Obj(3, 2, *g)))
    assert judge(s, nt, moved_ref)["minimal"] < 10
    # blank output
    assert judge(s, Action("remove", r), Scene())["minimal"] == 0
    # an action that does not apply to the source (a DM's wrong label) scores 0 success, no crash
    assert judge(s, Action("remove", ("cyan", "square")), s)["success"] == 0
    assert judge(s, Action("move", r, direction="up"), s)["success"] == 0


def test_consistent_checks_labels():
    for s, a in random_triplets(10, seed=11):
        t = apply(s, a, random.Random(0))
        assert world.consistent(s, a, t) and world.consistent(s, parse_action(describe(a)), t)
        assert not world.consistent(s, a, s)
        assert not world.consistent(s, None, t)


def test_stochastic_actions_have_several_valid_outcomes():
    r, b = ("red", "circle"), ("blue", "square")
    s = Scene((Obj(1, 3, *r), Obj(2, 1, *b)))
    for a in (Action("move_somewhere", r, direction="left"), Action("next_to", r, ref=b),
              Action("add", ("green", "triangle"))):
        outs = {apply(s, a, random.Random(k)) for k in range(60)}
        assert len(outs) >= 3, a
        assert outs == set(outcomes(s, a))
        for t in outs:
            assert judge(s, a, render(t))["score"] == 10
    # deterministic actions have exactly one outcome
    for a in (Action("move", r, direction="up"), Action("remove", r), Action("swap", r, ref=b),
              Action("recolour", r, colour="cyan"), Action("add", ("green", "triangle"), cell=(0, 0))):
        assert len(outcomes(s, a)) == 1


def test_sample_action_only_applicable():
    rng = random.Random(5)
    for s in random_scenes(200, seed=5):
        a = sample_action(s, rng)
        assert a is not None and outcomes(s, a)
        for verb in VERBS:
            for c in candidates(s, verb):
                assert outcomes(s, c), c


def test_describe_parse_roundtrip_all_templates():
    for _, a in random_triplets(15, seed=7):
        key = world._template_key(a)
        for i in range(len(TEMPLATES[key])):
            text = describe(a, template=i)
            assert parse_action(text) == a, (text, a)
            assert parse_action(text.capitalize() + ".") == a
    assert parse_action("make it nicer") is None
    assert parse_action("") is None


def test_action_and_scene_json_roundtrip():
    for s, a in random_triplets(5, seed=8):
        assert Action.from_json(json.loads(json.dumps(a.to_json()))) == a
        assert Scene.from_json(json.loads(json.dumps(s.to_json()))) == s


def test_caption_mentions_every_object():
    for s in random_scenes(50, seed=9):
        c = world.caption(s, random.Random(0))
        for o in s.objects:
            assert f"a {o.colour} {o.shape} at the {world.position_name(o.cell)}" in c


def test_compositional_split_is_disjoint(small_data):
    held = heldout_combos(0)
    assert len(held) == len(VERBS) and len({(c, s) for c, s, _ in held}) == len(VERBS)
    seen = set()
    for split in ("train", "val", "test"):
        for r in small_data[split]:
            assert not combos(r["action"]) & held, r
            seen |= combos(r["action"])
    for v in small_data["videos"]:
        for st in v["steps"]:
            if not st["hold"]:
                assert not combos(Action.from_json(st["action"])) & held
    for r in small_data["test_comp"]:
        assert combos(r["action"]) & held, r
    assert {r["verb"] for r in small_data["test_comp"]} == set(VERBS)
    assert all(r["task"] == "world_comp" for r in small_data["test_comp"])


# A world where every leak the split guards against happens often on a naive split: many transitions (a held-out
# change is ~3% of them) and 1-3 objects per scene, so few distinct scenes and test scenes recur elsewhere
LEAKY = dict(n_train=700, n_val=70, n_test=70, n_comp=70, n_videos=60, n_captions=2000, min_objects=1, max_objects=3)


@pytest.fixture(scope="module")
def leaky_data():
    return generate(WorldConfig(**LEAKY))


def _transitions(data, splits=("train", "val", "test")):
    """(split, source, action, target, instruction) of every item of `splits` and every video step that changes."""
    out = [(s, r["src"], r["action"], r["tgt"], r["instruction"]) for s in splits for r in data[s]]
    return out + [("videos", v["scenes"][st["t"] - 1], Action.from_json(st["action"]), v["scenes"][st["t"]],
                   st["instruction"]) for v in data["videos"] for st in v["steps"] if not st["hold"]]


def test_shows_heldout_sees_changes_not_wording():
    g, r, b = ("green", "circle"), ("red", "square"), ("blue", "triangle")
    s = Scene((Obj(1, 2, *g), Obj(3, 0, *r), Obj(0, 1, *b)))
    moved = lambda ident, cell: s.replace(s.find(ident), Obj(*cell, *ident))
    # "slide the green circle somewhere to the left" landing one cell over is "move the green circle left"
    assert world.shows_heldout(s, moved(g, (1, 1)), {(*g, "move")})
    assert not world.shows_heldout(s, moved(g, (1, 0)), {(*g, "move")})  # two cells over: no move does that
    # "move the blue triangle right" landing beside the green circle is "put the blue triangle next to the green
    # circle"; "move the red square up" lands beside nothing
    assert world.shows_heldout(s, moved(b, (0, 2)), {(*g, "next_to")})
    assert not world.shows_heldout(s, moved(r, (2, 0)), {(*g, "next_to")})
    # an add at a named cell is an add somewhere
    added = s.replace(None, Obj(2, 2, "cyan", "square"))
    assert world.shows_heldout(s, added, {("cyan", "square", "add")})
    assert not world.shows_heldout(s, added, {("cyan", "triangle", "add")})
    # the change classes: the three relocating verbs share one
    assert world.changes(Action("next_to", g, ref=r)) == {(*g, "relocate")}
    up = lambda verb: world.changes(Action(verb, g, direction="up"))
    assert up("move_somewhere") == up("move")
    assert world.changes(Action("recolour", g, colour="red")) == {(*g, "recolour"), ("red", "circle", "recolour")}


def test_split_withholds_heldout_changes(leaky_data):
    held = {tuple(h) for h in leaky_data["heldout"]}
    held_changes = {(c, s, world.CHANGE_CLASS[v]) for c, s, v in held}
    trans = _transitions(leaky_data)
    assert {t[0] for t in trans} == {"train", "val", "test", "videos"}
    for split, src, a, tgt, _ in trans:
        assert not world.changes(a) & held_changes, (split, a)
        assert not world.shows_heldout(src, tgt, held, 4, LEAKY["max_objects"]), (split, src, a, tgt)
    for r in leaky_data["test_comp"]:  # the held-out changes are all in test_comp
        assert world.shows_heldout(r["src"], r["tgt"], held, 4, LEAKY["max_objects"]), r


def test_split_withholds_heldout_wording(leaky_data):
    wording = world.heldout_wording({tuple(h) for h in leaky_data["heldout"]})
    for split, *_, text in _transitions(leaky_data, ("train", "val")):
        assert not wording.search(text), (split, text)
    assert all(wording.search(r["instruction"]) for r in leaky_data["test_comp"])
    g = ("green", "circle")
    assert world.heldout_wording({(*g, "move")}).search("move the green circle next to the red square")
    assert world.heldout_wording({(*g, "next_to")}).search("place the red square beside the green circle")
    assert world.heldout_wording({(*g, "recolour")}).search("change the colour of the blue circle to green")
    assert not world.heldout_wording({(*g, "move")}).search("move the red square next to the green circle")


def test_evaluation_source_scenes_are_unseen(leaky_data):
    d = leaky_data
    shown = {x for r in d["train"] for x in (r["src"], r["tgt"])} | {s for v in d["videos"] for s in v["scenes"]}
    shown |= {c["scene"] for c in d["captions"]}
    srcs = {split: {r["src"] for r in d[split]} for split in ("val", "test", "test_comp")}
    for split, ss in srcs.items():
        assert not ss & shown, split
    assert not srcs["val"] & (srcs["test"] | srcs["test_comp"]) and not srcs["test"] & srcs["test_comp"]
    assert world.split_leaks(d, WorldConfig(**LEAKY)) == dict.fromkeys(
        ("heldout_change_train", "heldout_wording_train", "heldout_change_val", "heldout_wording_val",
         "heldout_change_test", "heldout_change_videos", "heldout_wording_videos", "test_scenes_seen",
         "val_scenes_seen", "val_test_shared"), 0)


def test_split_leaks_counts_leaks(leaky_data):
    """split_leaks is not blind: a train item that slides a held-out mover, or shows a test scene, is counted."""
    import copy

    d = copy.copy(leaky_data)
    (c, s, _), = [h for h in d["heldout"] if h[2] == "move"]
    others = [Obj(3, k, *i) for k, i in enumerate(i for i in world.IDENTS if i != (c, s))][:3]
    src = Scene((Obj(0, 3, c, s), *others))  # 4 objects: no LEAKY scene has as many
    a = Action("move_somewhere", (c, s), direction="left")
    bad = dict(src=src, action=a, tgt=Scene((Obj(0, 2, c, s), *others)), instruction=describe(a))
    d["train"] = d["train"] + [bad, dict(bad, src=d["test"][0]["src"])]
    leaks = world.split_leaks(d, WorldConfig(**LEAKY))
    assert leaks["heldout_change_train"] == 2 and leaks["heldout_wording_train"] == 2
    assert leaks["test_scenes_seen"] == 1


def test_val_as_large_as_test_and_balanced_alike(leaky_data):
    import reproduce

    assert WorldConfig().n_val == WorldConfig().n_test
    for preset in reproduce.PRESETS.values():
        cfg = {**{k: getattr(reproduce.ReproConfig, k) for k in ("n_val", "n_test")}, **preset}
        assert cfg["n_val"] == cfg["n_test"], preset
    count = lambda split: sorted(Counter(r["verb"] for r in leaky_data[split]).items())
    assert count("val") == count("test") == [(v, LEAKY["n_test"] // len(VERBS)) for v in sorted(VERBS)]


def test_heldout_parts_still_seen_in_training():
    data = generate(WorldConfig(n_train=400, n_val=0, n_test=0, n_comp=0, n_videos=0, n_captions=0))
    seen = set().union(*(combos(r["action"]) for r in data["train"]))
    for c, s, v in heldout_combos(0):
        assert any(x[:2] == (c, s) for x in seen), (c, s)  # the object type occurs with other verbs
        assert any(x[2] == v for x in seen)


def test_splits_deterministic_and_seeded(small_data):
    key = lambda d: [(r["src"], r["action"], r["tgt"], r["instruction"]) for s in ("train", "test", "test_comp")
                     for r in d[s]]
    again = generate(WorldConfig(**SMALL))
    assert key(again) == key(small_data)
    assert [v["scenes"] for v in again["videos"]] == [v["scenes"] for v in small_data["videos"]]
    assert key(generate(WorldConfig(**SMALL, seed=1))) != key(small_data)
    # no triplet repeats across splits
    trips = [(r["src"], r["action"]) for s in ("train", "val", "test", "test_comp") for r in small_data[s]]
    assert len(set(trips)) == len(trips)


def test_videos_have_holds_and_changes(small_data):
    cfg = WorldConfig(**SMALL)
    for v in small_data["videos"]:
        assert len(v["scenes"]) == cfg.video_len
        for st in v["steps"]:
            a, b = v["scenes"][st["t"] - 1], v["scenes"][st["t"]]
            if st["hold"]:
                assert a == b
            else:
                assert judge(a, Action.from_json(st["action"]), b)["score"] == 10
    steps = [st for v in small_data["videos"] for st in v["steps"]]
    assert any(st["hold"] for st in steps) and any(not st["hold"] for st in steps)


def test_build_files_and_idempotent(tmp_path):
    cfg = WorldConfig(**SMALL)
    logs = []
    paths = world.build(tmp_path / "d", cfg, log=logs.append)
    items = json.loads((tmp_path / "d" / "test.json").read_text())
    assert len(items) == cfg.n_test
    for it in items:
        assert {"id", "input", "instruction", "output", "task", "verb", "src_scene", "action"} <= set(it)
        assert not it["input"].startswith("/")
        out = Image.open(tmp_path / "d" / it["output"])
        assert world.judge_item(it, out)["score"] == 10
        assert world.judge_item(it, Image.open(tmp_path / "d" / it["input"]))["success"] == 0
    vids = json.loads((tmp_path / "d" / "videos.json").read_text())
    assert len(vids) == cfg.n_videos and set(vids[0]) == {"id", "frames"}  # unlabelled: no actions
    assert all((tmp_path / "d" / f).exists() for f in vids[0]["frames"])
    hidden = json.loads((tmp_path / "d" / "videos_hidden.json").read_text())
    assert set(hidden) == {v["id"] for v in vids}
    assert Image.open(paths["samples"]).size[0] > 100
    mtime = (tmp_path / "d" / "manifest.json").stat().st_mtime_ns
    world.build(tmp_path / "d", cfg, log=logs.append)
    assert "skipping" in logs[-1] and (tmp_path / "d" / "manifest.json").stat().st_mtime_ns == mtime
    stats = world.stats(paths)
    assert "| move |" in stats and "held-out" in stats


def test_nuisance_frames_keep_the_judge_exact():
    """Video-like frames (noise, brightness/contrast, a sub-pixel camera shift): the detector still reads 1,000
    random scenes exactly, though no two frames of a scene are alike and a shift-blind reading fails."""
    rng, blind = random.Random(11), 0
    for i in range(1000):
        s = world.sample_scene(rng, min_objects=2, max_objects=8)
        img = world.nuisance_frame(render(s), 1.0, f"t-{i}")
        assert parse(img, max_shift=world.MAX_SHIFT) == s, (i, s)
        if i < 100:
            blind += parse(img) != s
            x, y = np.asarray(img, np.float32), np.asarray(world.nuisance_frame(render(s), 1.0, f"u-{i}"), np.float32)
            assert np.abs(x - y).mean() > 2 and np.array_equal(x, world.nuisance_frame(render(s), 1.0, f"t-{i}"))
    assert blind > 10  # the camera shift is large enough to matter
    assert world.nuisance_frame(render(s), 0.0, "t").tobytes() == render(s).tobytes()


def test_nuisance_world_build_and_judge(tmp_path):
    cfg = WorldConfig(**{**SMALL, "nuisance": 1.0})
    assert cfg.hash() != WorldConfig(**SMALL).hash()
    world.build(tmp_path / "d", cfg, log=lambda *a: None)
    items = json.loads((tmp_path / "d" / "test.json").read_text())
    for it in items:
        assert it["nuisance"] == 1.0
        out, inp = Image.open(tmp_path / "d" / it["output"]), Image.open(tmp_path / "d" / it["input"])
        assert world.judge_item(it, out)["score"] == 10 and world.judge_item(it, inp)["success"] == 0
    frames = json.loads((tmp_path / "d" / "videos.json").read_text())[0]["frames"]
    a, b = (np.asarray(Image.open(tmp_path / "d" / f), np.float32) for f in frames[:2])
    assert np.abs(a - b).mean() > 1  # even a hold is not pixel-identical
    with pytest.raises(SystemExit):  # range-checked: one line, exit 2
        world.main(["--out=/tmp/x", "--nuisance=1.5"])


def test_motion_counts_cells_and_distance():
    s = Scene((Obj(0, 0, "red", "circle"), Obj(3, 3, "blue", "square")))
    assert world.motion(s, s) == {"cells": 0, "distance": 0}
    assert world.motion(s, s.replace(s.objects[0], None)) == {"cells": 1, "distance": 0}  # remove
    assert world.motion(s, s.replace(s.objects[0], Obj(0, 0, "green", "circle"))) == {"cells": 1, "distance": 0}
    assert world.motion(s, s.replace(s.objects[0], Obj(0, 2, "red", "circle"))) == {"cells": 2, "distance": 2}
    swap = apply(s, Action("swap", ("red", "circle"), ref=("blue", "square")), random.Random(0))
    assert world.motion(s, swap) == {"cells": 2, "distance": 6}


def test_cli_rejects_unknown_keys(capsys):
    with pytest.raises(SystemExit):
        world.main(["--out=/tmp/x", "--no_such_key=3"])
    with pytest.raises(SystemExit):
        world.main(["--help"])
    assert "--n_train" in capsys.readouterr().out


def test_build_refuses_foreign_folder(tmp_path):
    from common import UserError

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "mine.png").write_bytes(b"x")
    (tmp_path / "train.json").write_text("[]")  # an Aurora-style data folder: a train.json and images/
    with pytest.raises(UserError, match="not written by worldboot"):
        world.build(tmp_path, WorldConfig(**SMALL), log=lambda *a: None)
    assert (tmp_path / "images" / "mine.png").read_bytes() == b"x" and sorted(os.listdir(tmp_path)) == [
        "images", "train.json"]


def test_parse_caption_inverts_caption():
    rng = random.Random(3)
    for s in random_scenes(300, seed=3, min_objects=1):
        assert world.parse_caption(world.caption(s, rng)) == s
    assert world.parse_caption("nothing") == Scene() and world.parse_caption("a red blob somewhere") is None
    assert world.parse_caption("a red circle at the top left and a red circle") == Scene((Obj(0, 0, "red", "circle"),))


def test_narrations_use_every_instruction_word_in_other_sentences():
    """The text-only corpus: every word of every instruction template (and of directions, colours, shapes, cell
    names) occurs, no narration is an instruction (parse_action may read one, but none equals a template's wording),
    and none names a held-out combination."""
    cfg = WorldConfig(**SMALL)
    texts = world.narrations(cfg, 300)
    words = lambda t: set(re.findall(r"[a-z]+(?:-[a-z]+)?", t.lower()))
    said = set().union(*map(words, texts))
    template_words = set().union(*(words(re.sub(r"\{[a-z]+\}", " ", t)) for ts in TEMPLATES.values() for t in ts))
    fills = {*world.DIRECTIONS, "higher", "further", *COLOURS, *SHAPES, *world.ROW_WORDS, *world.COL_WORDS}
    assert template_words | fills <= said, sorted((template_words | fills) - said)
    rng = random.Random(0)
    instructions = {describe(a, rng) for _, a in random_triplets(40)}
    assert not instructions & set(texts)
    wording = world.heldout_wording(heldout_combos(cfg.seed))
    assert not any(wording.search(t) for t in texts)


def test_withhold_removes_what_it_withholds_and_leaks_stay_zero():
    cfg = WorldConfig(**{**SMALL, "n_train": 140})
    data = generate(cfg)
    withheld = [("green", "circle"), ("red", "square")]
    recs = [dict(r, action=r["action"].to_json()) for r in data["train"]]
    kept = world.withhold(recs, withheld, verbs=("swap",))
    shows = lambda r: {(c, s) for c, s, _ in world.changes(Action.from_json(r["action"])) |
                       world.combos(Action.from_json(r["action"]))}
    assert 0 < len(kept) < len(recs) and any(shows(r) & set(withheld) for r in recs)  # the filter had work to do
    assert not any(shows(r) & set(withheld) for r in kept) and not any(r["verb"] == "swap" for r in kept)
    assert any(r["verb"] == "swap" for r in data["test"])  # the test still asks about what the labels withhold
    ids = {r["id"] for r in kept}
    leaks = world.split_leaks(dict(data, train=[r for r in data["train"] if r["id"] in ids]), cfg)
    assert set(leaks.values()) == {0}
