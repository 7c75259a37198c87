"""Scores of generated images and texts (paper Sec. 4): the world's judge per item, pixel L1, the optional LLM judge
(the paper's GPT-4o protocol), and BLEU-4 / ROUGE-L for the dynamics model's actions. eval.py runs them over a
benchmark; train_world.py's validation uses the per-item records too.

- synthetic world: the programmatic judge of world.py reads the generated image back into a symbolic scene and
  gives two 0-10 scores, editing success and minimal editing; the per-sample score is their min, averaged per
  subset: the paper's GPT-4o protocol with a judge that cannot be fooled. Plus pixel L1 to the target.
- real Aurora-Bench: pixel L1, and optionally an LLM judge through an OpenAI-compatible HTTP API asked the paper's
  two questions (prompt below); set JUDGE_BASE_URL, JUDGE_MODEL and JUDGE_API_KEY.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import urllib.request
from collections import Counter

import torch
from PIL import Image

import world
from data import preprocess_image, to_pil


def pixel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two images in [-1, 1], reported on the 0-1 pixel scale like the paper's L1."""
    return ((a.float() - b.float()).abs().mean() / 2).item()


def item_scores(items, images: torch.Tensor, pad=None) -> list[dict]:
    """Score generated images (N, 3, H, W) one item at a time: the world judge's success, minimal and score (min of
    the two) where the item carries its symbolic action, pixel L1 where it has a target. One record per item, with
    its id, subset (`task`) and action class (`verb`), so that contrasts can be paired item by item. `pad`: the
    image tokenizer's pad_colour (Liquid), so that targets are preprocessed as the model saw them."""
    size = images.shape[-1]
    records = []
    for it, img in zip(items, images):
        r = {"id": it.id, "task": it.task, "verb": it.extra.get("verb")}
        if world_judgeable(it):
            r.update({k: v for k, v in world_judge(it, to_pil(img)).items() if k in ("success", "minimal", "score")})
        if it.output_path:
            r["l1"] = pixel_l1(img, preprocess_image(it.output_path, size, pad))
        records.append(r)
    return records


def judge_items(records: list[dict]) -> dict:
    """Means over items of their item_scores records: success, minimal, score, l1; n = items."""
    out = {}
    for k in ("success", "minimal", "score", "l1"):
        vals = [r[k] for r in records if k in r]
        if vals:
            out[k] = sum(vals) / len(vals)
    out["n"] = len(records)
    return out


def world_judgeable(item) -> bool:
    return "action" in item.extra and "src_scene" in item.extra


def world_judge(item, image: Image.Image) -> dict:
    """The synthetic world's programmatic judge on one item (world.py documents the scoring rules)."""
    return world.judge_item(item.extra, image)


def aggregate(per_item: list[dict]) -> dict:
    """Mean of each numeric key over items."""
    keys = {k for d in per_item for k in d}
    return {k: sum(d[k] for d in per_item if k in d) / max(1, sum(k in d for d in per_item)) for k in keys}


LLM_JUDGE_PROMPT = """You are judging an image edit. The first image is the original, the second is the edited \
image, and the instruction was: "{instruction}".
Give two integer scores from 0 to 10:
1. editing_success: how well the edited image carries out the instruction (0 = not at all, 10 = perfectly).
2. minimal_editing: how well everything the instruction does not ask to change is left unchanged (0 = the image was \
changed completely or not edited at all, 10 = only the requested change was made).
An edited image that is identical to the original gets editing_success 0.
Answer with JSON only: {{"editing_success": <int>, "minimal_editing": <int>}}"""


def _data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def llm_judge_config() -> tuple[str, str, str] | None:
    """(base_url, model, key) from JUDGE_BASE_URL / JUDGE_MODEL / JUDGE_API_KEY, or None with a message."""
    env = {k: os.environ.get(k, "") for k in ("JUDGE_BASE_URL", "JUDGE_MODEL", "JUDGE_API_KEY")}
    missing = [k for k, v in env.items() if not v]
    if missing:
        print(f"LLM judge skipped: set {', '.join(missing)} (an OpenAI-compatible endpoint); offline metrics still run")
        return None
    return env["JUDGE_BASE_URL"].rstrip("/"), env["JUDGE_MODEL"], env["JUDGE_API_KEY"]


def llm_judge(source: Image.Image, edited: Image.Image, instruction: str, conf: tuple[str, str, str],
              timeout: float = 60.0) -> dict:
    """Ask the judge model for the two 0-10 scores; score = min(success, minimal) as in the paper."""
    base_url, model, key = conf
    body = {"model": model, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": LLM_JUDGE_PROMPT.format(instruction=instruction)},
        {"type": "image_url", "image_url": {"url": _data_url(source)}},
        {"type": "image_url", "image_url": {"url": _data_url(edited)}}]}]}
    req = urllib.request.Request(f"{base_url}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = json.load(r)["choices"][0]["message"]["content"]
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        raise ValueError(f"LLM judge answered without JSON: {text[:200]!r}")
    s = json.loads(m.group(0))
    succ, mini = float(s["editing_success"]), float(s["minimal_editing"])
    return {"llm_success": succ, "llm_minimal": mini, "llm_score": min(succ, mini)}


def _ngrams(words, n):
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu(hypotheses: list[str], references: list[str], max_n: int = 4) -> float:
    """Corpus BLEU-4 (Papineni et al.): clipped n-gram precisions, geometric mean, brevity penalty; 0-1."""
    match, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for h, r in zip(hypotheses, references):
        hw, rw = h.lower().split(), r.lower().split()
        hyp_len, ref_len = hyp_len + len(hw), ref_len + len(rw)
        for n in range(1, max_n + 1):
            hc, rc = _ngrams(hw, n), _ngrams(rw, n)
            match[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            total[n - 1] += max(0, len(hw) - n + 1)
    if min(match) == 0 or hyp_len == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(log_p)


def rouge_l(hypotheses: list[str], references: list[str]) -> float:
    """Mean sentence ROUGE-L F1 (longest common subsequence of words); 0-1."""
    scores = []
    for h, r in zip(hypotheses, references):
        hw, rw = h.lower().split(), r.lower().split()
        if not hw or not rw:
            scores.append(0.0)
            continue
        prev = [0] * (len(rw) + 1)
        for a in hw:  # LCS by dynamic programming, one row at a time
            cur = [0]
            for j, b in enumerate(rw):
                cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
            prev = cur
        lcs = prev[-1]
        p, rc = lcs / len(hw), lcs / len(rw)
        scores.append(0.0 if lcs == 0 else 2 * p * rc / (p + rc))
    return sum(scores) / max(1, len(scores))
