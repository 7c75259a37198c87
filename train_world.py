"""Fine-tune the world model (WM): p(target image | source image, action). Paper Sec. 3.1-3.2, Eq. 1-2, App. H.

The WM writes the target image as VQ tokens, one token at a time, conditioned on the source image and the action
text. Two losses over the target image tokens l = 1..L:
- plain cross-entropy ("C-FT" in the paper): every token counts the same;
- the recognition-weighted loss of Eq. 2 ("C-FDM"): token l is weighted by w_l = ||z_s^(l) - z_t^(l)||^2, the
  squared distance between the VQ encoder's pre-quantisation features of source and target at that position
  (recognition_weights below). Most tokens of an edit are copies of the source; the weights move the loss onto the
  tokens the action changed. The paper leaves the normalisation open; three readings are options here:
  --weight_norm=image  each image's weights have mean 1: every pair weighs the same;
  --weight_norm=batch  raw w_l over the batch's mean: a pair whose features changed more (more motion) weighs more;
  --weight_mix=m       w = (1 - m) * w + m with either: a uniform floor (m = 1 is plain CE, exactly).
  The defaults, batch and 0.5, are the reading chosen on the validation split (docs/log.md); the main job uses them.
Bootstrapping (Eq. 1) is simply more data: pass the labelled and the DM-labelled JSON files together in --data.

Sequence (our template; the paper publishes none):
    <bos> " Edit: " action <boi> source <eoi> <boi> target <eoi>
Loss on the target's image tokens only. With --uncond_prob > 0 a fraction of examples also appear with the action
removed (" Edit:" and nothing), which is what classifier-free guidance at sampling time needs.

Run:  python train_world.py --data=out/data/train.json --val_data=out/data/val.json --weighting=recognition
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from itertools import groupby

import torch

from checkpoint import auto_batch
from common import UserError, arg, run
from draw import save_triplet_grid
from metrics import item_scores, judge_items
from model import generate_image
from train import (
    PRETRAIN_ONLY,
    TrainConfig,
    collate,
    image_segment,
    pack,
    parse_config,
    prepare_pairs,
    sequence_nll,
    train,
)

WM_PROMPT = " Edit:"


@dataclass
class WorldTrainConfig(TrainConfig):
    uncond_prob: float = arg(0.0, "0..1")  # fraction of examples duplicated without their action (for CFG); 0 = off
    grid_items: int = arg(8, ">=0")  # items shown in the (source | action | sample | target) grid at each evaluation


def recognition_weights(feat_src: torch.Tensor, feat_tgt: torch.Tensor, mix: float = 0.0,
                        scale: float | None = None) -> torch.Tensor:
    """Eq. 2 token weights: w_l = ||z_s^(l) - z_t^(l)||^2 over channels, normalised to mean 1 over the image.

    feats (C, h, w) -> weights (h*w,) in raster order (the order of the VQ codes). The paper does not state the
    normalisation; mean 1 keeps the loss on the same scale as plain CE, so learning rates transfer. `mix` blends
    with uniform weights (a floor: every token keeps at least weight `mix`). Identical images -> uniform weights.
    `scale` (the "batch" reading, --weight_norm=batch): divide by this instead of the image's own mean. The loss
    divides by the batch's weight sum (train.forward_backward), so with mix 0 any scale gives raw w_l over the batch
    mean; wm_examples passes the training set's mean raw weight, the expected batch mean, against which the floor is
    set.
    """
    d = (feat_src.float() - feat_tgt.float()).pow(2).sum(dim=0).flatten()  # (h*w,)
    mean = d.mean() if scale is None else torch.tensor(float(scale))
    w = d / mean if mean > 0 else torch.ones_like(d)
    return (1.0 - mix) * w + mix


def wm_prompt(tok, src_codes, action: str | None) -> list[int]:
    """<bos> " Edit: <action>" source; action None = the unconditional prompt used by classifier-free guidance.

    The action comes first so that the source and target images are adjacent: target token l then sits at a
    fixed distance (one image segment) from source token l, whatever the length of the action text. Most target
    tokens are copies of the source, and a fixed relative offset is what RoPE attention learns fastest.
    """
    text = WM_PROMPT + (" " + action.strip() if action is not None else "")
    return [tok.bos_id, *tok.encode(text), *image_segment(tok, src_codes)]


def wm_example(tok, src_codes, tgt_codes, action: str | None, token_weights=None):
    """(ids, weights): the target's image tokens carry the loss (1 each, or the Eq. 2 weights); all else 0."""
    tgt = image_segment(tok, tgt_codes)
    w = 1.0 if token_weights is None else [float(x) for x in token_weights]
    return pack([(wm_prompt(tok, src_codes, action), 0), ([tgt[0]], 0), (tgt[1:-1], w), ([tgt[-1]], 0)])


def wm_examples(items, codes: dict, tok, weighting: str = "none", mix: float = 0.0, uncond_prob: float = 0.0,
                seed: int = 0, norm: str = "image") -> list:
    """Training sequences. The readings of Eq. 2 (the paper gives the formula, not its normalisation): norm "image"
    makes each image's weights mean 1 (every pair weighs the same); norm "batch" keeps raw w_l over the batch mean, so
    a pair whose features changed more keeps more weight; `mix` (both) blends with uniform weights, a floor."""
    if weighting not in ("none", "recognition") or norm not in ("image", "batch"):
        raise ValueError(f"weighting must be 'none' or 'recognition', norm 'image' or 'batch': {weighting!r}, {norm!r}")
    feats = [(codes[str(it.input_path)][1], codes[str(it.output_path)][1]) for it in items]
    scale = None  # "batch": the mean raw weight over all training tokens, the expected batch mean
    if weighting == "recognition" and norm == "batch":
        scale = float(torch.cat([recognition_weights(fs, ft, scale=1.0) for fs, ft in feats]).mean())  # 0: uniform
    rng = random.Random(seed)
    out = []
    for it, (fs, ft) in zip(items, feats):
        src, tgt = codes[str(it.input_path)][0], codes[str(it.output_path)][0]
        w = recognition_weights(fs, ft, mix, scale) if weighting == "recognition" else None
        out.append(wm_example(tok, src, tgt, it.instruction, w))
        if uncond_prob > 0 and rng.random() < uncond_prob:
            out.append(wm_example(tok, src, tgt, None, w))
    return out


