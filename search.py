"""Inference-time verification: the WM proposes N candidates, the DM picks one. Paper Sec. 3.3.

For a source image o_s and action a, the world model samples N target images o_t^(1..N) in one batch (KV cache,
image-only vocabulary). The dynamics model scores each candidate by how well it explains the action,
    score_i = log p_DM(a | o_s, o_t^(i))    (teacher-forced, summed over the action's tokens and <eos>),
and the best-scoring candidate is returned. The sum is the paper's rule; because the action is the same for all
candidates of one item, the per-token mean ranks them identically (it only divides by a constant), so
`score="mean"` only matters when comparing across actions. N = 1 is the plain WM.

Run:  python search.py --wm=out/wm/ckpt --dm=out/dm/ckpt --image=src.png --action="move the red circle left" --n=8
      (writes the candidates ranked, with their scores, to --out as a PNG grid)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from checkpoint import inference_device, load_model
from common import arg, refuse_overwrite, run
from draw import save_grid
from train import encode_images, load_tokenizers, parse_config
from train_dynamics import score_actions
from train_world import generate_targets

MAX_N = 64  # the largest best-of-N (the batches follow --max_batch)


@dataclass
class SearchConfig:
    wm: str = arg("out/wm/ckpt", "required")  # world model checkpoint folder
    dm: str = arg("out/dm/ckpt", "required")  # dynamics model checkpoint folder (the verifier)
    tokenizer_dir: str = "out/tok"  # image + text tokenizers
    image: str = arg("", "required")  # source image file
    action: str = arg("", "text")  # the action text
    n: int = arg(8, f"1..{MAX_N}")  # candidates sampled from the WM
    temperature: float = arg(1.0, ">=0")  # WM sampling temperature (paper: 1; lower copies the source; 0 = greedy)
    top_k: int = arg(0, ">=0")  # WM top-k (0 = off)
    cfg_scale: float = arg(0.0, ">=0")  # classifier-free guidance scale (0 = off; needs a WM trained with
    # --uncond_prob)
    image_size: int = arg(32, ">0")  # preprocessing size before VQ encoding (the tokenizer's resolution)
    seed: int = arg(0, ">=0")  # sampling seed
    out: str = arg("out/search.png", "required")  # the ranked candidate grid
    force: bool = False  # replace --out if it exists (otherwise refused: the file may not be ours)
    max_batch: int = arg(0, ">=0")  # sequences sampled or scored at once (0 = as many as the device's free memory
    # holds, at most 64: checkpoint.auto_batch; the sampled draws depend on it, so fix it to compare machines)


@torch.no_grad()
def scored_candidates(wm, dm, tok, src_codes: torch.Tensor, actions: list[str], n: int, temperature: float = 1.0,
                      top_k: int | None = None, cfg_scale: float | None = None, generator=None, score: str = "sum",
                      max_batch: int = 0):
    """Sample n candidates per item and score each by the DM. src_codes (B, L); max_batch: sequences per batch (0:
    checkpoint.auto_batch). Returns (candidates (B, n, L), scores (B, n)), both in sampling order.
    """
    cands = generate_targets(wm, tok, src_codes, actions, n_samples=n, temperature=temperature, top_k=top_k,
                             cfg_scale=cfg_scale, generator=generator, max_batch=max_batch)  # (B, n, L)
    B, _, L = cands.shape
    src = src_codes.repeat_interleave(n, 0)  # (B*n, L)
    total, mean = score_actions(dm, tok, src, cands.view(B * n, L), [a for a in actions for _ in range(n)], max_batch)
    return cands, (total if score == "sum" else mean).view(B, n)  # (B, n, L), (B, n)


@torch.no_grad()
def best_of_n(wm, dm, tok, src_codes: torch.Tensor, actions: list[str], n: int, temperature: float = 1.0,
              top_k: int | None = None, cfg_scale: float | None = None, generator=None, score: str = "sum",
              max_batch: int = 0):
    """Sample n candidates per item and rank them by the DM. src_codes (B, L).

    Returns (candidates (B, n, L) sorted best first, scores (B, n) sorted descending).
    """
    cands, scores = scored_candidates(wm, dm, tok, src_codes, actions, n, temperature, top_k, cfg_scale, generator,
                                      score, max_batch)
    B, _, L = cands.shape
    order = scores.argsort(dim=1, descending=True)  # (B, n)
    return torch.gather(cands, 1, order[..., None].expand(B, n, L)), torch.gather(scores, 1, order)


def main(argv=None):
    cfg = parse_config(SearchConfig, argv, description="Best-of-N world-model sampling verified by the dynamics model.")
    refuse_overwrite(cfg.out, cfg.force, (".png", ".jpg", ".jpeg", ".webp"))  # before the sampling
    image_tok, tok = load_tokenizers(cfg.tokenizer_dir, inference_device())
    wm, _ = load_model(cfg.wm, role="wm", image_size=cfg.image_size, tok=tok)
    dm, _ = load_model(cfg.dm, role="dm", image_size=cfg.image_size, tok=tok)
    src = encode_images(image_tok, [cfg.image], cfg.image_size)[cfg.image][0][None]  # (1, L)
    g = torch.Generator().manual_seed(cfg.seed)
    cands, scores = best_of_n(wm, dm, tok, src, [cfg.action], cfg.n, cfg.temperature, cfg.top_k or None,
                              cfg.cfg_scale or None, g, max_batch=cfg.max_batch)
    images = image_tok.decode(torch.cat([src, cands[0]]))  # (1+n, 3, H, W)
    labels = ["source"] + [f"#{i + 1}: {s:.2f}" for i, s in enumerate(scores[0].tolist())]
    save_grid([list(images)], [labels], cfg.out, title=cfg.action)
    for lab in labels[1:]:
        print(lab)
    print(f"ranked candidates -> {cfg.out}")


if __name__ == "__main__":
    run(main)
