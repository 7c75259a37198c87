"""Evaluation: action-centric image editing (Aurora-Bench protocol, paper Sec. 4) and dynamics-model text metrics.

World model: for every benchmark item the WM (optionally with DM-verified best-of-N, search.py) edits the source
image following the instruction, scored per subset (`task`) by metrics.py: the world's judge (synthetic world), or
pixel L1 and the optional LLM judge (real Aurora-Bench).
Without JUDGE_BASE_URL, JUDGE_MODEL and JUDGE_API_KEY the LLM columns are skipped with a message and the offline
metrics still run. Items without `output` are generated, not scored.
Every table has the copy-the-source baseline (must score 0 success) and the ground truth (the real target, and the
target passed through the VQ tokenizer: the best a WM that writes VQ tokens can do).

Dynamics model: exact action match (synthetic world: the judge checks that the target is a valid outcome of the
predicted action, so paraphrases count), and BLEU-4 / ROUGE-L against the reference text (metrics.py).

Run:  python eval.py --wm=out/wm/ckpt --data=out/data/test.json [--dm=out/dm/ckpt --n=4] [--llm_judge=true]
      python eval.py --dm=out/dm/ckpt --data=out/data/test.json --task=dm
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass

import torch

import world
from checkpoint import inference_device, load_model
from common import UserError, arg, atomic_write, check_dir, claim_dir, run
from data import load_items, open_image, preprocess_image, to_pil
from draw import save_triplet_grid
from metrics import aggregate, bleu, item_scores, judge_items, llm_judge, llm_judge_config, rouge_l, world_judgeable
from search import MAX_N, best_of_n, scored_candidates
from train import encode_images, load_tokenizers, parse_config
from train_dynamics import normalise_action, predict_actions
from train_world import generate_targets, recognition_weights, score_targets


def write_jsonl(path: str, records: list[dict]):
    """Per-item results, one JSON object a line (what paired statistics are computed from)."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))


def eval_dm(dm, tok, items, codes, temperature: float = 0.0, seed: int = 0, max_batch: int = 0) -> tuple[dict, list]:
    """DM actions for labelled pairs (greedy, or sampled at `temperature` > 0): accuracy (world judge where possible,
    else exact text), BLEU, ROUGE-L. Returns (metrics, per-item records: id, prediction, correct)."""
    items = [it for it in items if it.output_path]
    src = torch.stack([codes[str(it.input_path)][0] for it in items])
    tgt = torch.stack([codes[str(it.output_path)][0] for it in items])
    g = torch.Generator().manual_seed(seed)
    pred = predict_actions(dm, tok, src, tgt, temperature, generator=g, batch=max_batch)
    refs = [it.instruction for it in items]
    hits = []
    for p, it in zip(pred, items):
        if world_judgeable(it):
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
            top_k: int | None = None, cfg_scale: float | None = None, llm: tuple | None = None, max_batch: int = 0):
    """Edit every item with the WM (best-of-n verified by `dm` when n > 1), max_batch sequences at once (0:
    checkpoint.auto_batch). Returns ({task: metrics}, images, per-item records (item_scores))."""
    g = torch.Generator().manual_seed(seed)
    src = torch.stack([codes[str(it.input_path)][0] for it in items])
    actions = [it.instruction for it in items]
    if n > 1:
        if dm is None:
            raise ValueError("best-of-n (n > 1) needs a dynamics model as the verifier")
        cands, _ = best_of_n(wm, dm, tok, src, actions, n, temperature, top_k, cfg_scale, g, max_batch=max_batch)
        best = cands[:, 0]
    else:
        best = generate_targets(wm, tok, src, actions, 1, temperature, top_k, cfg_scale=cfg_scale, generator=g,
                                max_batch=max_batch)[:, 0]
    images = image_tok.decode(best)  # (N, 3, H, W)
    records = item_scores(items, images, image_tok.pad_colour)
    return score_by_task(items, images, llm, records, image_tok.pad_colour), images, records