@torch.no_grad()
def score_targets(model, tok, src_codes, tgt_codes, actions: list[str], batch: int = 0) -> torch.Tensor:
    """log p_WM(target image tokens | action, source), teacher-forced and summed over the target's tokens (N,): the
    WM's own likelihood of a candidate, a picker to compare the DM verifier with. batch 0: checkpoint.auto_batch."""
    model.eval()
    device = next(model.parameters()).device
    examples, out = [wm_example(tok, s, t, a) for s, t, a in zip(src_codes, tgt_codes, actions)], []
    batch = batch or auto_batch(model, max((len(x) for x, _ in examples), default=1), False, tgt_codes.shape[1] + 1)
    for i in range(0, len(actions), batch):
        x, w = collate(examples[i : i + batch], tok.pad_id)
        out.append(-sequence_nll(model, x.to(device), w.to(device)).cpu())
    return torch.cat(out)


@torch.no_grad()
def generate_targets(model, tok, src_codes: torch.Tensor, actions: list[str], n_samples: int = 1,
                     temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                     cfg_scale: float | None = None, generator=None, max_batch: int = 0) -> torch.Tensor:
    """Sample target images from the WM. src_codes (N, L) -> codes (N, n_samples, L).

    The n_samples candidates of one item share its prompt, so they are one batch through the KV cache; items whose
    prompts have the same length are batched together too (the model's generate needs equal-length prompts), up to
    max_batch candidates (0: checkpoint.auto_batch; the draws depend on the batches: one generator feeds them).
    The paper samples at temperature 1: lower temperatures collapse to copying the source.
    """
    model.eval()
    device = next(model.parameters()).device
    L = src_codes.shape[1]
    out = torch.empty(len(actions), n_samples, L, dtype=torch.long)
    prompts = [wm_prompt(tok, s, a) for s, a in zip(src_codes, actions)]
    limit = model.config.max_seq_len - L - 2  # the target image and its <boi>, <eoi>
    if long := next((a for a, p in zip(actions, prompts) if len(p) > limit), None):
        raise UserError(f"action {long[:60]!r}{'...' if len(long) > 60 else ''}: its prompt needs more than the "
                        f"{limit} tokens the model's context of {model.config.max_seq_len} leaves (shorten it)")
    uncond = [wm_prompt(tok, s, None) for s in src_codes]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    seq = max(map(len, prompts), default=0) + L + 1  # prompt, <boi>, target; CFG adds the unconditional stream
    max_batch = max_batch or auto_batch(model, seq * (2 if cfg_scale else 1))
    rows = max_batch // n_samples * n_samples or max_batch  # whole items per batch, else part of one item's n
    for _, group in groupby(order, key=lambda i: len(prompts[i])):
        flat = [i for i in group for _ in range(n_samples)]  # the item of each candidate row
        for j in range(0, len(flat), rows):
            idx, s = flat[j : j + rows], [k % n_samples for k in range(j, min(j + rows, len(flat)))]
            p = torch.tensor([prompts[i] for i in idx])  # (b, T)
            u = torch.tensor([uncond[i] for i in idx]) if cfg_scale else None
            ids = generate_image(model, p.to(device), n_tokens=L, boi_id=tok.boi_id, eoi_id=tok.eoi_id,
                                 temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                 cfg_scale=cfg_scale, uncond_idx=None if u is None else u.to(device))
            out[idx, s] = tok.image_codes(ids.cpu())  # (b, L) into (item, sample)
    return out


def wm_evaluate(model, tok, image_tok, items, codes, out_dir: str, step: int, n_grid: int = 8, seed: int = 0):
    """Sample one target per validation item, score it with the world's judge when the item carries a symbolic
    action, and write the (source | action | sample | target) grid PNG."""
    g = torch.Generator().manual_seed(seed)
    src = torch.stack([codes[str(it.input_path)][0] for it in items])
    samples = generate_targets(model, tok, src, [it.instruction for it in items], generator=g)[:, 0]  # (N, L)
    images = image_tok.decode(samples)  # (N, 3, H, W)
    save_triplet_grid(items[:n_grid], images[:n_grid], os.path.join(out_dir, f"samples_{step:06d}.png"))
    return judge_items(item_scores(items, images, image_tok.pad_colour))


def main(argv=None):
    cfg = parse_config(WorldTrainConfig, argv, description=__doc__.split("\n\n")[0], defaults={"task": "wm"},
                       exclude=("task", *PRETRAIN_ONLY))
    image_tok, tok, items, val, codes = prepare_pairs(cfg)
    examples = wm_examples(items, codes, tok, cfg.weighting, cfg.weight_mix, cfg.uncond_prob, cfg.seed,
                           cfg.weight_norm)
    val_ex = wm_examples(val, codes, tok) if val else None  # validation loss is always the plain CE
    evaluate = (lambda m, step: wm_evaluate(m, tok, image_tok, val, codes, cfg.out_dir, step, cfg.grid_items)) \
        if val else None
    train(cfg, examples, tok, val_ex, evaluate, names=None if cfg.uncond_prob else [it.id for it in items])


if __name__ == "__main__":
    run(main)
