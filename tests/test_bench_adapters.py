"""bench/bench_adapters.py: the paired-difference summary and its verdict (pure Python, no model)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from bench_adapters import paired_summary, quartiles  # noqa: E402


def test_quartiles_inclusive_and_single_value():
    assert quartiles([1, 2, 3, 4, 5]) == (2.0, 3.0, 4.0)
    assert quartiles([7]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        quartiles([])


def test_verdict_met_not_met_inconclusive():
    # read time 1 ms, target 1.3: the whole interquartile range decides, not the median alone
    met = paired_summary([0.9, 1.0, 1.1, 1.2, 1.0], 1.0)
    assert met["verdict"] == "met" and met["ratio"] == pytest.approx(1.0)
    notmet = paired_summary([1.5, 1.6, 1.7, 1.8, 2.0], 1.0)
    assert notmet["verdict"] == "not met"
    # median 1.2 is under the target but the upper quartile 1.6 is not: the old single-number verdict said MET
    straddle = paired_summary([0.5, 0.8, 1.2, 1.6, 1.8], 1.0)
    assert straddle["ratio"] == pytest.approx(1.2)
    assert straddle["verdict"].startswith("inconclusive")
    assert (straddle["q1_ms"], straddle["q3_ms"]) == (0.8, 1.6)
    assert (straddle["min_ms"], straddle["max_ms"], straddle["n"]) == (0.5, 1.8, 5)


def test_ratio_scales_with_read_time_and_rejects_zero():
    s = paired_summary([2.0, 2.0, 2.0], 4.0)
    assert s["ratio"] == pytest.approx(0.5) and s["verdict"] == "met"
    with pytest.raises(ValueError):
        paired_summary([1.0], 0.0)
