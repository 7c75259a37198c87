"""The foundation report card: what the pre-trained model knows before any fine-tuning (paper Sec. 3 / App. H).

The paper starts from Anole-7B: Chameleon's understanding, trained at scale, and image output restored by re-training
only lm_head's image rows on a small set. Its first finding (the DM is easier to learn than the WM) may rest on that
asymmetry, so every report says which foundation produced its numbers (docs/experiments/premise_criteria.md gives
the criteria the default must meet). Read off the pre-trained model and its training data:

  caption_exact   zero-shot captioning: each validation source image captioned greedily, the caption parsed back
                  into a scene (world.parse_caption); the share equal to the image's scene
  draw_exact      zero-shot drawing: each validation source scene's caption (world.caption, first template) drawn
                  at the run's temperature, read back by the judge's detector (world.parse); the share equal to it
  gen_share       the share of pre-training loss tokens (by weight) that are image tokens: caption -> image
  target_types    the share of the distinct BPE tokens of the train instructions (as the DM writes them) that are
                  a pre-training loss target somewhere; target_tokens: the same over occurrences

Harness: it measures, it trains nothing.
"""

from __future__ import annotations

import statistics
from itertools import groupby

import torch

import world
from data import to_pil
from model import generate_image, generate_text
from train import CAPTION_PROMPT, DRAW_PROMPT, image_segment
from train_dynamics import text_vocab_mask


def loss_targets(examples) -> list[tuple[int, float]]:
    """(token id, loss weight) of every position that carries loss in `examples` ((ids, weights) as train.pack)."""
    return [(i, w) for ids, ws in examples for i, w in zip(ids, ws) if w > 0]


def generation_share(examples, tok) -> float:
    """The share of the loss (summed weights) on image tokens: caption -> image generation in pre-training."""
    targets = loss_targets(examples)
    gen = sum(w for i, w in targets if tok.is_image_id(i))
    return gen / max(1e-9, sum(w for _, w in targets))


def target_coverage(examples, instructions: list[str], tok) -> dict:
    """How much of the instructions' text was a pre-training target: the share of their distinct BPE tokens
    (target_types) and of their token occurrences (target_tokens), each instruction encoded as the DM writes it."""
    seen = {i for i, _ in loss_targets(examples)}
    occ = [i for text in instructions for i in tok.encode(" " + text.strip())]
    return {"target_types": len(set(occ) & seen) / max(1, len(set(occ))),
            "target_tokens": sum(i in seen for i in occ) / max(1, len(occ))}


@torch.no_grad()
def zero_shot_captions(model, tok, items, codes: dict, batch: int = 64) -> list[dict]:
    """Greedy captions of the items' source images, parsed back: [{id, caption, exact}] (exact: the parsed scene
    equals the item's source scene)."""
    model.eval()
    device = next(model.parameters()).device
    allowed = text_vocab_mask(tok, model.config.vocab_size).to(device)
    out = []
    for k in range(0, len(items), batch):
        chunk = items[k : k + batch]
        prompts = torch.tensor([[tok.bos_id, *image_segment(tok, codes[str(it.input_path)][0]),
                                 *tok.encode(CAPTION_PROMPT)] for it in chunk])  # (b, T): equal lengths
        rows = generate_text(model, prompts.to(device), max_new_tokens=64, eos_id=tok.eos_id, allowed=allowed)
        for it, row in zip(chunk, rows.tolist()):
            text = tok.decode([t for t in row if t not in (tok.eos_id, tok.pad_id)]).strip()
            grid = it.extra.get("grid", world.GRID)
            scene = world.parse_caption(text, grid)
            out.append({"id": it.id, "caption": text,
                        "exact": int(scene == world.Scene.from_json(it.extra["src_scene"]))})
    return out


@torch.no_grad()
def zero_shot_drawings(model, tok, image_tok, items, codes: dict, seed: int = 0, temperature: float = 1.0,
                       batch: int = 64) -> list[dict]:
    """The items' source scenes drawn from their captions (as many tokens as their source images have) and read back
    by the judge's detector: [{id, exact}] in the items' order."""
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    n_tokens = len(codes[str(items[0].input_path)][0])
    grid = lambda it: it.extra.get("grid", world.GRID)
    scenes = [world.Scene.from_json(it.extra["src_scene"]) for it in items]
    prompts = [[tok.bos_id, *tok.encode(DRAW_PROMPT + " " + world.caption(s, None, grid(it))), tok.boi_id]
               for it, s in zip(items, scenes)]
    exact = [0] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    for _, group in groupby(order, key=lambda i: len(prompts[i])):  # generate_image needs equal-length prompts
        group = list(group)
        for k in range(0, len(group), batch):
            idx = group[k : k + batch]
            ids = generate_image(model, torch.tensor([prompts[i] for i in idx]).to(device), n_tokens=n_tokens,
                                 boi_id=tok.boi_id, eoi_id=tok.eoi_id, temperature=temperature, generator=g)
            images = image_tok.decode(tok.image_codes(ids).to(next(image_tok.parameters()).device)).cpu()
            for i, img in zip(idx, images):
                exact[i] = int(world.parse(to_pil(img), grid(items[i])) == scenes[i])
    return [{"id": it.id, "exact": e} for it, e in zip(items, exact)]


def trained_fraction(model, task: str) -> float:
    """The share of the model's weights that trained: LoRA adapters over the frozen model (the adapters not counted
    in the total), or lm_head's image rows for the image-head stage."""
    total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    if task == "image_head":
        c = model.config
        return (c.image_token_end - c.image_token_start) * c.n_embd / total
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / total


def report_card(model, tok, image_tok, items, codes: dict, examples, instructions: list[str], seed: int = 0,
                temperature: float = 1.0) -> dict:
    """The card of one pre-trained model (module docstring): `items` the validation items (with source scenes),
    `examples` its pre-training examples, `instructions` the train instructions."""
    caps = zero_shot_captions(model, tok, items, codes)
    draws = zero_shot_drawings(model, tok, image_tok, items, codes, seed, temperature)
    return {"caption_exact": statistics.fmean(r["exact"] for r in caps),
            "draw_exact": statistics.fmean(r["exact"] for r in draws),
            "gen_share": generation_share(examples, tok), **target_coverage(examples, instructions, tok),
            "loss_tokens": sum(w for _, w in loss_targets(examples)), "items": len(items),
            "captions": caps[:5]}
