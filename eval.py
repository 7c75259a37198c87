"""Evaluation: action-centric image editing (Aurora-Bench protocol, paper Sec. 4) and dynamics-model text metrics.

World model: for every benchmark item the WM (optionally with DM-verified best-of-N, search.py) edits the source
image following the instruction. Scores per subset (`task`):
- synthetic world: the programmatic judge of world.py reads the generated image back into a symbolic scene and
  gives two 0-10 scores, editing success and minimal editing; the per-sample score is their min, averaged per
  subset: the paper's GPT-4o protocol with a judge that cannot be fooled. Plus pixel L1 to the target.
- real Aurora-Bench: pixel L1, and optionally an LLM judge through an OpenAI-compatible HTTP API asked the paper's
  two questions (prompt below); set JUDGE_BASE_URL, JUDGE_MODEL and JUDGE_API_KEY. Without them the LLM columns
  are skipped with a message and the offline metrics still run. Items without `output` are generated, not scored.
Every table has the copy-the-source baseline (must score 0 success) and the ground truth (the real target, and the
target passed through the VQ tokenizer: the best a WM that writes VQ tokens can do).

Dynamics model: exact action match (synthetic world: the judge checks that the target is a valid outcome of the
predicted action, so paraphrases count), and BLEU-4 / ROUGE-L against the reference text (both implemented below).

Run:  python eval.py --wm=out/wm/ckpt --data=out/data/test.json [--dm=out/dm/ckpt --n=4] [--llm_judge=true]
      python eval.py --dm=out/dm/ckpt --data=out/data/test.json --task=dm
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from common import UserError, arg, atomic_write, claim_dir, run
from search import MAX_N
from train import encode_images, load_items, load_model, load_tokenizers, parse_config
from train_dynamics import predict_actions

# ----------------------------------------------------------------------------------------------------------------
# Image grids a person can look at


def _as_pil(x, scale: int) -> Image.Image:
    from tokenizer import to_pil

    img = x.convert("RGB") if isinstance(x, Image.Image) else to_pil(x)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_grid(rows: list[list], labels: list[list[str]] | None, path: str, title: str | None = None,
              row_titles: list[str] | None = None, scale: int = 0):
    """Write a PNG grid: rows of images (PIL or (3, H, W) tensors in [-1, 1]) with a caption under each image and an
    optional text line above each row (e.g. the action). Small images are enlarged (nearest) to be readable."""
    first = rows[0][0]
    h = first.height if isinstance(first, Image.Image) else first.shape[-2]
    scale = scale or max(1, 128 // h)
    cells = [[_as_pil(x, scale) for x in row] for row in rows]
    cw, ch = max(c.width for r in cells for c in r), max(c.height for r in cells for c in r)
    cap, head, pad = 14, (14 if row_titles else 0), 4
    top = 18 if title else 0
    W = pad + max(len(r) for r in cells) * (cw + pad)
    H = top + len(cells) * (head + ch + cap + pad) + pad
    canvas = Image.new("RGB", (max(W, 200), H), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 3), title[:160], fill="black")
    y = top + pad
    for r, row in enumerate(cells):
        if row_titles:
            draw.text((pad, y), row_titles[r][:160], fill="black")
        for c, img in enumerate(row):
            x = pad + c * (cw + pad)
            canvas.paste(img, (x, y + head))
            if labels and labels[r][c]:
                draw.text((x, y + head + ch + 1), labels[r][c][: max(4, cw // 6)], fill="black")
        y += head + ch + cap + pad
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def save_triplet_grid(items, samples: torch.Tensor, path: str, extra: dict[str, torch.Tensor] | None = None):
    """One row per item: source | generated sample(s) | target, with the instruction above the row."""
    from tokenizer import preprocess_image

    size = samples.shape[-1]
    rows, labels = [], []
    for i, it in enumerate(items):
        row = [preprocess_image(it.input_path, size), samples[i]]
        lab = ["source", "sample"]
        for name, imgs in (extra or {}).items():
            row.append(imgs[i])
            lab.append(name)
        if it.output_path:
            row.append(preprocess_image(it.output_path, size))
            lab.append("target")
        rows.append(row)
        labels.append(lab)
    save_grid(rows, labels, path, row_titles=[it.instruction for it in items])


# ----------------------------------------------------------------------------------------------------------------
# Scoring generated images


def pixel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two images in [-1, 1], reported on the 0-1 pixel scale like the paper's L1."""
    return ((a.float() - b.float()).abs().mean() / 2).item()


