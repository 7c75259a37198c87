"""Tests of the premise machinery: the pre-training's generation share and text corpus, the image-head stage, the
foundation report card's measurements, the label arms' writers and the power lines (docs/premise.md)."""

import gzip
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import ACTIONS, tiny_model

import arms
import foundation
import world
from report import criteria_rows, power_rows
from train import TrainConfig, pretrain_examples, train


def caption_items(n, length=16):
    """n fake (image, caption) items and their VQ codes (length image tokens each, codes in [0, 16))."""
    g = torch.Generator().manual_seed(0)
    items = [SimpleNamespace(id=f"c{i}", input_path=f"img{i}.png", instruction=ACTIONS[i % len(ACTIONS)])
             for i in range(n)]
    return items, {f"img{i}.png": (torch.randint(0, 16, (length,), generator=g), None) for i in range(n)}


@pytest.mark.parametrize("share", [0.0, 0.1, 0.25, 0.5, 0.9])
def test_generation_share_is_what_was_asked_in_loss_tokens(tiny_tok, share):
    items, codes = caption_items(60)
    ex = pretrain_examples(items, codes, tiny_tok, share, texts=["the red circle made a move up"] * 7)
    assert abs(foundation.generation_share(ex, tiny_tok) - share) <= 0.02


def test_default_pretraining_is_both_directions_per_caption(tiny_tok):
    """gen_share -1 (the default) builds exactly the examples it always did: caption, then drawing, per item."""
    items, codes = caption_items(5)
    ex = pretrain_examples(items, codes, tiny_tok)
    assert len(ex) == 10 and all(not any(tiny_tok.is_image_id(i) for i, w in zip(*ex[k]) if w)
                                 for k in range(0, 10, 2))
    assert all(all(tiny_tok.is_image_id(i) for i, w in zip(*ex[k]) if w) for k in range(1, 10, 2))
    texts = pretrain_examples(items, codes, tiny_tok, texts=["one more sentence"])[-1]
    assert sum(texts[1]) == len(tiny_tok.encode(" one more sentence")) + 1  # every token and <eos>


def test_target_coverage_counts_instruction_tokens(tiny_tok):
    items, codes = caption_items(6)
    ex = pretrain_examples(items[:1], codes, tiny_tok, 0.0)  # one caption: ACTIONS[0] only
    cov = foundation.target_coverage(ex, [ACTIONS[0]], tiny_tok)
    assert cov == {"target_types": 1.0, "target_tokens": 1.0}
    cov = foundation.target_coverage(ex, [ACTIONS[0], ACTIONS[1]], tiny_tok)
    assert 0 < cov["target_types"] < 1 and 0 < cov["target_tokens"] < 1