@torch.no_grad()
def eval_search_controls(wm, dm, tok, image_tok, items, codes, n: int, seed: int = 0,
                         temperature: float = 1.0, records: bool = False, max_batch: int = 0):
    """Best-of-N with controls: n candidates per item (in sampling order) with, for each, the DM verifier's score
    log p_DM(action | source, candidate), the WM's own log-likelihood of it, and the judge's score. Any picker and
    any N <= n can then be evaluated on the same candidates: the first k candidates are a best-of-k sample.
    With `records`, returns (that list, every candidate's item_scores record [item][candidate]): best-of-k for
    every k from this one pool (reproduce.py), instead of sampling a pool per k. max_batch: as eval_wm's."""
    g = torch.Generator().manual_seed(seed)
    src = torch.stack([codes[str(it.input_path)][0] for it in items])  # (B, L)
    actions = [it.instruction for it in items]
    cands, dm_score = scored_candidates(wm, dm, tok, src, actions, n, temperature, generator=g,
                                        max_batch=max_batch)  # (B, n, L), (B, n)
    B, _, L = cands.shape
    flat = cands.view(B * n, L)  # (B*n, L)
    flat_act = [a for a in actions for _ in range(n)]
    wm_score = score_targets(wm, tok, src.repeat_interleave(n, 0), flat, flat_act, max_batch).view(B, n)
    judged = item_scores([it for it in items for _ in range(n)], image_tok.decode(flat), image_tok.pad_colour)
    controls = [{"id": it.id, "dm": dm_score[i].tolist(), "wm": wm_score[i].tolist(),
                 "judge": [judged[i * n + k].get("score") for k in range(n)]} for i, it in enumerate(items)]
    return (controls, [judged[i * n : (i + 1) * n] for i in range(len(items))]) if records else controls


def score_by_task(items, images, llm=None, records: list[dict] | None = None, pad=None) -> dict:
    """{task: metrics} plus "all" (mean over scored items); `records`: item_scores of these images, if known; `pad`:
    as item_scores."""
    records = item_scores(items, images, pad) if records is None else records
    by_task = defaultdict(list)
    for i, it in enumerate(items):
        by_task[it.task].append(i)
    out = {}
    for task, idx in sorted(by_task.items()):
        out[task] = judge_items([records[i] for i in idx])
        if llm is not None:
            scored = [i for i in idx if items[i].output_path]
            res = [llm_judge(to_pil(preprocess_image(items[i].input_path, images.shape[-1], pad)), to_pil(images[i]),
                             items[i].instruction, llm) for i in scored]
            out[task].update({k: v for k, v in aggregate(res).items()})
    out["all"] = judge_items(records)
    return out


