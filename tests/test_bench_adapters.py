"""bench/bench_adapters.py: the paired-difference summary and its verdict (pure Python, no model)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from bench_adapters import median_ci, paired_summary, quartiles  # noqa: E402


def test_quartiles_inclusive_and_single_value():
    assert quartiles([1, 2, 3, 4, 5]) == (2.0, 3.0, 4.0)
    assert quartiles([7]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        quartiles([])


def test_median_ci_matches_sign_test_tables():
    # Order statistics of the distribution-free 95% interval (e.g. Conover, Practical Nonparametric
    # Statistics, table A3): n=10 -> x(2)..x(9), n=15 -> x(4)..x(12), n=20 -> x(6)..x(15), n=40 -> x(14)..x(27)
    for n, (j, k) in {10: (2, 9), 15: (4, 12), 20: (6, 15), 40: (14, 27)}.items():
        lo, hi, cover = median_ci(list(range(1, n + 1))[::-1])  # order of the input does not matter
        assert (lo, hi) == (j, k)
        assert 0.95 <= cover < 0.99
    assert median_ci(list(range(1, 16)))[2] == pytest.approx(1 - 2 * 576 / 2 ** 15)  # P(B <= 3) = 576 / 2^15
    # too few values for 95%: (min, max) at the level it has
    assert median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0, pytest.approx(0.75))
    with pytest.raises(ValueError):
        median_ci([])


def test_verdict_follows_the_confidence_interval_of_the_median():
    # read time 1 ms, target 1.3
    notmet = paired_summary([1.5, 1.6, 1.7, 1.8, 2.0, 1.9, 1.6, 1.7, 1.8, 1.5], 1.0)
    assert notmet["verdict"] == "not met"
    # 40 repeats, typical cost ~1.0 with wide single-repeat noise: the upper quartile 1.5 is over 1.3, the
    # median's interval [x(14), x(27)] = [0.95, 1.05] is not
    noisy = [0.5] * 10 + [0.95] * 9 + [1.05] * 9 + [1.5] * 12
    s = paired_summary(noisy, 1.0)
    assert s["ratio_q3"] > 1.3 and s["verdict"] == "met"
    assert s["ratio_ci_high"] <= 1.3 and s["n"] == 40
    # the same spread over 5 repeats: the interval is (min, max) and straddles
    few = paired_summary([0.6, 0.9, 1.0, 1.1, 1.4], 1.0)
    assert few["verdict"].startswith("inconclusive")
    assert (few["ci_low_ms"], few["ci_high_ms"]) == (0.6, 1.4)
    assert (few["q1_ms"], few["q3_ms"], few["min_ms"], few["max_ms"]) == (0.9, 1.1, 0.6, 1.4)


def test_ratio_scales_with_read_time_and_rejects_zero():
    s = paired_summary([2.0, 2.0, 2.0], 4.0)
    assert s["ratio"] == pytest.approx(0.5) and s["verdict"] == "met"
    with pytest.raises(ValueError):
        paired_summary([1.0], 0.0)


def test_compute_dtype_option():
    from bench_adapters import parse_args
    assert parse_args([]).compute_dtype == "float32"  # the default: the output as before
    assert parse_args(["--compute-dtype", "bfloat16"]).compute_dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parse_args(["--compute-dtype", "float16"])
