"""Statistics of an experiment over seeds: mean, standard deviation, Student-t confidence
intervals, and paired-seed differences between two conditions.

Seeds are the replicates. A condition's interval says how far its mean over these seeds may be
from the mean over all seeds; a difference between two conditions is taken seed by seed (the
same seed draws the same clips, initial weights and batches for both), so the interval of the
mean difference leaves out what the two share — which is why it is narrower than the two
conditions' intervals side by side would suggest.

Pure functions of lists of floats; ``nan`` where a quantity is undefined (one seed has no
standard deviation and no interval).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

#: The confidence level of every interval the experiment reports.
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` replicates with its sample standard deviation and t interval."""

    n: int
    mean: float
    sd: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean, sample standard deviation s (n − 1 in the denominator) and the Student-t interval
    mean ± t_{(1+c)/2, n−1} · s / √n over ``values`` (NaN entries are left out).

    With n = 1 the mean is the value and the rest is NaN; with n = 0 everything is NaN."""
    xs = [float(v) for v in values if not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan, math.nan)
    mean = math.fsum(xs) / n
    if n == 1:
        return Estimate(1, mean, math.nan, math.nan, math.nan)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Estimate(n, mean, sd, mean - half, mean + half)


def paired_difference(treated: Mapping[int, float], control: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> Estimate:
    """The mean of the per-seed differences treated[s] − control[s] over the seeds both have,
    with the t interval of those differences (:func:`t_interval`): a paired t interval."""
    common = sorted(set(treated) & set(control))
    return t_interval([treated[s] - control[s] for s in common], confidence)


def pair_accuracy(scores, labels, pairs: Sequence[tuple[int, int]]) -> float:
    """Two-way accuracy on minimal pairs: over the test clips whose true class is a member of a
    pair (a, b), the fraction where the true class outscores its partner. NaN when no test clip
    belongs to a pair whose both classes the scores have."""
    import numpy as np

    scores, labels = np.asarray(scores), np.asarray(labels)
    hits, total = 0, 0
    for a, b in pairs:
        if max(a, b) >= scores.shape[1]:
            continue
        for true, other in ((a, b), (b, a)):
            rows = labels == true
            hits += int((scores[rows, true] > scores[rows, other]).sum())
            total += int(rows.sum())
    return hits / total if total else math.nan