def write_jsonl(path: str, records: list[dict]):
    """Per-item results, one JSON object a line (what paired statistics are computed from)."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))


def item_scores(items, images: torch.Tensor) -> list[dict]:
    """Score generated images (N, 3, H, W) one item at a time: the world judge's success, minimal and score (min of
    the two) where the item carries its symbolic action, pixel L1 where it has a target. One record per item, with
    its id, subset (`task`) and action class (`verb`), so that contrasts can be paired item by item."""
    from tokenizer import preprocess_image, to_pil

    size = images.shape[-1]
    records = []
    for it, img in zip(items, images):
        r = {"id": it.id, "task": it.task, "verb": it.extra.get("verb")}
        if world_judgeable(it):
            r.update({k: v for k, v in world_judge(it, to_pil(img)).items() if k in ("success", "minimal", "score")})
        if it.output_path:
            r["l1"] = pixel_l1(img, preprocess_image(it.output_path, size))
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
    import world

    return world.judge_item(item.extra, image)


def aggregate(per_item: list[dict]) -> dict:
    """Mean of each numeric key over items."""
    keys = {k for d in per_item for k in d}
    return {k: sum(d[k] for d in per_item if k in d) / max(1, sum(k in d for d in per_item)) for k in keys}


# ----------------------------------------------------------------------------------------------------------------
# Optional LLM judge (the paper's GPT-4o protocol) through any OpenAI-compatible chat-completions endpoint

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


# ----------------------------------------------------------------------------------------------------------------
# Text metrics for the dynamics model (no extra package)


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


def eval_dm(dm, tok, items, codes) -> tuple[dict, list[dict]]:
    """Greedy DM actions for labelled pairs: accuracy (world judge where possible, else exact text), BLEU, ROUGE-L.
    Returns (metrics, per-item records: id, prediction, correct)."""
    from train_dynamics import normalise_action

    items = [it for it in items if it.output_path]
    src = torch.stack([codes[str(it.input_path)][0] for it in items])
    tgt = torch.stack([codes[str(it.output_path)][0] for it in items])
    pred = predict_actions(dm, tok, src, tgt)
    refs = [it.instruction for it in items]
    hits = []
    for p, it in zip(pred, items):
        if world_judgeable(it):
            import world

            src, tgt = world.Scene.from_json(it.extra["src_scene"]), world.Scene.from_json(it.extra["tgt_scene"])
            hits.append(world.consistent(src, world.parse_action(p), tgt))  # any paraphrase of a valid action
        else:
            hits.append(normalise_action(p) == normalise_action(it.instruction))
    metrics = {"action_acc": sum(hits) / max(1, len(hits)), "bleu": bleu(pred, refs), "rougeL": rouge_l(pred, refs),
               "n": len(items)}
    return metrics, [{"id": it.id, "prediction": p, "correct": int(h)} for it, p, h in zip(items, pred, hits)]


# ----------------------------------------------------------------------------------------------------------------
# World-model evaluation over a benchmark, per subset


@torch.no_grad()
def eval_wm(wm, tok, image_tok, items, codes, dm=None, n: int = 1, seed: int = 0, temperature: float = 1.0,
            top_k: int | None = None, cfg_scale: float | None = None, llm: tuple | None = None):
    """Edit every item with the WM (best-of-n verified by `dm` when n > 1). Returns ({task: metrics}, images,
    per-item records (item_scores))."""
    from search import best_of_n
    from train_world import generate_targets

    g = torch.Generator().manual_seed(seed)
    src = torch.stack([codes[str(it.input_path)][0] for it in items])
    actions = [it.instruction for it in items]
    if n > 1:
        if dm is None:
            raise ValueError("best-of-n (n > 1) needs a dynamics model as the verifier")
        cands, _ = best_of_n(wm, dm, tok, src, actions, n, temperature, top_k, cfg_scale, g)
        best = cands[:, 0]
    else:
        best = generate_targets(wm, tok, src, actions, 1, temperature, top_k, cfg_scale=cfg_scale, generator=g)[:, 0]
    images = image_tok.decode(best)  # (N, 3, H, W)
    records = item_scores(items, images)
    return score_by_task(items, images, llm, records), images, records


@torch.no_grad()
def eval_search_controls(wm, dm, tok, image_tok, items, codes, n: int, seed: int = 0,
                         temperature: float = 1.0, records: bool = False):
    """Best-of-N with controls: n candidates per item (in sampling order) with, for each, the DM verifier's score
    log p_DM(action | source, candidate), the WM's own log-likelihood of it, and the judge's score. Any picker and
    any N <= n can then be evaluated on the same candidates: the first k candidates are a best-of-k sample.
    With `records`, returns (that list, every candidate's item_scores record [item][candidate]): best-of-k for
    every k from this one pool (reproduce.py), instead of sampling a pool per k."""
    from search import scored_candidates
    from train_world import score_targets

    g = torch.Generator().manual_seed(seed)
    src = torch.stack([codes[str(it.input_path)][0] for it in items])  # (B, L)
    actions = [it.instruction for it in items]
    cands, dm_score = scored_candidates(wm, dm, tok, src, actions, n, temperature, generator=g)  # (B, n, L), (B, n)
    B, _, L = cands.shape
    flat = cands.view(B * n, L)  # (B*n, L)
    flat_act = [a for a in actions for _ in range(n)]
    wm_score = score_targets(wm, tok, src.repeat_interleave(n, 0), flat, flat_act).view(B, n)
    judged = item_scores([it for it in items for _ in range(n)], image_tok.decode(flat))
    controls = [{"id": it.id, "dm": dm_score[i].tolist(), "wm": wm_score[i].tolist(),
                 "judge": [judged[i * n + k].get("score") for k in range(n)]} for i, it in enumerate(items)]
    return (controls, [judged[i * n : (i + 1) * n] for i in range(len(items))]) if records else controls


def score_by_task(items, images, llm=None, records: list[dict] | None = None) -> dict:
    """{task: metrics} plus "all" (mean over scored items); `records`: item_scores of these images, if known."""
    records = item_scores(items, images) if records is None else records
    by_task = defaultdict(list)
    for i, it in enumerate(items):
        by_task[it.task].append(i)
    out = {}
    for task, idx in sorted(by_task.items()):
        out[task] = judge_items([records[i] for i in idx])
        if llm is not None:
            from tokenizer import preprocess_image, to_pil

            scored = [i for i in idx if items[i].output_path]
            res = [llm_judge(to_pil(preprocess_image(items[i].input_path, images.shape[-1])), to_pil(images[i]),
                             items[i].instruction, llm) for i in scored]
            out[task].update({k: v for k, v in aggregate(res).items()})
    out["all"] = judge_items(records)
    return out


def baselines(items, codes, image_tok, size: int) -> dict:
    """Copy-the-source, ground-truth target, and ground truth through the VQ tokenizer (the WM's ceiling)."""
    from tokenizer import preprocess_image

    scored = [it for it in items if it.output_path]
    if not scored:  # generation-only items: nothing to compare with
        return {}
    copy = torch.stack([preprocess_image(it.input_path, size) for it in scored])
    truth = torch.stack([preprocess_image(it.output_path, size) for it in scored])
    vq = image_tok.decode(torch.stack([codes[str(it.output_path)][0] for it in scored]))
    return {name: score_by_task(scored, imgs) for name, imgs in
            (("copy source", copy), ("ground truth", truth), ("ground truth (VQ)", vq))}


def markdown_table(rows: dict[str, dict], columns: list[str], digits: int = 2) -> str:
    """{row name: {column: value}} -> a Markdown table; missing values print as '-'."""
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, vals in rows.items():
        cells = [f"{vals[c]:.{digits}f}" if isinstance(vals.get(c), (int, float)) else str(vals.get(c, "-"))
                 for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class EvalConfig:
    task: str = arg("wm", ("wm", "dm"))  # "wm" (image editing) or "dm" (action prediction text metrics)
    data: str = arg("out/data/test.json", "required")  # benchmark JSON(s) in Aurora-Bench form, comma-separated
    tokenizer_dir: str = "out/tok"  # image + text tokenizers
    wm: str = ""  # world model checkpoint folder (task=wm)
    dm: str = ""  # dynamics model checkpoint folder (task=dm, or the verifier when n > 1)
    n: int = arg(1, f"1..{MAX_N}")  # best-of-n candidates verified by the DM (1 = plain WM)
    temperature: float = arg(1.0, ">=0")  # WM sampling temperature
    top_k: int = arg(0, ">=0")  # WM top-k (0 = off)
    cfg_scale: float = arg(0.0, ">=0")  # classifier-free guidance (0 = off)
    image_size: int = arg(32, ">0")  # preprocessing size before VQ encoding (512 for Chameleon/Anole)
    llm_judge: bool = False  # also ask an OpenAI-compatible LLM judge (env JUDGE_BASE_URL, JUDGE_MODEL, JUDGE_API_KEY)
    seed: int = arg(0, ">=0")  # sampling seed
    out: str = arg("out/eval", "required")  # where the grid PNG and results.json go


def main(argv=None):
    cfg = parse_config(EvalConfig, argv, description="Score a world model (or a dynamics model) on a benchmark.")
    needed = {"dm": ["dm"], "wm": ["wm"] + (["dm"] if cfg.n > 1 else [])}[cfg.task]
    if missing := [k for k in needed if not getattr(cfg, k)]:
        raise UserError(f"--task={cfg.task}" + (f" --n={cfg.n}" if cfg.n > 1 else "") + f" needs --{missing[0]}")
    image_tok, tok = load_tokenizers(cfg.tokenizer_dir)
    items = load_items(cfg.data)
    if cfg.task == "dm" and not (items := [it for it in items if it.output_path]):
        raise UserError(f"{cfg.data}: no item has an 'output' image, so there is nothing to predict an action for")
    paths = [p for it in items for p in (it.input_path, it.output_path) if p]
    codes = encode_images(image_tok, paths, cfg.image_size)
    claim_dir(cfg.out, "eval.py", ours=("results.json",))
    if cfg.task == "dm":
        dm, _ = load_model(cfg.dm, role="dm", image_size=cfg.image_size)
        results, records = eval_dm(dm, tok, items, codes)
        print(markdown_table({"dynamics model": results}, ["action_acc", "bleu", "rougeL", "n"]))
        write_jsonl(os.path.join(cfg.out, "items.jsonl"), records)
    else:
        wm, _ = load_model(cfg.wm, role="wm", image_size=cfg.image_size)
        dm = load_model(cfg.dm, role="dm", image_size=cfg.image_size)[0] if cfg.n > 1 else None
        llm = llm_judge_config() if cfg.llm_judge else None
        res, images, records = eval_wm(wm, tok, image_tok, items, codes, dm, cfg.n, cfg.seed, cfg.temperature,
                                       cfg.top_k or None, cfg.cfg_scale or None, llm)
        write_jsonl(os.path.join(cfg.out, "items.jsonl"), records)
        base = baselines(items, codes, image_tok, cfg.image_size)
        cols = ["score", "success", "minimal", "l1"] + (["llm_score"] if llm else [])
        for task in res:
            rows = {f"WM (n={cfg.n})": res[task], **{k: v.get(task, {}) for k, v in base.items()}}
            print(f"\n### {task}\n" + markdown_table(rows, cols))
        save_triplet_grid(items[:8], images[:8], os.path.join(cfg.out, "samples.png"))
        results = {"wm": res, "baselines": base}
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"results -> {os.path.join(cfg.out, 'results.json')}")


if __name__ == "__main__":
    run(main)