def test_image_head_trains_only_the_image_rows_of_lm_head(tiny_tok, tmp_path):
    items, codes = caption_items(8, length=4)
    model = tiny_model(tiny_tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(task="image_head", out_dir=str(tmp_path), steps=4, batch_size=4, lr=1e-2, warmup=1,
                      eval_every=0, save_every=0, quiet=True)
    model, _ = train(cfg, pretrain_examples(items, codes, tiny_tok, 1.0), tiny_tok, model=model)
    after = model.state_dict()
    lo, hi = model.config.image_token_start, model.config.image_token_end
    for k, v in before.items():
        if k != "lm_head.weight":
            assert torch.equal(after[k], v), k  # bit-identical
    head = after["lm_head.weight"]
    assert torch.equal(head[:lo], before["lm_head.weight"][:lo]) and torch.equal(head[hi:],
                                                                                 before["lm_head.weight"][hi:])
    assert not torch.equal(head[lo:hi], before["lm_head.weight"][lo:hi])


def synthetic_from_world(tmp_path):
    """A small world and a synthetic.json of every changed video pair with made-up labels, as bootstrap writes."""
    paths = world.build(tmp_path / "data", world.WorldConfig(n_train=7, n_val=7, n_test=7, n_comp=7, n_videos=4,
                                                             n_captions=2))
    hidden = json.loads(open(paths["videos_hidden"]).read())
    items = []
    for vid, h in sorted(hidden.items()):
        for st in h["steps"]:
            if not st["hold"]:
                items.append({"id": f"syn{len(items):06d}", "input": f"data/videos/{vid}/{st['t'] - 1:03d}.png",
                              "output": f"data/videos/{vid}/{st['t']:03d}.png", "task": "synthetic",
                              "instruction": random.Random(len(items)).choice(ACTIONS), "verb": "x", "score": 0.0,
                              "source": vid})
    syn = tmp_path / "synthetic.json"
    syn.write_text(json.dumps(items))
    return paths, hidden, str(syn), items


def test_oracle_labels_are_the_hidden_actions_and_shuffled_a_permutation(tmp_path):
    paths, hidden, syn, items = synthetic_from_world(tmp_path)
    res = arms.write_oracle(syn, paths["videos_hidden"], str(tmp_path / "arms" / "oracle.json"))
    oracle = json.loads(open(res["path"]).read())
    assert res["holds"] == 0 and len(oracle) == len(items) > 5
    for o, it in zip(oracle, items):
        vid, t = it["source"], int(it["output"][-7:-4])
        assert o["instruction"] == hidden[vid]["steps"][t - 1]["instruction"]
        scenes = [world.Scene.from_json(s) for s in hidden[vid]["scenes"][t - 1 : t + 1]]
        assert world.consistent(scenes[0], world.parse_action(o["instruction"]), scenes[1])
        assert os.path.exists(tmp_path / "arms" / o["input"])  # image paths relative to the new file
    res = arms.write_shuffled(syn, str(tmp_path / "arms" / "shuffled.json"), seed=1)
    shuffled = json.loads(open(res["path"]).read())
    assert sorted(s["instruction"] for s in shuffled) == sorted(it["instruction"] for it in items)
    assert [s["instruction"] for s in shuffled] != [it["instruction"] for it in items]
    assert [s["output"] for s in shuffled] == [o["output"] for o in oracle]  # the same pairs
    again = arms.write_shuffled(syn, str(tmp_path / "arms" / "again.json"), seed=1)
    assert json.loads(open(again["path"]).read()) == shuffled


def test_power_rows_minimum_detectable_effect_and_replicates_needed():
    c = {"what": "synthetic data (CE loss) improves the WM", "metric": "score", "diff": 0.05, "lo": -0.25,
         "hi": 0.35, "per_replicate": [0.05, 0.1, 0.0]}
    (row,) = power_rows([c], replicates=3)
    se = 0.6 / (2 * 1.959964)
    assert row["mde"] == pytest.approx(2.8 * se) and row["paper"] == 0.09
    assert row["replicates_needed"] == int(-(-3 * (2.8 * se / 0.09) ** 2 // 1))
    assert row["could_not_show"]  # not shown, and the paper's effect is below what the run could detect
    (row,) = power_rows([{**c, "what": "the DM solves more items than the WM (C-FT) learns to"}], 3)
    assert row["paper"] is None and row["replicates_needed"] is None


def test_premise_flags_change_only_the_hashes_they_should(tmp_path):
    """At their defaults the premise's flags leave every stage hash as before they existed (old caches stay valid;
    the hashes below were computed before the flags existed); the foundation's flags retrain the pre-training and
    all after it, not the tokenizers; the adaptation's flags retrain the fine-tuning only."""
    import dataclasses

    from reproduce import ReproConfig, Stages

    base = Stages(tmp_path, ReproConfig())
    before = {"vq": "a011ed0d7798", "bpe": "cfc968f60d92", "pretrain": "56fcfb773b82", "dm": "eba5f59e2e9a",
              "wm_ce": "eba5f59e2e9a", "finetune": "352fa0d5c1d6"}
    assert {n: base.hash(n) for n in before} == before
    for kw in (dict(gen_share=0.1), dict(narrations=100), dict(image_head_steps=10)):
        s = Stages(tmp_path, dataclasses.replace(ReproConfig(), **kw))
        assert all(s.hash(n) != base.hash(n) for n in ("image_head", "dm", "wm_ce", "finetune", "card"))
        assert all(s.hash(n) == base.hash(n) for n in ("vq", "bpe")), kw
        # pre-training reads the share and the narrations, not the image-head stage's settings
        assert (s.hash("pretrain") == base.hash("pretrain")) == ("image_head_steps" in kw), kw
    for kw in (dict(lora_r=1), dict(wm_steps_ratio=4), dict(withhold="green circle")):
        s = Stages(tmp_path, dataclasses.replace(ReproConfig(), **kw))
        assert all(s.hash(n) != base.hash(n) for n in ("dm", "wm_ce", "finetune")), kw
        assert all(s.hash(n) == base.hash(n) for n in ("vq", "bpe", "pretrain", "card")), kw


def test_lora_and_step_ratio_reach_the_fine_tuning_configs():
    import dataclasses

    from experiments import train_cfg
    from reproduce import PRESETS, ReproConfig

    cfg = dataclasses.replace(ReproConfig(), lora_r=1, lora_alpha=2.0, lora_lr=1e-2)
    dm, pre = train_cfg(cfg, "dm", "dm", 100, 0), train_cfg(cfg, "pretrain", "pretrain", 100, 0)
    assert (dm.lora_r, dm.lora_alpha, dm.lr) == (1, 2.0, 1e-2) and (pre.lora_r, pre.lr) == (0, cfg.lr)
    assert train_cfg(cfg, "wm_ce", "wm", 100, 0).lr == 1e-2
    assert train_cfg(dataclasses.replace(cfg, lora_lr_wm=3e-2), "wm_ce", "wm", 100, 0).lr == 3e-2
    plain = train_cfg(ReproConfig(), "dm", "dm", 100, 0)  # the default: the checkpoints' recorded config as before
    assert (plain.lora_r, plain.lora_alpha, plain.lr) == (0, TrainConfig.lora_alpha, ReproConfig.lr)
    # the DM's steps: --ft_steps over the ratio (the paper's 4: a quarter; the class preset's 0.5: twice the WM's)
    steps = [dataclasses.replace(ReproConfig(), ft_steps=n, wm_steps_ratio=q).dm_steps
             for n, q in ((3000, 1), (3000, 4), (1000, 0.5), (20, 4))]
    assert steps == [3000, 750, 2000, 5]
    assert PRESETS["class"]["wm_steps_ratio"] == 0.5


@pytest.mark.slow
def test_reproduce_smoke_with_every_premise_flag(tmp_path):
    """The premise's regime end to end at the smoke preset: the card measures what was asked (generation share,
    every instruction token a target), the image-head and LoRA runs record their trained share, the DM trains a
    quarter of the WM's steps on the labelled set minus what it withholds, and the report has its sections."""
    import reproduce

    out = tmp_path / "out"
    reproduce.main(["--preset=smoke", f"--out={out}", "--gen_share=0.1", "--narrations=200", "--image_head_steps=10",
                    "--image_head_items=50", "--lora_r=1", "--wm_steps_ratio=4", "--withhold=green circle,red square",
                    "--label_arms"])
    stage = lambda name: json.loads((out / "rep0" / "stages" / f"{name}.json").read_text())["result"]
    card = stage("card")
    assert abs(card["gen_share"] - 0.1) <= 0.02 and card["target_types"] == 1.0 and card["image_head_tokens"] > 0
    assert 0 < stage("image_head")["trained_fraction"] < 0.1 and 0 < stage("dm")["trained_fraction"] < 0.03
    rows = lambda run: (out / "rep0" / run / "metrics.jsonl").read_text().splitlines()
    assert len(rows("dm")) * 4 == len(rows("wm_ce")) == 20
    assert stage("dm")["examples"] < 56  # the smoke preset's 56 labelled triplets minus the withheld ones
    report = (out / "report.md").read_text()
    for heading in ("Foundation report card", "Power: what this run could have shown", "Synthetic data in parts"):
        assert heading in report


def test_dose_response_reads_cells_and_draws(tmp_path):
    from report import dose_response

    outs = []
    for k, (share, lora) in enumerate([(0.69, 0), (0.1, 0), (0.69, 1), (0.1, 1)]):
        out = tmp_path / f"cell{k}"
        out.mkdir()
        gap = 0.1 * k - 0.1
        (out / "results.json").write_text(json.dumps({
            "config": {"lora_r": lora}, "replicates": [{"card": {"gen_share": share}}] * 3,
            "findings": [{"what": "the DM solves ...", "metric": "solved", "diff": gap, "lo": gap - 0.1,
                          "hi": gap + 0.1, "per_replicate": [gap] * 3, "mean_a": 0.5 + gap, "mean_b": 0.5}]}))
        outs.append(str(out))
    lines = dose_response(outs, str(tmp_path / "dose.png"))
    assert len([row for row in lines if row.startswith(f"| {tmp_path}")]) == 4
    assert "| 0.10 | LoRA r=1 | 3 |" in lines[5] and lines[5].endswith("| shown |")
    assert os.path.getsize(tmp_path / "dose.png") > 0


def test_dose_response_pairs_cells_on_the_same_items(tmp_path):
    """The differences of gaps the design names (within an adaptation, the next share; at a share, LoRA against full
    fine-tuning), paired item by item; a run without a card takes the share of the cell with its pre-trained model."""
    from report import dose_response

    def cell(name, share, lora, dm, wm, card=True):  # dm, wm: per-item solved (0/1) on 100 shared test items
        rep = {"R": {"items": {"dm_sampled": [{"id": f"t{i}", "correct": x} for i, x in enumerate(dm)],
                               "wm": {"C-FT": [{"id": f"t{i}", "success": 10 * x} for i, x in enumerate(wm)]}}}}
        if card:
            rep["card"] = {"gen_share": share}
        c = {"what": "the DM solves ...", "metric": "solved", "diff": 0.0, "lo": -0.1, "hi": 0.1,
             "per_replicate": [0.0], "mean_a": 0.5, "mean_b": 0.5}
        prov = {"stage_hashes": {"rep0": f"data w0 vqgan v0 pretrain p{share}"}}
        path = tmp_path / f"{name}.json.gz"
        with gzip.open(path, "wt") as f:
            json.dump({"config": {"lora_r": lora}, "replicates": [rep], "findings": [c], "provenance": prov}, f)
        return str(path)

    half = [1] * 50 + [0] * 50
    cells = [cell("low_lora", 0.1, 1, [1] * 100, [0] * 100), cell("today_lora", 0.69, 1, half, [0] * 100),
             cell("today_full", 0.69, 0, [0] * 100, [0] * 100, card=False)]
    lines = dose_response(cells, str(tmp_path / "dose.png"))
    assert "| 0.69 | full fine-tuning | 1 |" in next(row for row in lines if "today_full" in row)
    diffs = {row.split(" | ")[0]: row for row in lines if row.startswith("| gap(")}
    assert set(diffs) == {"| gap(0.10, LoRA r=1) − gap(0.69, LoRA r=1)",
                          "| gap(0.69, LoRA r=1) − gap(0.69, full fine-tuning)"}
    for row in diffs.values():
        assert "| 1 | +0.50 |" in row and row.endswith("| shown |")


def test_withhold_flag_takes_object_types_and_verbs():
    assert world.parse_withhold("green circle, red square,swap") == ([("green", "circle"), ("red", "square")],
                                                                     ["swap"])
    assert world.parse_withhold("green circle,swap", check=True) is None
    assert "blue blob" in world.parse_withhold("blue blob", check=True)
    with pytest.raises(SystemExit):
        import reproduce

        reproduce.parse_config(reproduce.ReproConfig, ["--withhold=jump"], presets=reproduce.PRESETS)


def test_criteria_rows_on_a_faithful_and_on_todays_regime():
    from reproduce import ReproConfig

    card = dict(caption_exact=0.6, draw_exact=0.2, target_types=1.0, gen_share=0.1, loss_tokens=1000.0,
                image_head_tokens=50.0)
    rep = {"card": card, "runs": {"dm": {"trained_fraction": 0.0092}}}
    faithful = ReproConfig(wm_steps_ratio=4)
    assert all(met for *_, met in criteria_rows(faithful, [rep, rep]))
    today = {"card": dict(card, caption_exact=0.3, gen_share=0.69, target_types=0.6, image_head_tokens=float("nan")),
             "runs": {"dm": {}}}
    assert [met for *_, met in criteria_rows(ReproConfig(), [today])] == [False, True, False, False, False, False,
                                                                           False]
