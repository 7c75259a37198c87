"""Training: loss masks, the recognition-weighted loss (Eq. 2), overfitting, exact resume, NaN guard, LoRA."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import ACTIONS, tiny_model

from model import LoRALinear, apply_lora, merge_lora
from train import (
    Sampler,
    TrainConfig,
    collate,
    lr_at,
    parse_config,
    sequence_nll,
    train,
    weighted_nll,
)
from train_dynamics import dm_example, dm_examples, predict_actions, score_actions
from train_world import recognition_weights, wm_example

L = 4  # image tokens per "image" in these tests


def codes(seed):
    return torch.randint(0, 16, (L,), generator=torch.Generator().manual_seed(seed))


def quiet_cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), steps=6, batch_size=4, lr=3e-3, warmup=2, eval_every=0, save_every=0,
                quiet=True, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_dm_loss_touches_only_action_tokens(tiny_tok):
    tok = tiny_tok
    ids, w = dm_example(tok, codes(0), codes(1), "move the red circle left")
    action = tok.encode(" move the red circle left") + [tok.eos_id]
    n = len(action)
    assert ids[-n:] == action
    assert w[-n:] == [1.0] * n and sum(w[:-n]) == 0
    # gradient check: logits at prompt positions get no gradient
    x, wt = collate([(ids, w)], tok.pad_id)
    logits = torch.randn(1, x.shape[1], tok.vocab_size, requires_grad=True)
    weighted_nll(logits, x, wt).sum().backward()
    touched = logits.grad.abs().sum(-1)[0] > 0  # position t predicts token t+1
    assert touched.nonzero().flatten().tolist() == list(range(len(ids) - n - 1, len(ids) - 1))


def test_wm_loss_touches_only_target_image_tokens(tiny_tok):
    tok = tiny_tok
    tgt = codes(1)
    ids, w = wm_example(tok, codes(0), tgt, "remove the blue square")
    pos = [i for i, x in enumerate(w) if x != 0]
    assert len(pos) == L
    assert [ids[i] for i in pos] == tok.image_ids(tgt).tolist()
    assert ids[pos[0] - 1] == tok.boi_id and ids[pos[-1] + 1] == tok.eoi_id
    assert ids.count(tok.boi_id) == 2  # source and target images


@pytest.mark.parametrize("task", ["dm", "wm"])
def test_logits_at_loss_positions_only_give_the_same_loss_and_gradient(tiny_tok, monkeypatch, task):
    """sequence_nll's large-vocabulary path (lm_head only where a weight is non-zero) = the full-logits loss."""
    import train

    tok = tiny_tok
    model = tiny_model(tok)
    model.config.mask_image_logits = task == "dm"  # the DM's text-only scores, as train() sets it
    w_img = torch.rand(L, generator=torch.Generator().manual_seed(5)) * 3  # unequal Eq. 2-like weights
    ex = [dm_example(tok, codes(i), codes(i + 1), ACTIONS[i]) if task == "dm"
          else wm_example(tok, codes(i), codes(i + 1), ACTIONS[i], token_weights=w_img) for i in range(3)]
    x, w = collate(ex, tok.pad_id)  # unequal lengths: padding carries weight 0
    results = []
    for min_vocab in (10**9, 0):  # full logits, then loss positions only
        monkeypatch.setattr(train, "SPARSE_LOGITS_MIN_VOCAB", min_vocab)
        model.zero_grad()
        nll = sequence_nll(model, x, w)  # (3,)
        nll.sum().backward()
        results.append((nll.detach(), [p.grad.clone() for p in model.parameters()]))
    (full, g_full), (sparse, g_sparse) = results
    assert torch.allclose(full, sparse, rtol=1e-6, atol=1e-5) and full.min() > 0
    for a, b in zip(g_full, g_sparse):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), (a - b).abs().max()


def test_recognition_weights_hand_computed():
    fs = torch.zeros(3, 2, 2)
    ft = torch.zeros(3, 2, 2)
    ft[:, 0, 1] = torch.tensor([1.0, 1.0, 0.0])  # ||.||^2 = 2 at raster position 1
    ft[0, 1, 1] = 1.0  # ||.||^2 = 1 at raster position 3
    w = recognition_weights(fs, ft)
    assert torch.allclose(w, torch.tensor([0.0, 2.0, 0.0, 1.0]) / 0.75)  # mean of (0,2,0,1) is 0.75 -> mean 1
    assert torch.allclose(w.mean(), torch.tensor(1.0))
    w_mix = recognition_weights(fs, ft, mix=0.5)
    assert torch.allclose(w_mix, 0.5 * w + 0.5)
    assert torch.equal(recognition_weights(fs, fs), torch.ones(4))  # no change: uniform


