"""The contrastive losses against an independent float64 computation written with loops."""

import math

import pytest
import torch

from mc.loss import (
    BatchTexts,
    composite_loss,
    hierarchical_contrastive_loss,
    multi_positive_contrastive_loss,
)

torch.set_num_threads(1)


def reference_loss(s, t, ls, lt, tau):
    """Eqs. 7-10 with explicit loops in float64 (math module only, no torch softmax)."""
    s = s.double().tolist()
    t = t.double().tolist()
    ls, lt = [int(v) for v in ls], [int(v) for v in lt]

    def cos(a, b):
        na = math.sqrt(sum(x * x for x in a))
        nb = math.sqrt(sum(x * x for x in b))
        return sum(x * y for x, y in zip(a, b)) / (na * nb)

    sim = [[cos(a, b) / tau for b in t] for a in s]
    B, M = len(s), len(t)

    def kl_rows(rows, row_labels, col_labels):
        vals = []
        for r, lab in zip(rows, row_labels):
            pos = [k for k, cl in enumerate(col_labels) if cl == lab]
            if not pos:
                continue
            denom = sum(math.exp(v) for v in r)
            kl = 0.0
            for k in pos:
                p = 1.0 / len(pos)
                q = math.exp(r[k]) / denom
                kl += p * math.log(p / q)
            vals.append(kl)
        return sum(vals) / len(vals) if vals else 0.0

    s2t = kl_rows(sim, ls, lt)
    t2s = kl_rows([[sim[i][j] for i in range(B)] for j in range(M)], lt, ls)
    return 0.5 * (s2t + t2s)


@pytest.mark.parametrize(
    "B,M,num_labels,seed",
    [(4, 4, 4, 0), (6, 15, 3, 1), (8, 5, 4, 2), (5, 23, 7, 3), (3, 9, 2, 4)],
)
def test_matches_float64_loops(B, M, num_labels, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, 16, generator=g)
    t = torch.randn(M, 16, generator=g)
    ls = torch.randint(0, num_labels, (B,), generator=g)
    lt = torch.randint(0, num_labels, (M,), generator=g)
    lt[0] = ls[0]  # at least one positive pair
    got = multi_positive_contrastive_loss(s, t, ls, lt, tau=0.1)
    want = reference_loss(s, t, ls, lt, 0.1)
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_repeated_labels_and_rows_without_positive():
    # M > B, repeated labels; label 9 has a text but no skeleton, label 5 a skeleton but no text.
    s = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    t = torch.randn(7, 8, generator=torch.Generator().manual_seed(6))
    ls = torch.tensor([1, 1, 2, 5])
    lt = torch.tensor([1, 1, 1, 2, 2, 9, 9])
    got = multi_positive_contrastive_loss(s, t, ls, lt, tau=0.07)
    assert got.item() == pytest.approx(reference_loss(s, t, ls, lt, 0.07), rel=1e-4)


def test_minimum_at_perfect_alignment_and_single_positive_is_clip():
    # Perfectly aligned one-hot features with a small tau: loss near zero.
    eye = torch.eye(4)
    lab = torch.arange(4)
    assert multi_positive_contrastive_loss(eye, eye, lab, lab, tau=0.01).item() < 1e-6
    # Single positive per row: KL(onehot||q) = cross-entropy, i.e. the CLIP loss.
    s, t = torch.randn(5, 6), torch.randn(5, 6)
    logits = torch.nn.functional.normalize(s, dim=1) @ torch.nn.functional.normalize(t, dim=1).T / 0.1
    clip = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(5))
                  + torch.nn.functional.cross_entropy(logits.T, torch.arange(5)))
    got = multi_positive_contrastive_loss(s, t, torch.arange(5), torch.arange(5))
    assert got.item() == pytest.approx(clip.item(), rel=1e-5)


def test_no_positive_gives_zero_with_grad():
    s = torch.randn(3, 4, requires_grad=True)
    got = multi_positive_contrastive_loss(s, torch.randn(2, 4), torch.tensor([0, 1, 2]), torch.tensor([7, 8]))
    assert got.item() == 0.0
    got.backward()
    assert s.grad is not None


def test_gradients_flow_and_bad_shapes_raise():
    s = torch.randn(4, 8, requires_grad=True)
    t = torch.randn(6, 8, requires_grad=True)
    loss = multi_positive_contrastive_loss(s, t, torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2, 2, 2]))
    loss.backward()
    assert s.grad.abs().sum() > 0 and t.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        multi_positive_contrastive_loss(torch.randn(4, 8), torch.randn(6, 7), torch.zeros(4), torch.zeros(6))


def test_hierarchical_average_over_present_terms():
    g = torch.Generator().manual_seed(7)
    sg = torch.randn(4, 8, generator=g)
    parts = {"left_hand": torch.randn(4, 8, generator=g), "mouth": torch.randn(4, 8, generator=g)}
    labels = torch.tensor([0, 1, 1, 2])
    tg = (torch.randn(3, 8, generator=g), torch.tensor([0, 1, 2]))
    ts = (torch.randn(4, 8, generator=g), labels.clone())
    tp_lh = (torch.randn(6, 8, generator=g), torch.tensor([0, 0, 1, 1, 2, 2]))
    texts = BatchTexts(global_=tg, synonyms=ts,
                       parts={"left_hand": tp_lh, "mouth": (torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))})
    total, terms = hierarchical_contrastive_loss(sg, parts, labels, texts, tau=0.1)
    expected = [
        reference_loss(sg, tg[0], labels, tg[1], 0.1),
        reference_loss(sg, ts[0], labels, ts[1], 0.1),
        reference_loss(parts["left_hand"], tp_lh[0], labels, tp_lh[1], 0.1),
    ]
    assert set(terms) == {"Tg", "Ts", "Tp:left_hand"}
    assert total.item() == pytest.approx(sum(expected) / 3, rel=1e-4)
    # Ablation rows: no texts at all -> zero contrastive term, eq. 12 reduces to CE.
    empty, none = hierarchical_contrastive_loss(sg, parts, labels, BatchTexts())
    assert empty.item() == 0.0 and none == {}
    ce = torch.tensor(1.25)
    assert composite_loss(ce, total, alpha=0.5).item() == pytest.approx(1.25 + 0.5 * total.item())
    assert composite_loss(ce, None).item() == 1.25
