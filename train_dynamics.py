"""Fine-tune the dynamics model (DM): p(action | source image, target image). Paper Sec. 3.1 and App. H.

The DM reads two images and writes the action text that turns the first into the second ("inverse dynamics").
The paper's first finding is that this is far easier to learn than the world model; the DM then bootstraps the
world model as a labeller (bootstrap.py) and as a verifier (search.py). Both uses go through two functions here:
`predict_actions` (generate an action for a frame pair) and `score_actions` (log p(action | source, target)).

Sequence (the prompt template is ours; the paper does not publish one):
    <bos> <boi> source <eoi> <boi> target <eoi> " What action turns the first image into the second? Action:"
          " " action <eos>
Loss on the action tokens and <eos> only (the completion), as in the paper. The prompt has the same length for
every pair, so generation batches without padding.

Run:  python train_dynamics.py --data=out/data/train.json --val_data=out/data/val.json --init=out/pretrain/ckpt
"""

from __future__ import annotations

import torch

from checkpoint import auto_batch
from common import run
from model import generate_text
from train import (
    PRETRAIN_ONLY,
    WM_ONLY,
    TrainConfig,
    collate,
    image_segment,
    pack,
    parse_config,
    prepare_pairs,
    sequence_nll,
    train,
)

DM_PROMPT = " What action turns the first image into the second? Action:"


def dm_prompt(tok, src_codes, tgt_codes) -> list[int]:
    return [tok.bos_id, *image_segment(tok, src_codes), *image_segment(tok, tgt_codes), *tok.encode(DM_PROMPT)]


def dm_example(tok, src_codes, tgt_codes, action: str):
    """(ids, weights): weight 1 on the action tokens and <eos>, 0 on the prompt."""
    return pack([(dm_prompt(tok, src_codes, tgt_codes), 0), (tok.encode(" " + action.strip()) + [tok.eos_id], 1)])


def dm_examples(items, codes: dict, tok) -> list:
    return [dm_example(tok, codes[str(it.input_path)][0], codes[str(it.output_path)][0], it.instruction)
            for it in items]


def normalise_action(text: str) -> str:
    """Exact-match comparison ignores case, surrounding space and a final full stop."""
    return " ".join(text.strip().lower().rstrip(".").split())


@torch.no_grad()
def predict_actions(model, tok, src_codes: torch.Tensor, tgt_codes: torch.Tensor, temperature: float = 0.0,
                    top_k: int | None = None, max_new_tokens: int = 24, generator=None, batch: int = 0):
    """Generate an action text for each (source, target) pair of codes (N, h*w). Returns a list of N strings.

    temperature 0 = greedy. Sampling is restricted to text ids (never image tokens). batch 0: checkpoint.auto_batch.
    """
    model.eval()
    device = next(model.parameters()).device
    texts, prompts = [], [dm_prompt(tok, s, t) for s, t in zip(src_codes, tgt_codes)]  # equal lengths
    batch = batch or auto_batch(model, len(prompts[0]) + max_new_tokens if prompts else 1)
    for i in range(0, len(src_codes), batch):
        out = generate_text(model, torch.tensor(prompts[i : i + batch]).to(device), max_new_tokens=max_new_tokens,
                            eos_id=tok.eos_id, allowed=text_vocab_mask(tok, model.config.vocab_size).to(device),
                            temperature=temperature, top_k=top_k, generator=generator)
        texts.extend(tok.decode([t for t in row.tolist() if t not in (tok.eos_id, tok.pad_id)]).strip() for row in out)
    return texts


def text_vocab_mask(tok, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool: the ids the DM may write (text and <eos>; not image codes, BOI/EOI or padding)."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[tok.image_offset : tok.image_offset + tok.n_image_codes] = False
    allowed[tok.vocab_size :] = False  # rows of the embedding beyond the tokenizer (Chameleon pads its vocab)
    for i in (tok.boi_id, tok.eoi_id, tok.pad_id, tok.bos_id):
        allowed[i] = False
    return allowed


@torch.no_grad()
def score_actions(model, tok, src_codes, tgt_codes, actions: list[str], batch: int = 0):
    """log p_DM(action | source, target), teacher-forced. Returns (sum (N,), per-token mean (N,)).

    The sum is the paper's verifier score (App.: argmax_i log p(a | o_s, o_t^(i))); the per-token mean removes the
    length bias when comparing *different* actions (bootstrap.py's filter). Both include the <eos> token.
    batch 0: checkpoint.auto_batch.
    """
    model.eval()
    device = next(model.parameters()).device
    examples, sums, means = [dm_example(tok, s, t, a) for s, t, a in zip(src_codes, tgt_codes, actions)], [], []
    rows = max((sum(map(bool, w)) for _, w in examples), default=1)  # the loss positions: the only logits computed
    batch = batch or auto_batch(model, max((len(x) for x, _ in examples), default=1), False, rows)
    for i in range(0, len(actions), batch):
        x, w = collate(examples[i : i + batch], tok.pad_id)
        x, w = x.to(device), w.to(device)
        nll = sequence_nll(model, x, w)  # (b,)
        sums.append(-nll.cpu())
        means.append((-nll / w[:, 1:].sum(1)).cpu())
    return torch.cat(sums), torch.cat(means)


def action_accuracy(model, tok, items, codes, n: int = 0) -> dict:
    """Greedy exact-match accuracy of the DM on labelled items (the synthetic world's Table 1 metric)."""
    items = items[:n] if n else items
    src = torch.stack([codes[str(it.input_path)][0] for it in items])
    tgt = torch.stack([codes[str(it.output_path)][0] for it in items])
    pred = predict_actions(model, tok, src, tgt)
    hits = [normalise_action(p) == normalise_action(it.instruction) for p, it in zip(pred, items)]
    return {"action_acc": sum(hits) / max(1, len(hits))}


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, description=__doc__.split("\n\n")[0], defaults={"task": "dm"},
                       exclude=("task", *WM_ONLY, *PRETRAIN_ONLY))
    _, tok, items, val, codes = prepare_pairs(cfg)
    evaluate = (lambda m, step: action_accuracy(m, tok, val, codes)) if val else None
    train(cfg, dm_examples(items, codes, tok), tok, dm_examples(val, codes, tok) if val else None, evaluate,
          names=[it.id for it in items])


if __name__ == "__main__":
    run(main)
