"""Paired comparisons: the Student-t quantile against table values and hand-computed intervals."""

from __future__ import annotations

import json
import math

import pytest

from dnet_fast.compare import compare_runs, format_comparison, paired_interval
from dnet_fast.stats import regularized_beta, t_cdf, t_quantile
from tests.runfiles import write_results


@pytest.mark.parametrize(("df", "table"), [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)])
def test_t_quantile_matches_the_printed_table(df, table):
    assert t_quantile(0.975, df) == pytest.approx(table, abs=5e-4)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.9995])
def test_t_quantile_closed_forms(p):
    # df = 1 is the Cauchy distribution: t = tan(π (p − 1/2)); df = 2: t = (2p − 1) / sqrt(2 p (1 − p)).
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    assert t_quantile(1 - p, 7) == pytest.approx(-t_quantile(p, 7), rel=1e-12)
    assert t_cdf(t_quantile(p, 13), 13) == pytest.approx(p, abs=1e-12)


def test_t_quantile_tends_to_the_normal_one():
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)


def test_regularized_beta_against_a_polynomial_integral():
    # I_x(2, 3) = 12 ∫_0^x t (1 − t)² dt = 12 (x²/2 − 2x³/3 + x⁴/4); at x = 0.3: 0.3483
    assert regularized_beta(0.3, 2, 3) == pytest.approx(0.3483, rel=1e-12)
    assert regularized_beta(0.9, 2, 3) == pytest.approx(12 * (0.405 - 0.486 + 0.164025), rel=1e-12)
    assert (regularized_beta(0.0, 2, 3), regularized_beta(1.0, 2, 3)) == (0.0, 1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_cdf(1.0, 0)
    with pytest.raises(ValueError, match="at least 2"):
        paired_interval([1.0])


def test_paired_interval_by_hand():
    # d = (2, 5, 1): mean 8/3, s² = (4/9 + 49/9 + 25/9)/2 = 13/3, half = t_{.975,2} · sqrt(13/9)
    mean, low, high = paired_interval([2.0, 5.0, 1.0])
    half = 4.302652729749 * math.sqrt(13 / 9)
    assert mean == pytest.approx(8 / 3)
    assert (low, high) == pytest.approx((8 / 3 - half, 8 / 3 + half), rel=1e-9)
    assert (low, high) == pytest.approx((-2.5045, 7.8378), abs=1e-4)


def _runs(tmp_path, side, rows):
    runs = []
    for seed, top1, few in rows:
        test = {"top1": top1, "many": 0.9, "medium": 0.5, "few": few, "per_class": []}
        mode = "off" if side == "a" else "exact"
        runs.append(write_results(tmp_path / f"{side}-seed{seed}", seed=seed, mode=mode, test=test))
    return runs


def test_compare_pairs_by_seed_and_computes_intervals(tmp_path):
    a = _runs(tmp_path, "a", [(0, 0.50, 0.10), (1, 0.60, None), (2, 0.70, 0.30), (3, 0.40, 0.2), (7, 0.1, 0.1)])
    b = _runs(tmp_path, "b", [(2, 0.71, 0.35), (0, 0.52, 0.12), (1, 0.65, 0.2), (3, 0.41, 0.3), (9, 0.9, 0.9)])
    c = compare_runs(a, b)
    assert c.seeds == (0, 1, 2, 3)
    assert c.unmatched == (f"{a[4]} (seed 7)", f"{b[4]} (seed 9)")
    assert (c.a_label, c.b_label) == ("CE", "Difficulty-Net (exact) + CE, λ = 0.3")
    top1, many, _, few = c.metrics
    # top-1 differences (pp): 2, 5, 1, 1 -> mean 2.25, s = sqrt(((-.25)² + 2.75² + 1.25² + 1.25²)/3) = 1.8930
    s = math.sqrt((0.0625 + 7.5625 + 1.5625 + 1.5625) / 3)
    half = 3.182446305284 * s / 2
    assert top1.n == 4
    assert top1.mean == pytest.approx(2.25)
    assert (top1.low, top1.high) == pytest.approx((2.25 - half, 2.25 + half), rel=1e-9)
    assert top1.distinguishable is False  # [-0.76, 5.26] covers 0
    assert (many.mean, many.low, many.high, many.distinguishable) == (0.0, 0.0, 0.0, False)
    # few: seed 1 has no few-shot value on the A side -> 3 pairs: 2, 5, 10 pp
    assert few.n == 3
    assert few.mean == pytest.approx(17 / 3)


def test_a_clear_difference_is_flagged(tmp_path):
    a = _runs(tmp_path, "a", [(s, 0.5, 0.1) for s in range(4)])
    b = _runs(tmp_path, "b", [(s, 0.5 + d / 100, 0.1) for s, d in enumerate([1, 2, 3, 2])])
    (top1, *_), text = compare_runs(a, b).metrics, format_comparison(compare_runs(a, b))
    # d = (1, 2, 3, 2): mean 2, s = sqrt(2/3), half = t_{.975,3} · s / 2 = 3.182446 · 0.408248 = 1.299228
    assert (top1.low, top1.high) == pytest.approx((0.700772, 3.299228), abs=1e-6)
    assert top1.distinguishable is True
    assert "| top-1 | 4 | +2.00 | [+0.70, +3.30] | B higher |" in text
    assert "95 % Student-t confidence interval" in text


def test_one_pair_gives_no_interval(tmp_path):
    a = _runs(tmp_path, "a", [(0, 0.5, 0.1)])
    b = _runs(tmp_path, "b", [(0, 0.6, None)])
    c = compare_runs(a, b)
    top1, *_, few = c.metrics
    assert (top1.n, top1.low, top1.distinguishable) == (1, None, None)
    text = format_comparison(c)
    assert "| top-1 | 1 | +10.00 | n/a | n < 2: no interval |" in text
    assert "| few | 0 | n/a | n/a | no paired values |" in text
    payload = json.loads(json.dumps(c.as_dict()))
    assert payload["metrics"]["top1"] == {"n": 1, "mean_diff_pp": pytest.approx(10.0), "ci_pp": None,
                                          "distinguishable": None}
    assert payload["seeds"] == [0]
    assert payload["interval"] == "0.95 Student-t"


def test_ambiguous_or_disjoint_seeds_are_errors(tmp_path):
    a = _runs(tmp_path, "a", [(0, 0.5, 0.1)])
    b = _runs(tmp_path, "b", [(1, 0.5, 0.1)])
    with pytest.raises(ValueError, match="no seed has a run on both sides"):
        compare_runs(a, b)
    twin = write_results(tmp_path / "a-again", seed=0, test={"top1": 0.4, "many": 0, "medium": 0, "few": 0})
    with pytest.raises(ValueError, match="same seed 0"):
        compare_runs([*a, twin], b)