def baselines(items, codes, image_tok, size: int) -> dict:
    """Copy-the-source, ground-truth target, and ground truth through the VQ tokenizer (the WM's ceiling)."""
    scored = [it for it in items if it.output_path]
    if not scored:  # generation-only items: nothing to compare with
        return {}
    copy = torch.stack([preprocess_image(it.input_path, size, image_tok.pad_colour) for it in scored])
    truth = torch.stack([preprocess_image(it.output_path, size, image_tok.pad_colour) for it in scored])
    vq = image_tok.decode(torch.stack([codes[str(it.output_path)][0] for it in scored]))
    return {name: score_by_task(scored, imgs, pad=image_tok.pad_colour) for name, imgs in
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
    threads: int = arg(1, ">=0")  # torch intra-op CPU threads (0 = torch's default, one per core; as train.py's)
    max_batch: int = arg(0, ">=0")  # sequences sampled or scored at once (0 = as many as the device's free memory
    # holds, at most 64: checkpoint.auto_batch; the sampled draws depend on it, so fix it to compare machines)
    out: str = arg("out/eval", "required")  # where the grid PNG and results.json go
    force: bool = False  # write into --out although worldboot did not create it (replacing its files of our names)


def main(argv=None):
    cfg = parse_config(EvalConfig, argv, description="Score a world model (or a dynamics model) on a benchmark.")
    needed = {"dm": ["dm"], "wm": ["wm"] + (["dm"] if cfg.n > 1 else [])}[cfg.task]
    if missing := [k for k in needed if not getattr(cfg, k)]:
        raise UserError(f"--task={cfg.task}" + (f" --n={cfg.n}" if cfg.n > 1 else "") + f" needs --{missing[0]}")
    check_dir(cfg.out, force=cfg.force)  # before the long work: a folder not ours, or another run's, is refused
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    image_tok, tok = load_tokenizers(cfg.tokenizer_dir, inference_device())
    items = load_items(cfg.data)
    if cfg.task == "dm" and not (items := [it for it in items if it.output_path]):
        raise UserError(f"{cfg.data}: no item has an 'output' image, so there is nothing to predict an action for")
    paths = [p for it in items for p in (it.input_path, it.output_path) if p]
    codes = encode_images(image_tok, paths, cfg.image_size)
    dm = load_model(cfg.dm, role="dm", image_size=cfg.image_size, tok=tok)[0] if "dm" in needed else None
    wm = load_model(cfg.wm, role="wm", image_size=cfg.image_size, tok=tok)[0] if cfg.task == "wm" else None
    claim_dir(cfg.out, "eval.py", force=cfg.force)  # the inputs are good: now --out is written
    if cfg.task == "dm":
        results, records = eval_dm(dm, tok, items, codes, max_batch=cfg.max_batch)
        print(markdown_table({"dynamics model": results}, ["action_acc", "bleu", "rougeL", "n"]))
        write_jsonl(os.path.join(cfg.out, "items.jsonl"), records)
    else:
        llm = llm_judge_config() if cfg.llm_judge else None
        res, images, records = eval_wm(wm, tok, image_tok, items, codes, dm, cfg.n, cfg.seed, cfg.temperature,
                                       cfg.top_k or None, cfg.cfg_scale or None, llm, cfg.max_batch)
        write_jsonl(os.path.join(cfg.out, "items.jsonl"), records)
        base = baselines(items, codes, image_tok, cfg.image_size)
        cols = ["score", "success", "minimal", "l1"] + (["llm_score"] if llm else [])
        for task in res:
            rows = {f"WM (n={cfg.n})": res[task], **{k: v.get(task, {}) for k, v in base.items()}}
            print(f"\n### {task}\n" + markdown_table(rows, cols))
        save_triplet_grid(items[:8], images[:8], os.path.join(cfg.out, "samples.png"))
        results = {"wm": res, "baselines": base}
    atomic_write(os.path.join(cfg.out, "results.json"), json.dumps(results, indent=1))
    print(f"results -> {os.path.join(cfg.out, 'results.json')}")


# ----------------------------------------------------------------------------------------------------------------
# reproduce.py's measurements: best-of-N from one pool, the VQ tokens' locality, the DM's pseudo-labels


def best_of_pool(items, controls: list[dict], judged: list[list[dict]], ns: list[int]) -> tuple[dict, dict]:
    """Best-of-N for every N in ns from one candidate pool (eval.eval_search_controls with records): per item, the
    candidate with the highest DM score among the first N (the first on ties, as report.pick). Returns ({N: metrics
    per task}, {N: per-item records}), keyed by str(N) as the report reads them."""
    metrics, records = {}, {}
    for n in ns:
        best = [cands[c["dm"][:n].index(max(c["dm"][:n]))] for c, cands in zip(controls, judged)]
        metrics[str(n)], records[str(n)] = score_by_task(items, None, records=best), best
    return metrics, records


def token_locality(items, cache) -> dict:
    """How local the VQ tokens are, on labelled pairs. An edit changes one or two cells; `unchanged_code_kept` is the
    fraction of the tokens in the *other* cells whose code stays the same (1.0 = a perfectly
    local tokenizer: the WM could copy them). `eq2_changed` / `eq2_unchanged`: mean Eq. 2 weight (mean 1 per image,
    no mix) on tokens of cells whose content changed / did not."""
    kept = same = 0
    w_changed, w_unchanged = [], []
    for it in items:
        s, t = world.Scene.from_json(it.extra["src_scene"]), world.Scene.from_json(it.extra["tgt_scene"])
        (cs, fs), (ct, ft) = cache[str(it.input_path)], cache[str(it.output_path)]
        side, grid = math.isqrt(len(cs)), it.extra.get("grid", world.GRID)  # tokens per image side, cells per side
        w = recognition_weights(fs, ft)
        for i in range(len(cs)):
            r, c = divmod(i, side)
            cell = (r * grid // side, c * grid // side)  # the grid cell this token lies in
            if s.at(cell) == t.at(cell):
                same += 1
                kept += int(cs[i] == ct[i])
                w_unchanged.append(float(w[i]))
            else:
                w_changed.append(float(w[i]))
    mean = lambda v: sum(v) / len(v) if v else float("nan")
    return {"unchanged_code_kept": kept / max(1, same), "eq2_changed": mean(w_changed),
            "eq2_unchanged": mean(w_unchanged)}


def pseudo_label_quality(records: list[dict], kept: list[dict], max_shift: float = 0.0) -> dict:
    """Where the truth exists (our world): a DM label is correct when the target frame is a valid outcome of the
    labelled action from the source frame (the judge reads both frames back from pixels)."""
    def correct(r):
        src, tgt = (world.parse(open_image(r[k]), max_shift=max_shift) for k in ("input", "output"))
        return world.consistent(src, world.parse_action(r["action"]), tgt)

    ok_all = [correct(r) for r in records]
    ok_kept = [correct(r) for r in kept]
    return {"pairs": len(records), "kept": len(kept), "acc_before": sum(ok_all) / max(1, len(ok_all)),
            "acc_after": sum(ok_kept) / max(1, len(ok_kept))}


if __name__ == "__main__":
    run(main)
