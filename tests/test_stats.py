"""The experiment's statistics (mc.stats, mc.experiment.summarize) against cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mc.experiment import summarize
from mc.stats import pair_accuracy, paired_difference, t_interval


def test_t_interval_matches_the_hand_computation():
    # values 0.5, 0.7, 0.6: mean 0.6; deviations -0.1, +0.1, 0 -> sum of squares 0.02;
    # s^2 = 0.02 / (3 - 1) = 0.01, s = 0.1; t_{0.975, 2} = 4.302652729911275 (Student t table);
    # half-width = 4.302652729911275 * 0.1 / sqrt(3) = 0.248413771... -> [0.351586, 0.848414].
    est = t_interval([0.5, 0.7, 0.6])
    assert est.n == 3
    assert est.mean == pytest.approx(0.6)
    assert est.sd == pytest.approx(0.1)
    assert est.low == pytest.approx(0.6 - 0.2484137715, abs=1e-9)
    assert est.high == pytest.approx(0.6 + 0.2484137715, abs=1e-9)
    assert est.half_width == pytest.approx(0.2484137715, abs=1e-9)


def test_paired_difference_uses_the_seeds_both_conditions_have():
    # per-seed differences (seed 4 has no treated value and is left out):
    # 0.6-0.5=0.10, 0.8-0.6=0.20, 0.7-0.65=0.05, 0.9-0.75=0.15 -> mean 0.125;
    # deviations -0.025, +0.075, -0.075, +0.025 -> sum of squares 0.0125; s^2 = 0.0125/3,
    # s = 0.0645497224; t_{0.975, 3} = 3.182446305284263; half = 3.1824463 * 0.0645497224 / 2
    # = 0.1027137... -> [0.0222863, 0.2277137]: above 0, although the two conditions' own
    # intervals (means 0.75 and 0.625, n = 4) overlap.
    treated = {0: 0.6, 1: 0.8, 2: 0.7, 3: 0.9}
    control = {0: 0.5, 1: 0.6, 2: 0.65, 3: 0.75, 4: 0.1}
    d = paired_difference(treated, control)
    assert d.n == 4 and d.mean == pytest.approx(0.125)
    assert d.sd == pytest.approx(math.sqrt(0.0125 / 3))
    assert (d.low, d.high) == (pytest.approx(0.0222863, abs=1e-6), pytest.approx(0.2277137, abs=1e-6))
    a, b = t_interval(treated.values()), t_interval([control[s] for s in range(4)])
    assert a.low < b.high  # unpaired, the intervals overlap


def test_one_seed_has_a_mean_but_no_interval_and_none_has_nothing():
    one = t_interval([0.4])
    assert one.n == 1 and one.mean == 0.4 and math.isnan(one.sd) and math.isnan(one.low)
    none = t_interval([float("nan")])
    assert none.n == 0 and math.isnan(none.mean)


def test_pair_accuracy_is_two_way_over_the_pair_members_clips():
    # pair (0, 1); clip 0 (class 0): 0.9 > 0.2 right; clip 1 (class 0): 0.1 < 0.5 wrong;
    # clip 2 (class 1): 0.7 > 0.3 right; clip 3 (class 2) is in no pair -> 2 of 3.
    scores = np.array([[0.9, 0.2, 5.0], [0.1, 0.5, 0.0], [0.3, 0.7, 9.0], [0.0, 1.0, 2.0]])
    labels = np.array([0, 0, 1, 2])
    assert pair_accuracy(scores, labels, [(0, 1)]) == pytest.approx(2 / 3)
    # class 2 outscoring both members does not matter: only the partner counts
    assert pair_accuracy(scores, labels, [(0, 1), (5, 6)]) == pytest.approx(2 / 3)
    assert math.isnan(pair_accuracy(scores, labels, [(5, 6)]))


def test_summary_rows_pair_each_condition_with_ce_of_the_same_k():
    def row(ablation, texts, k, seed, top1):
        return {"ablation": ablation, "keypoints": "gsp87", "descriptions": texts, "k": k, "seed": seed,
                "top1": top1}

    rows = [row("ce", "none", "2", 0, 0.5), row("ce", "none", "2", 1, 0.6), row("ce", "none", "2", 2, 0.65),
            row("all", "ref", "2", 0, 0.6), row("all", "ref", "2", 1, 0.8), row("all", "ref", "2", 2, 0.7),
            row("ce", "none", "all", 0, 0.9), row("all", "ref", "all", 0, 0.8)]
    by = {(r["ablation"], r["k"]): r for r in summarize(rows, ["top1"])}
    assert set(by) == {("ce", "2"), ("all", "2"), ("ce", "all"), ("all", "all")}
    # K=2: differences 0.1, 0.2, 0.05 -> mean 0.116667 (the paired interval of these three)
    assert by[("all", "2")]["d_top1"] == pytest.approx(0.35 / 3)
    expected = paired_difference({0: 0.6, 1: 0.8, 2: 0.7}, {0: 0.5, 1: 0.6, 2: 0.65})
    assert by[("all", "2")]["d_top1_low"] == pytest.approx(expected.low)
    assert by[("all", "2")]["n"] == 3 and by[("all", "2")]["top1"] == pytest.approx(0.7)
    # K=all has one seed: a difference of -0.1 without an interval; CE rows have no difference
    assert by[("all", "all")]["d_top1"] == pytest.approx(-0.1) and math.isnan(by[("all", "all")]["d_top1_low"])
    assert "d_top1" not in by[("ce", "2")]
