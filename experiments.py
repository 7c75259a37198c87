"""The stages reproduce.py runs beside the paper's main line: the premise's foundation stages, the choice of Eq. 2's
reading, the pictures.

- the settings of a run (train_cfg) and of the foundation stages (foundation);
- the premise (docs/premise.md): the image-head stage (Anole's repair of image output), the foundation report card
  of the model fine-tuning starts from, and the label arms (the synthetic data relabelled by the world's hidden
  actions and by a permutation of the DM's labels);
- the reading of Eq. 2 (Sec. 3.2, the recognition-weighted loss) chosen on the validation split (--eq2_select), and
  the chosen candidate's checkpoint reused as the labelled + weighted WM;
- the motion of each test edit on the WM records (Table 3 by motion), and the example pictures (Sec. 3.3's best-of-N).

Each takes reproduce.py's config, and `stages` / `jobs` are reproduce.Stages / reproduce.Jobs (a replicate's
results cache and its worker processes, runner.py's machinery).
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import torch

import arms
import runner
from checkpoint import has_checkpoint
from common import UserError, atomic_dir, atomic_write, claim_dir
from data import load_items, preprocess_image
from draw import save_grid
from eval import eval_wm
from foundation import loss_targets, report_card
from runner import log, run_training
from search import best_of_n
from train import TrainConfig, encode_images, pretrain_examples
from train_world import generate_targets, wm_examples

# ----------------------------------------------------------------------------------------------------------------
# The settings of a run


def foundation(cfg):
    """The settings of the VQGAN and the pre-training: --dtype replaced by the resolved --foundation_dtype."""
    return dataclasses.replace(cfg, dtype=cfg.own_foundation_dtype or cfg.dtype)


def train_cfg(cfg, name: str, task: str, steps: int, seed: int, **kw) -> TrainConfig:
    """train.TrainConfig of the run `name` (its folder in cfg.out) under reproduce.py's settings: with --lora_r, the DM
    and the WMs train LoRA adapters at their own learning rate; `kw`: the task's own fields (weighting, init, ...)."""
    lora = dict(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha) if cfg.lora_r and task in ("dm", "wm") else {}
    lora_lr = (cfg.lora_lr_wm if task == "wm" else 0.0) or cfg.lora_lr or cfg.lr
    return TrainConfig(task=task, out_dir=os.path.join(cfg.out, name), steps=steps, batch_size=cfg.batch_size,
                       lr=lora_lr if lora else cfg.lr, warmup=max(1, steps // 10), **lora, seed=seed, eval_every=0,
                       save_every=max(50, steps // 4), resume=True, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                       dtype=cfg.dtype, threads=cfg.threads, **kw)


# ----------------------------------------------------------------------------------------------------------------
# The premise's foundation stages (docs/premise.md) and its label arms


def foundation_folder(cfg) -> str:
    """The model every DM and WM starts from: the pre-trained one, or after it the image-head stage's."""
    return "image_head" if cfg.image_head_steps else "pretrain"


def image_head(cfg, stages, pretrained, data: dict, tok, device, r: int):
    """3b. --image_head_steps: Anole's repair of image output: only lm_head's image rows train (train.py
    --task=image_head), on the first --image_head_items captions drawn (caption -> image), everything else frozen.
    Returns (the model to fine-tune from, the stage's loss tokens or None)."""
    if not cfg.image_head_steps:
        return pretrained, None
    ex = pretrain_examples(data["captions"][: cfg.image_head_items], data["cache"], tok, 1.0)
    hcfg = train_cfg(foundation(cfg), "image_head", "image_head", cfg.image_head_steps, seed=2000 + r)
    model, _ = run_training(cfg, stages, "image_head", hcfg, ex, tok, device,
                            init=os.path.join(cfg.out, "pretrain", "ckpt"))
    return model, sum(w for _, w in loss_targets(ex))


def foundation_card(cfg, stages, model, tok, image_tok, data: dict, examples,
                    head_tokens) -> dict:
    """The foundation report card (foundation.report_card) of the model fine-tuning starts from, on the validation
    items, before any fine-tuning: zero-shot captioning and drawing, pre-training's generation share and how much
    of the train instructions' text it had as targets. Cached like every stage."""
    card = stages.get("card")
    if card is None:
        model.config.mask_image_logits = False  # it draws as well as writes (captions are restricted to text ids)
        card = report_card(model, tok, image_tok, data["val"], data["cache"], examples,
                           [it.instruction for it in data["train"]], seed=0, temperature=cfg.temperature)
        card = stages.put("card", {**card, **({"image_head_tokens": head_tokens} if head_tokens else {})})
    return card


def label_arms(cfg, r: int, jobs, paths: dict, data: dict, image_tok, tok, wcfg) -> dict:
    """--label_arms: WMs trained like "labelled + synthetic" (plain CE) on the labelled triplets plus the same kept
    video pairs relabelled by the world's hidden actions (oracle) and by a seeded permutation of the DM's labels
    (shuffled) (arms.py), each scored on test like the other WMs. Returns {arm: {wm, items, written}}."""
    syn, cache, test = os.path.join(cfg.out, "synthetic.json"), data["cache"], data["test"]
    written = {"oracle": arms.write_oracle(syn, paths["videos_hidden"], os.path.join(cfg.out, "arms", "oracle.json")),
               "shuffled": arms.write_shuffled(syn, os.path.join(cfg.out, "arms", "shuffled.json"), seed=r)}
    started = {}
    for arm, w in written.items():
        items = load_items(w["path"])
        encode_images(image_tok, [p for it in items for p in (it.input_path, it.output_path)], wcfg.image_size,
                      cache=cache)
        started[arm] = jobs.start(f"wm_{arm}", train_cfg(cfg, f"wm_{arm}", "wm", cfg.ft_steps, r),
                                  wm_examples(data["train"] + items, cache, tok, seed=r))
    test_codes = {p: cache[p] for it in test for p in (str(it.input_path), str(it.output_path))}
    out = {}
    for arm, job in started.items():
        jobs.finish(job)
        metrics, records, _ = runner.eval_job(cfg, f"wm_{arm}", tok, jobs.device, test, test_codes, r, 0)
        out[arm] = {"wm": metrics, "items": records, "written": written[arm]}
        log(f"rep{r}: WM with {arm} labels: score {metrics['all'].get('score', float('nan')):.2f}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# The reading of Eq. 2, chosen on the validation split (--eq2_select); Table 3 by motion


def annotate_motion(S: list[dict], motion: dict):
    """Add `cells` and `distance` (world.motion of the item's source and target scenes) to every WM record, in place."""
    for r in S:
        for recs in r["items"]["wm"].values():
            for rec in recs:
                rec.update(motion.get(rec["id"], {}))


def parse_candidates(spec: str) -> list[tuple[str, float]]:
    """--eq2_select "image:0.5,batch:0" -> [("image", 0.5), ("batch", 0.0)]; UserError naming a bad entry."""
    out = []
    for c in spec.split(","):
        norm, _, mix = c.strip().partition(":")
        try:
            m = float(mix)
        except ValueError:
            m = -1.0
        if norm not in ("image", "batch") or not 0 <= m <= 1:
            raise UserError(f"--eq2_select: {c.strip()!r} is not norm:mix (norm image or batch, mix in [0, 1])")
        out.append((norm, m))
    return out


def select_eq2(cfg, stages, jobs, data: dict, tok, image_tok, seed: int, amp):
    """The validation-split choice of Eq. 2's reading (--eq2_select): each candidate (norm, mix) trains a WM as the
    "labelled + weighted" arm does (labelled triplets, the first seed, the same steps), is scored on the validation
    items only, and the best val score wins (ties: the first listed). Returns (cfg with that weight_norm and
    weight_mix, the evidence: every candidate's val metrics and per-item records)."""
    res = stages.get("eq2_select")
    if res is None:
        cands, started = parse_candidates(cfg.eq2_select), []
        for norm, mix in cands:  # side by side in the pool
            ex = wm_examples(data["train"], data["cache"], tok, weighting="recognition", mix=mix, seed=seed, norm=norm)
            tcfg = train_cfg(cfg, f"eq2_select/{norm}_{mix:g}", "wm", cfg.ft_steps, seed, weighting="recognition",
                             weight_mix=mix, weight_norm=norm)
            started.append(jobs.start(f"eq2_select_{norm}_{mix:g}", tcfg, ex))
        rows = []
        for (norm, mix), job in zip(cands, started):
            with amp:
                m, _, recs = eval_wm(jobs.finish(job)[0], tok, image_tok, data["val"], data["cache"], seed=seed,
                                     temperature=cfg.temperature)
            rows.append({"norm": norm, "mix": mix, **{k: m["all"][k] for k in ("score", "success", "minimal")},
                         "items": recs})
            log(f"eq2_select: {norm}:{mix} val score {m['all']['score']:.2f}")
        best = max(range(len(rows)), key=lambda i: (rows[i]["score"], -i))
        res = stages.put("eq2_select", {"seed": seed, "candidates": rows, "chosen": best})
    chosen = res["candidates"][res["chosen"]]
    return dataclasses.replace(cfg, weight_norm=chosen["norm"], weight_mix=chosen["mix"]), res


def reuse_winner(cfg, stages, res: dict, folder: str) -> None:
    """The chosen candidate of --eq2_select was trained exactly as this replicate's labelled + weighted WM is trained:
    the same examples, seed, steps and reading, no learning curve; only its folder differs (a slow test trains both
    and compares the bytes). So that WM (its folder: `folder`) becomes a copy of the candidate's checkpoint instead of
    a second training. Only into a folder that does not exist yet: anything else (a run interrupted before) trains as
    usual. Saves one WM's fine-tuning: 1,570 s of one core in the bf16 reference run (2-core Intel Xeon with AMX,
    laptop preset), about 13 of its 92.6 min of wall on 2 cores."""
    c = res["candidates"][res["chosen"]]
    src = os.path.join(cfg.out, "eq2_select", f"{c['norm']}_{c['mix']:g}")
    done, dst = stages.get(f"eq2_select_{c['norm']}_{c['mix']:g}"), os.path.join(cfg.out, folder)
    if done is None or os.path.exists(dst) or not has_checkpoint(os.path.join(src, "ckpt")):
        return
    claim_dir(dst, "reproduce.py")
    with atomic_dir(os.path.join(dst, "ckpt")) as tmp:
        for f in os.listdir(os.path.join(src, "ckpt")):
            shutil.copy2(os.path.join(src, "ckpt", f), tmp)
    shutil.copy2(os.path.join(src, "metrics.jsonl"), dst)  # its loss curve
    atomic_write(os.path.join(dst, "stage_hash.txt"), stages.hash(folder))
    stages.put(folder, {**done, "copied_from": os.path.relpath(src, cfg.out)})
    log(f"{folder}: the chosen candidate's checkpoint ({os.path.relpath(src, cfg.out)}), copied, not trained again")


# ----------------------------------------------------------------------------------------------------------------
# The pictures


def example_grids(cfg, ft_model, fdm_model, dm, tok, image_tok, items, cache, seed, n):
    """out/examples.png: source | C-FT | C-FDM | C-FDM best-of-n | target for a few test items of each verb, and
    out/search_example.png: the n ranked candidates of one item with their DM scores. `ft_model`, `fdm_model`: the
    C-FT and C-FDM WMs."""
    picks, seen = [], set()
    for it in items:
        if it.extra.get("verb") not in seen:
            seen.add(it.extra.get("verb"))
            picks.append(it)
    src = torch.stack([cache[str(it.input_path)][0] for it in picks])
    acts = [it.instruction for it in picks]
    g = torch.Generator().manual_seed(seed)
    ft = generate_targets(ft_model, tok, src, acts, generator=g)[:, 0]
    fdm = generate_targets(fdm_model, tok, src, acts, generator=g)[:, 0]
    cands, scores = best_of_n(fdm_model, dm, tok, src, acts, n, generator=g)
    dec = lambda c: image_tok.decode(c.to(next(image_tok.parameters()).device)).cpu()
    rows = [[preprocess_image(it.input_path, 32), a, b, c, preprocess_image(it.output_path, 32)]
            for it, a, b, c in zip(picks, dec(ft), dec(fdm), dec(cands[:, 0]))]
    save_grid(rows, [["source", "C-FT", "C-FDM", f"best of {n}", "target"]] * len(rows),
              os.path.join(cfg.out, "examples.png"), row_titles=acts)
    i = 0
    imgs = dec(cands[i])
    save_grid([[preprocess_image(picks[i].input_path, 32), *imgs]],
              [["source"] + [f"{s:.1f}" for s in scores[i].tolist()]], os.path.join(cfg.out, "search_example.png"),
              title=f"'{acts[i]}': C-FDM candidates ranked by log p_DM(action | source, candidate)")