def eq2_case(tok):
    """Two items whose VQ features differ at known positions (raw w_l = (0, 2, 0, 1) and (4, 0, 0, 0)), as
    wm_examples reads them: (items, {path: (codes, feats)})."""
    from types import SimpleNamespace

    fs = torch.zeros(3, 2, 2)
    ft1, ft2 = torch.zeros(3, 2, 2), torch.zeros(3, 2, 2)
    ft1[:, 0, 1] = torch.tensor([1.0, 1.0, 0.0])  # ||.||^2 = 2 at raster position 1
    ft1[0, 1, 1] = 1.0  # 1 at raster position 3
    ft2[2, 0, 0] = 2.0  # 4 at raster position 0: the pair that changed more
    items = [SimpleNamespace(input_path=f"s{i}", output_path=f"t{i}", instruction=ACTIONS[0]) for i in range(2)]
    cache = {"s0": (codes(0), fs), "t0": (codes(1), ft1), "s1": (codes(2), fs), "t1": (codes(3), ft2)}
    return items, cache


def batch_loss_and_grads(tok, examples):
    from train import forward_backward

    model = tiny_model(tok)
    ids, w = collate(examples, tok.pad_id)
    loss = forward_backward(model, ids, w, torch.arange(len(examples)), 0, 1, 1, torch.device("cpu"))
    return loss, [p.grad.clone() for p in model.parameters()], model, ids


def test_batch_normalised_weights_equal_hand_computation(tiny_tok):
    from train_world import wm_examples

    items, cache = eq2_case(tiny_tok)
    raw = torch.tensor([[0.0, 2, 0, 1], [4, 0, 0, 0]])
    target_w = lambda ex: torch.tensor(ex[1][-L - 1:-1])  # the target's tokens (<eoi> last)
    # per image (today's reading): each image's weights have mean 1, whatever its amount of change
    img = [target_w(e) for e in wm_examples(items, cache, tiny_tok, "recognition", norm="image")]
    assert torch.allclose(torch.stack(img), raw / raw.mean(1, keepdim=True))
    # over the batch: raw w_l / the mean over all 8 tokens (7/8), so the second pair keeps more weight (4.57 vs 3.43)
    ex = wm_examples(items, cache, tiny_tok, "recognition", norm="batch")
    w = torch.stack([target_w(e) for e in ex])
    assert torch.allclose(w, raw / 0.875) and torch.allclose(w.sum(1), torch.tensor([3 / 0.875, 4 / 0.875]))
    mixed = torch.stack([target_w(e) for e in wm_examples(items, cache, tiny_tok, "recognition", 0.25, norm="batch")])
    assert torch.allclose(mixed, 0.75 * raw / 0.875 + 0.25)
    # the loss the trainer computes: sum over the batch of (raw w_l / batch mean) * nll_l, over its 8 target tokens
    loss, _, model, ids = batch_loss_and_grads(tiny_tok, ex)
    with torch.no_grad():
        logits = model(ids)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")[:, -L - 1:-1]  # (2, L)
    assert torch.allclose(loss, (raw / raw.mean() * nll).sum() / 8, rtol=1e-6)


@pytest.mark.parametrize("norm", ["image", "batch"])
def test_uniform_weighting_reproduces_plain_ce_exactly(tiny_tok, norm):
    from train_world import wm_example, wm_examples

    items, cache = eq2_case(tiny_tok)
    plain = wm_examples(items, cache, tiny_tok, "none")
    loss, grads, _, _ = batch_loss_and_grads(tiny_tok, plain)
    same = {k: (c, cache["s0"][1]) for k, (c, _) in cache.items()}  # source features everywhere: nothing changed
    doubled = [wm_example(tiny_tok, codes(2 * i), codes(2 * i + 1), ACTIONS[0], [2.0] * L) for i in range(2)]
    for ex in (wm_examples(items, cache, tiny_tok, "recognition", mix=1.0, norm=norm),  # the floor alone
               wm_examples(items, same, tiny_tok, "recognition", norm=norm) if norm == "image" else doubled):
        loss2, grads2, _, _ = batch_loss_and_grads(tiny_tok, ex)
        assert torch.equal(loss, loss2)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_weighted_loss_equals_ce_when_uniform_and_upweights_changes():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    ids = torch.tensor([[0, 3, 1, 4, 2]])
    nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")  # (4,)
    ones = torch.tensor([[0.0, 1, 1, 1, 1]])
    assert torch.allclose(weighted_nll(logits, ids, ones) / 4, nll.mean())
    assert torch.allclose(weighted_nll(logits, ids, 3 * ones) / 12, nll.mean())  # normalised: scale-free
    w = torch.tensor([[0.0, 0, 4, 0, 0]])  # all weight on the token at position 2 (predicted from position 1)
    assert torch.allclose(weighted_nll(logits, ids, w) / 4, nll[1])


