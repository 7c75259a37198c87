"""Bootstrap the world model from the dynamics model with unlabelled video. Paper Sec. 3.2, Eq. 1, Algorithm 1.

1. Frame pairs are cut from unlabelled videos (data.video_pairs: key frames by frame-difference magnitude).
2. The DM labels every pair: one greedy action plus `n_samples` sampled ones; each candidate is scored by the DM's
   own log-likelihood log p(action | source, target) per token (train_dynamics.score_actions), and the best
   candidate of each pair is kept as its label.
3. Stratified top-K (the paper's filter): sort the labelled pairs by score, then take them round-robin across
   action classes (verbs), best first, until K are kept, so frequent easy verbs cannot crowd out rare ones.
4. The kept triplets are written in the same Aurora-Bench JSON form as the labelled data (with `score` and
   `source` recorded per item), and the WM is trained on labelled + synthetic data (Eq. 1) with train_world.py:
       python train_world.py --data=train.json,synthetic.json --weighting=recognition

The action class is the first word of the action text (the verb of an imperative such as "move the red circle
left"); paraphrased verbs ("shift", "push") are separate classes, which keeps the filter free of any knowledge of
the synthetic world. Where the true actions exist (the synthetic world keeps them out of the training data), the
report measures pseudo-label accuracy before and after filtering with the world's judge: a label counts as correct
when the target frame is a valid outcome of the labelled action.

Run:  python bootstrap.py --dm=out/dm/ckpt --videos=out/data/videos --out=out/synthetic.json --k=1000
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from checkpoint import inference_device, load_model
from common import UserError, arg, atomic_write, refuse_overwrite, run
from data import all_video_pairs
from train import encode_images, load_tokenizers, parse_config
from train_dynamics import predict_actions, score_actions


@dataclass
class BootstrapConfig:
    dm: str = arg("out/dm/ckpt", "required")  # the trained dynamics model (a worldboot checkpoint folder)
    tokenizer_dir: str = "out/tok"  # image + text tokenizers
    videos: str = arg("out/data/videos", "required")  # folder of videos, one sub-folder of frames each
    out: str = arg("out/synthetic.json", "required")  # where the DM-labelled triplets are written (Aurora-Bench JSON)
    force: bool = False  # replace --out if it exists (otherwise refused: the file may not be ours)
    k: int = arg(1000, ">=1")  # pairs kept by the stratified top-K filter (paper: 7K per source dataset)
    n_samples: int = arg(2, ">=0")  # sampled actions per pair besides the greedy one (0 = greedy only)
    temperature: float = arg(1.0, ">=0")  # sampling temperature of the extra candidates (0 = greedy)
    keyframes: int = arg(6, ">=1")  # key frames per video (paper: K_f = 6)
    spacing: int = arg(1, ">=1")  # minimum frame distance between key frames (paper: I_f = 20 on 30 fps video)
    image_size: int = arg(32, ">0")  # preprocessing size before VQ encoding (the tokenizer's resolution)
    seed: int = arg(0, ">=0")  # sampling seed
    max_batch: int = arg(0, ">=0")  # sequences sampled or scored at once (0 = as many as the device's free memory
    # holds, at most 64: checkpoint.auto_batch; the sampled draws depend on it, so fix it to compare machines)


def action_class(text: str) -> str:
    """The action's class for stratification: its first word (the verb), lower-cased."""
    words = text.strip().lower().split()
    return words[0] if words else ""


def stratified_top_k(records: list[dict], k: int, score_key: str = "score", class_key: str = "verb") -> list[dict]:
    """Sort by score (best first) within each class, then pick round-robin across classes until k are kept.

    Classes take turns in the order of their best score; a class that runs out drops out of the rotation.
    """
    by_class: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: -r[score_key]):
        by_class.setdefault(r[class_key], []).append(r)
    queues = sorted(by_class.values(), key=lambda q: -q[0][score_key])
    kept, depth = [], 0
    while len(kept) < min(k, len(records)):
        for q in queues:
            if depth < len(q) and len(kept) < k:
                kept.append(q[depth])
        depth += 1
    return kept


