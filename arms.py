"""Synthetic data's worth in parts (paper Sec. 3.2, Eq. 1; its ablation "- synthetic data"): label arms on the same
kept video pairs.

The DM labels the unlabelled video pairs and the stratified top-K filter keeps some (bootstrap.py, synthetic.json).
Besides the DM's labels, the world knows the true action of every video step (videos_hidden.json, the report's
answer key), so the same kept pairs can be labelled two more ways:
  oracle    the world's hidden true action of each pair: what the videos can give at most
  shuffled  the DM's labels permuted over the kept pairs (seeded): the same label distribution, no information
WMs trained on the labelled triplets plus each (reproduce.py --label_arms) split the synthetic data's effect into
the most the videos can give (oracle - labelled only) and the cost of label noise (DM - oracle).

Harness: it writes label files; it trains nothing.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from bootstrap import action_class
from common import atomic_write, read_json


def _rewrite(synthetic: str, out: str, labels: list[str], arm: str) -> list[dict]:
    """synthetic.json's items with their instruction (and verb) replaced by `labels`, written to `out` with image
    paths relative to it."""
    src_root, dst_root = Path(synthetic).resolve().parent, Path(out).resolve().parent
    items = []
    for it, label in zip(read_json(synthetic, "synthetic data"), labels):
        rel = {k: os.path.relpath(src_root / it[k], dst_root) for k in ("input", "output")}
        items.append({**it, **rel, "instruction": label, "verb": action_class(label), "labels": arm})
    os.makedirs(dst_root, exist_ok=True)
    atomic_write(out, json.dumps(items, indent=1))
    return items


def true_action(item: dict, synthetic: str, hidden: dict) -> dict | None:
    """The hidden video step a synthetic pair shows ({t, hold, instruction, action, ...}), from the pair's video
    (`source`) and its key frame's index (the output frame's file name: videos/<vid>/<t>.png)."""
    t = int(Path(item["output"]).stem)
    step = hidden[item["source"]]["steps"][t - 1]
    if step["t"] != t or int(Path(item["input"]).stem) != t - 1:
        raise ValueError(f"{synthetic}: item {item['id']} is not a pair of consecutive frames")
    return step


def write_oracle(synthetic: str, hidden_path: str, out: str) -> dict:
    """The kept pairs of `synthetic` labelled with the world's true instruction of each. A pair whose step was a
    hold (no action: only with video-like frames, whose holds still differ in noise) keeps the DM's label and is
    counted. Returns {"path", "items", "holds"}."""
    hidden, items = read_json(hidden_path, "hidden video actions"), read_json(synthetic, "synthetic data")
    steps = [true_action(it, synthetic, hidden) for it in items]
    labels = [it["instruction"] if st["hold"] else st["instruction"] for it, st in zip(items, steps)]
    return {"path": out, "items": len(_rewrite(synthetic, out, labels, "oracle")),
            "holds": sum(st["hold"] for st in steps)}


def write_shuffled(synthetic: str, out: str, seed: int = 0) -> dict:
    """The kept pairs of `synthetic` with the DM's labels permuted among them (random.Random(seed)): the same labels,
    on other pairs. Returns {"path", "items", "unchanged"} (unchanged: pairs that drew their own label back)."""
    labels = [it["instruction"] for it in read_json(synthetic, "synthetic data")]
    perm = list(range(len(labels)))
    random.Random(f"{seed}-shuffled").shuffle(perm)
    shuffled = [labels[j] for j in perm]
    return {"path": out, "items": len(_rewrite(synthetic, out, shuffled, "shuffled")),
            "unchanged": sum(a == b for a, b in zip(labels, shuffled))}