def test_overfit_one_batch_dm(tiny_tok, tmp_path):
    tok = tiny_tok
    ex = [dm_example(tok, codes(i), codes(i + 10), ACTIONS[i]) for i in range(4)]
    model, hist = train(quiet_cfg(tmp_path, task="dm", steps=80, lr=5e-3, warmup=5), ex, tok,
                        model=tiny_model(tok))
    assert hist[-1]["loss"] < 0.05 < hist[0]["loss"]
    src = torch.stack([codes(i) for i in range(4)])
    tgt = torch.stack([codes(i + 10) for i in range(4)])
    assert predict_actions(model, tok, src, tgt) == ACTIONS[:4]


def test_overfit_one_batch_wm(tiny_tok, tmp_path):
    from train_world import generate_targets

    tok = tiny_tok
    ex = [wm_example(tok, codes(i), codes(i + 10), ACTIONS[i]) for i in range(4)]
    model, hist = train(quiet_cfg(tmp_path, task="wm", steps=80, lr=5e-3, warmup=5), ex, tok, model=tiny_model(tok))
    assert hist[-1]["loss"] < 0.05 < hist[0]["loss"]
    src = torch.stack([codes(i) for i in range(4)])
    out = generate_targets(model, tok, src, ACTIONS[:4], n_samples=2, temperature=0.0)  # (4, 2, L)
    assert torch.equal(out[:, 0], torch.stack([codes(i + 10) for i in range(4)]))


def test_resume_equals_uninterrupted(tiny_tok, tmp_path):
    tok = tiny_tok
    ex = [dm_example(tok, codes(i), codes(i + 10), ACTIONS[i % 6]) for i in range(12)]
    kw = dict(task="dm", steps=8, save_every=2, lora_r=0)
    _, full = train(quiet_cfg(tmp_path / "a", **kw), ex, tok, model=tiny_model(tok))
    _, first = train(quiet_cfg(tmp_path / "b", stop_at=5, **kw), ex, tok, model=tiny_model(tok))
    _, rest = train(quiet_cfg(tmp_path / "b", resume=True, **kw), ex, tok, model=tiny_model(tok, seed=99))
    assert len(first) == 5 and len(rest) == 3
    assert [h["loss"] for h in first + rest] == [h["loss"] for h in full]
    meta = json.load(open(tmp_path / "b" / "ckpt" / "meta.json"))
    assert meta["step"] == 8 and meta["sampler"]["offset"] > 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_tok, tmp_path):
    tok = tiny_tok
    ex = [dm_example(tok, codes(i), codes(i + 10), ACTIONS[i]) for i in range(4)]
    train(quiet_cfg(tmp_path, task="dm", steps=2, save_every=1), ex, tok, model=tiny_model(tok))
    bad = [(ids, [math.nan if x else 0.0 for x in w]) for ids, w in ex]
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train(quiet_cfg(tmp_path, task="dm", steps=4, save_every=1, resume=True, force=True), bad, tok,
              model=tiny_model(tok))
    assert json.load(open(tmp_path / "ckpt" / "meta.json"))["step"] == 2


def test_checkpoint_errors_are_readable(tiny_tok, tmp_path):
    from checkpoint import load_model, save_checkpoint

    tok = tiny_tok
    model = tiny_model(tok)
    save_checkpoint(str(tmp_path), model, TrainConfig(), model.config, step=3)
    loaded, meta = load_model(str(tmp_path))
    assert meta["step"] == 3
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="meta.json"):
        load_model(str(tmp_path / "nowhere"))