@torch.no_grad()
def label_pairs(dm, tok, src_codes, tgt_codes, n_samples: int = 2, temperature: float = 1.0, seed: int = 0,
                batch: int = 0) -> list[dict]:
    """DM labels for (source, target) code pairs (N, L): for each pair the best of greedy + n_samples sampled actions
    by per-token log-likelihood, `batch` at once (0: auto). Returns [{"action", "score", "score_sum", "verb"}]."""
    g = torch.Generator().manual_seed(seed)
    candidates = [predict_actions(dm, tok, src_codes, tgt_codes, batch=batch)]
    for _ in range(n_samples):
        candidates.append(predict_actions(dm, tok, src_codes, tgt_codes, temperature=temperature, generator=g,
                                          batch=batch))
    best = [None] * len(src_codes)
    for texts in candidates:
        total, mean = score_actions(dm, tok, src_codes, tgt_codes, texts, batch=batch)
        for i, (t, s, m) in enumerate(zip(texts, total.tolist(), mean.tolist())):
            if t and (best[i] is None or m > best[i]["score"]):
                best[i] = {"action": t, "score": m, "score_sum": s, "verb": action_class(t)}
    return [b or {"action": "", "score": float("-inf"), "score_sum": float("-inf"), "verb": ""} for b in best]


def bootstrap(cfg: BootstrapConfig, dm=None, image_tok=None, tok=None, cache: dict | None = None):
    """Label every unlabelled video pair, filter, write cfg.out. Returns (all records, kept records)."""
    if tok is None:
        image_tok, tok = load_tokenizers(cfg.tokenizer_dir, inference_device())
    if dm is None:
        dm, _ = load_model(cfg.dm, role="dm", image_size=cfg.image_size, tok=tok)
    pairs = all_video_pairs(cfg.videos, k=cfg.keyframes, spacing=cfg.spacing)
    if not pairs:
        raise UserError(f"{cfg.videos}: no frame pairs found (expected one sub-folder of frames per video)")
    name = lambda path: os.path.abspath(path)  # the same key data.load_benchmark gives an image
    codes = encode_images(image_tok, sorted({name(x) for p in pairs for x in (p.src_path, p.tgt_path)}),
                          cfg.image_size, cache=cache)
    src = torch.stack([codes[name(p.src_path)][0] for p in pairs])
    tgt = torch.stack([codes[name(p.tgt_path)][0] for p in pairs])
    labels = label_pairs(dm, tok, src, tgt, cfg.n_samples, cfg.temperature, cfg.seed, cfg.max_batch)
    records = [dict(lab, video=p.video, input=name(p.src_path), output=name(p.tgt_path), index=i)
               for i, (p, lab) in enumerate(zip(pairs, labels))]
    kept = stratified_top_k([r for r in records if r["action"]], cfg.k)
    write_synthetic(kept, cfg.out)
    return records, kept


def write_synthetic(records: list[dict], path: str):
    """Aurora-Bench JSON with relative image paths, plus the DM's score and the pair's source per item."""
    root = os.path.dirname(os.path.abspath(path))
    items = [{"id": f"syn{r['index']:06d}", "input": os.path.relpath(r["input"], root),
              "instruction": r["action"], "output": os.path.relpath(r["output"], root), "task": "synthetic",
              "verb": r["verb"], "score": r["score"], "source": r["video"]} for r in records]
    os.makedirs(root, exist_ok=True)
    atomic_write(path, json.dumps(items, indent=1))


def main(argv=None):
    cfg = parse_config(BootstrapConfig, argv, description="DM pseudo-labels + stratified top-K for unlabelled video.")
    refuse_overwrite(cfg.out, cfg.force, (".json",))
    records, kept = bootstrap(cfg)
    classes = {}
    for r in kept:
        classes[r["verb"]] = classes.get(r["verb"], 0) + 1
    print(f"labelled {len(records)} pairs, kept {len(kept)} -> {cfg.out}")
    print("| class | kept |\n|---|---|\n" + "\n".join(f"| {c} | {n} |" for c, n in sorted(classes.items())))


if __name__ == "__main__":
    run(main)
