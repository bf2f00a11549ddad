"""GSP-MC losses: multi-positive KL contrastive loss (eqs. 7–10), its hierarchical average over
global/synonym/part texts (eq. 11) and the composite objective (eq. 12).

All functions are pure: features and labels in, a scalar tensor out. Which texts go into a batch
(one Tg per label, one sampled Ts per sample, all matching Tp per part) is decided by the caller
(:mod:`mc.text_features` ``TextBank.batch_texts``); this module only does the math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mc.presets import DEFAULT_ALPHA, DEFAULT_TAU

#: Table 5 rows: which text sets take part in the contrastive loss.
ABLATIONS: dict[str, tuple[bool, bool, bool]] = {
    # name: (synonyms Ts, prompt Tg, multipart Tp)
    "ce": (False, False, False),
    "synonyms": (True, False, False),
    "prompt": (False, True, False),
    "multipart": (False, False, True),
    "synonyms+prompt": (True, True, False),
    "all": (True, True, True),
}


def _row_kl(target: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ q) per row, with 0·log 0 = 0."""
    safe = torch.where(target > 0, target, torch.ones_like(target))
    return (target * (safe.log() - log_q)).sum(-1)


def multi_positive_contrastive_loss(
    skeleton: torch.Tensor,
    text: torch.Tensor,
    skeleton_labels: torch.Tensor,
    text_labels: torch.Tensor,
    tau: float = DEFAULT_TAU,
) -> torch.Tensor:
    """L_con(s, t) of eq. 10 for B skeleton features (B, D) and M text features (M, D).

    - Similarities are cosine similarities over ``tau``.
    - q^{s→t} (eq. 7): softmax of each skeleton's row over the M texts (the denominator is that
      row's sum); q^{t→s} (eq. 8): softmax of each text's row (the transposed logits) over the B
      skeletons.
    - p (eq. 9): for skeleton i, uniform over the texts with the same label; pᵀ likewise for each
      text over the skeletons with its label.
    - Eq. 10: ½·[mean_i KL(p_i ‖ q^{s→t}_i) + mean_j KL(pᵀ_j ‖ q^{t→s}_j)]. The paper writes
      KL(q, p); we minimise the forward KL(p‖q) — the standard choice for a fixed target, and the
      one under which q is not pushed to zero mass on positives.

    Rows without any positive (a skeleton whose label has no text in the batch, or a text whose
    label has no skeleton) have no target and are left out of their direction's mean; they still
    serve as negatives in the other direction. Returns 0 (with a grad path) when no row qualifies.
    """
    if skeleton.ndim != 2 or text.ndim != 2 or skeleton.shape[1] != text.shape[1]:
        raise ValueError(f"expected (B, D) and (M, D) features, got {tuple(skeleton.shape)} and {tuple(text.shape)}")
    if skeleton_labels.shape != (skeleton.shape[0],) or text_labels.shape != (text.shape[0],):
        raise ValueError("labels must be (B,) and (M,) for features (B, D) and (M, D)")
    s = F.normalize(skeleton.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    logits = s @ t.t() / tau  # B, M
    match = (skeleton_labels.view(-1, 1) == text_labels.view(1, -1)).float()

    zero = logits.sum() * 0.0
    terms = []
    s_rows = match.sum(1) > 0
    if s_rows.any():
        p = match[s_rows] / match[s_rows].sum(1, keepdim=True)
        terms.append(_row_kl(p, F.log_softmax(logits[s_rows], dim=1)).mean())
    else:
        terms.append(zero)
    t_rows = match.sum(0) > 0
    if t_rows.any():
        pt = match.t()[t_rows]
        pt = pt / pt.sum(1, keepdim=True)
        terms.append(_row_kl(pt, F.log_softmax(logits.t()[t_rows], dim=1)).mean())
    else:
        terms.append(zero)
    return 0.5 * (terms[0] + terms[1])


@dataclass
class BatchTexts:
    """Text features chosen for one batch, each with the labels of its rows.

    ``global_`` = Tg (one per label in the batch), ``synonyms`` = Ts (one sampled per sample),
    ``parts`` = part name → Tp features of the batch's labels that mention that part.
    """

    global_: tuple[torch.Tensor, torch.Tensor] | None = None
    synonyms: tuple[torch.Tensor, torch.Tensor] | None = None
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


def hierarchical_contrastive_loss(
    global_embedding: torch.Tensor,
    part_embeddings: dict[str, torch.Tensor],
    labels: torch.Tensor,
    texts: BatchTexts,
    tau: float = DEFAULT_TAU,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_con^multi of eq. 11: the mean of L_con(S_g, T_g), L_con(S_g, T_s) and L_con(S_p, T_p) for
    each part p with texts in the batch (N = the number of terms present).

    Returns the loss and the value of each term (for logging). With no term present the loss is
    0 with a grad path, so a batch without texts degrades to CE only.
    """
    terms: dict[str, torch.Tensor] = {}
    if texts.global_ is not None and len(texts.global_[1]):
        terms["Tg"] = multi_positive_contrastive_loss(global_embedding, texts.global_[0], labels, texts.global_[1], tau)
    if texts.synonyms is not None and len(texts.synonyms[1]):
        terms["Ts"] = multi_positive_contrastive_loss(
            global_embedding, texts.synonyms[0], labels, texts.synonyms[1], tau)
    for part, (feat, part_labels) in (texts.parts or {}).items():
        if len(part_labels) and part in part_embeddings:
            terms[f"Tp:{part}"] = multi_positive_contrastive_loss(part_embeddings[part], feat, labels, part_labels, tau)
    if not terms:
        return global_embedding.sum() * 0.0, {}
    total = torch.stack(list(terms.values())).mean()
    return total, {k: float(v.detach()) for k, v in terms.items()}


def composite_loss(cls_loss: torch.Tensor, con_loss: torch.Tensor | None, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """Eq. 12: L = L_cls + α·L_con^multi (α = 0.5 in the paper)."""
    return cls_loss if con_loss is None else cls_loss + alpha * con_loss