def test_lora_trains_adapters_only_and_merges_exactly(tiny_tok):
    tok = tiny_tok
    model = tiny_model(tok)
    n = apply_lora(model, r=4, alpha=8, dropout=0.0, targets="q_proj,v_proj")
    assert n == 2 * 2  # two layers x two targets
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B)  # make the adapters non-trivial
    x = torch.randint(0, tok.vocab_size, (2, 10))
    before = model(x)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(x), before, atol=1e-5)
    with pytest.raises(ValueError, match="matched no"):
        apply_lora(tiny_model(tok), 4, 8, 0.0, "nothing_here")


def test_score_actions_batched_equals_unbatched(tiny_tok):
    tok = tiny_tok
    model = tiny_model(tok)
    src = torch.stack([codes(i) for i in range(5)])
    tgt = torch.stack([codes(i + 10) for i in range(5)])
    acts = ACTIONS[:5]
    s_all, m_all = score_actions(model, tok, src, tgt, acts, batch=5)
    for i in range(5):
        s, m = score_actions(model, tok, src[i : i + 1], tgt[i : i + 1], acts[i : i + 1])
        assert torch.allclose(s, s_all[i : i + 1], atol=1e-4) and torch.allclose(m, m_all[i : i + 1], atol=1e-5)
    # equals the teacher-forced log-likelihood computed directly from the logits
    from model import token_logprobs

    ids, w = collate(dm_examples_like(tok, src[:1], tgt[:1], acts[:1]), tok.pad_id)
    lp = token_logprobs(model(ids), ids)  # (1, T-1)
    assert torch.allclose((lp * w[:, 1:]).sum(), s_all[0], atol=1e-4)


def dm_examples_like(tok, src, tgt, acts):
    return [dm_example(tok, s, t, a) for s, t, a in zip(src, tgt, acts)]


def test_sampler_and_schedule():
    s = Sampler(10, 4, seed=1)
    seen = torch.cat([s.next(), s.next()])
    assert len(set(seen.tolist())) == 8  # no repeats inside an epoch
    s.next()  # 8 + 4 > 10: a new epoch starts (drop last)
    assert s.state()["epoch"] == 1
    cfg = TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(60, cfg) == pytest.approx(0.55)


def test_parse_config_overrides_and_rejects_unknown():
    cfg = parse_config(TrainConfig, ["--lr=0.5", "--resume=true", "--task=dm", "--data=d.json"])
    assert cfg.lr == 0.5 and cfg.resume is True and cfg.task == "dm"
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--no_such_key=1"])


def test_dm_examples_use_item_paths(tiny_tok):
    from types import SimpleNamespace

    tok = tiny_tok
    items = [SimpleNamespace(input_path="a", output_path="b", instruction="remove the blue square")]
    cache = {"a": (codes(0), None), "b": (codes(1), None)}
    assert dm_examples(items, cache, tok)[0] == dm_example(tok, codes(0), codes(1), "remove the blue square")


def test_metrics_file_written(tiny_tok, tmp_path):
    tok = tiny_tok
    ex = [dm_example(tok, codes(i), codes(i + 10), ACTIONS[i]) for i in range(4)]
    train(quiet_cfg(tmp_path, task="dm", steps=3), ex, tok, val_examples=ex, model=tiny_model(tok))
    rows = [json.loads(x) for x in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3] and "val_loss" in rows[-1]


def test_evaluation_during_training_leaves_the_weights_unchanged(tiny_tok, tmp_path):
    """reproduce's learning curves sample from the model every few steps (train's `evaluate` hook); the trained weights
    must be bit for bit those of a run without them, or the curves would change the results they describe."""
    from train_world import generate_targets

    tok = tiny_tok
    ex = [wm_example(tok, codes(i), codes(i + 10), ACTIONS[i % 6]) for i in range(8)]
    src = torch.stack([codes(i) for i in range(4)])

    def evaluate(m, step):  # samples images, as the WM's curve does (its own generator, like eval_wm)
        out = generate_targets(m, tok, src, ACTIONS[:4], generator=torch.Generator().manual_seed(step))
        return {"val_solved": float((out[:, 0] == src).float().mean())}

    plain, _ = train(quiet_cfg(tmp_path / "a", task="wm", steps=6), ex, tok, model=tiny_model(tok))
    curved, hist = train(quiet_cfg(tmp_path / "b", task="wm", steps=6, eval_every=2), ex, tok, val_examples=ex[:2],
                         evaluate=evaluate, model=tiny_model(tok))
    assert [h["step"] for h in hist if "val_solved" in h] == [2, 4, 6]
    for (name, a), b in zip(plain.state_dict().items(), curved.state_dict().values()):
        assert torch.equal(a, b), name
