"""Bootstrapping (stratified top-K, DM labelling) and DM-verified best-of-N search; eval's text metrics."""

import torch
from conftest import ACTIONS, tiny_model

from bootstrap import label_pairs, stratified_top_k
from eval import markdown_table
from metrics import bleu, rouge_l
from search import best_of_n
from train import TrainConfig, train
from train_dynamics import dm_example, score_actions
from train_world import wm_example


def test_stratified_top_k_count_and_balance():
    recs = [{"verb": "move", "score": -i * 0.1, "id": f"m{i}"} for i in range(10)]  # many good moves
    recs += [{"verb": "remove", "score": -5 - i, "id": f"r{i}"} for i in range(3)]  # few, worse removes
    recs += [{"verb": "add", "score": -2 - i, "id": f"a{i}"} for i in range(2)]
    kept = stratified_top_k(recs, 6)
    assert len(kept) == 6
    assert [r["id"] for r in kept] == ["m0", "a0", "r0", "m1", "a1", "r1"]  # round-robin, best class first
    # plain top-6 would keep only moves
    assert [r["id"] for r in sorted(recs, key=lambda r: -r["score"])[:6]] == [f"m{i}" for i in range(6)]
    kept = stratified_top_k(recs, 12)  # a class that runs out drops out of the rotation
    assert sum(r["verb"] == "add" for r in kept) == 2 and sum(r["verb"] == "remove" for r in kept) == 3
    assert len(stratified_top_k(recs, 100)) == len(recs)


def codes(seed, L=4):
    return torch.randint(0, 16, (L,), generator=torch.Generator().manual_seed(seed))


def trained_pair_models(tok, tmp_path):
    """A DM and a WM overfit on 4 (source, action, target) triplets."""
    src = [codes(i) for i in range(4)]
    tgt = [codes(i + 10) for i in range(4)]
    cfg = dict(steps=80, batch_size=4, lr=5e-3, warmup=5, eval_every=0, save_every=0, quiet=True)
    dm, _ = train(TrainConfig(task="dm", out_dir=str(tmp_path / "dm"), **cfg),
                  [dm_example(tok, s, t, a) for s, t, a in zip(src, tgt, ACTIONS)], tok, model=tiny_model(tok))
    wm, _ = train(TrainConfig(task="wm", out_dir=str(tmp_path / "wm"), **cfg),
                  [wm_example(tok, s, t, a) for s, t, a in zip(src, tgt, ACTIONS)], tok, model=tiny_model(tok, 1))
    return dm, wm, torch.stack(src), torch.stack(tgt)


def test_ranking_picks_the_ground_truth_and_search_is_consistent(tiny_tok, tmp_path):
    tok = tiny_tok
    dm, wm, src, tgt = trained_pair_models(tok, tmp_path)
    # constructed case: the true target among random candidates is ranked first by the DM verifier
    for i in range(4):
        cands = torch.stack([codes(100 + j) for j in range(5)] + [tgt[i]])  # (6, L), truth last
        s, _ = score_actions(dm, tok, src[i].expand(6, -1), cands, [ACTIONS[i]] * 6)
        assert s.argmax().item() == 5
    # best_of_n: candidates come back sorted by score, and the scores are the DM's teacher-forced log-likelihood
    g = torch.Generator().manual_seed(0)
    cands, scores = best_of_n(wm, dm, tok, src, ACTIONS[:4], n=4, generator=g)
    assert cands.shape == (4, 4, 4) and scores.shape == (4, 4)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    direct, _ = score_actions(dm, tok, src[1].expand(4, -1), cands[1], [ACTIONS[1]] * 4)
    assert torch.allclose(direct, scores[1], atol=1e-4)
    assert torch.equal(cands[:, 0], tgt)  # the overfit WM + DM recover the trained targets


def test_dm_labels_pairs_with_scores(tiny_tok, tmp_path):
    tok = tiny_tok
    dm, _, src, tgt = trained_pair_models(tok, tmp_path)
    labels = label_pairs(dm, tok, src, tgt, n_samples=2, temperature=1.0, seed=0)
    assert [lab["action"] for lab in labels] == ACTIONS[:4]
    assert all(lab["verb"] == lab["action"].split()[0] and lab["score"] <= 0 for lab in labels)


def test_bleu_and_rouge_hand_examples():
    assert bleu(["move the red circle left"], ["move the red circle left"]) == 1.0
    assert bleu(["remove it"], ["move the red circle left"]) == 0.0
    assert rouge_l(["move the red circle"], ["move the red circle left"]) == 2 * 1.0 * 0.8 / 1.8
    assert rouge_l([""], ["x"]) == 0.0
    # brevity penalty: a correct but short hypothesis scores below 1
    assert 0 < bleu(["move the red circle"], ["move the red circle left"]) < 1


def test_markdown_table():
    t = markdown_table({"a": {"x": 1.234, "y": "n/a"}}, ["x", "y", "z"])
    assert t.splitlines()[2] == "| a | 1.23 | n/a | - |"
