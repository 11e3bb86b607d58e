"""Straggler detection: the pure rule, on tables of per-rank step times."""

from __future__ import annotations

import pytest

from launcher.driver.stragglers import Detector, ratios, stragglers

NODES = ["node-a", "node-a", "node-b", "node-b"]


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        # every rank alike: nobody
        ([[1.0, 1.0, 1.0, 1.0]] * 5, []),
        # rank 3 1.6x the others on every step
        ([[1.0, 1.0, 1.0, 1.6]] * 5, [(3, "node-b", 1.6)]),
        # 1.15x is within the 1.2x tolerance
        ([[1.0, 1.0, 1.0, 1.15]] * 5, []),
        # slow on 4 of 5 steps: not persistent
        ([[1.0, 1.0, 1.0, 2.0]] * 4 + [[1.0, 1.0, 1.0, 1.0]], []),
        # a single slow step: not persistent
        ([[1.0, 1.0, 1.0, 1.0]] * 4 + [[1.0, 1.0, 1.0, 9.0]], []),
        # the slow rank moves around: nobody is persistently slow
        ([[2.0, 1.0, 1.0, 1.0], [1.0, 2.0, 1.0, 1.0]] * 2 + [[1.0, 1.0, 2.0, 1.0]], []),
        # two slow ranks of four, both named; slowdown is the median ratio over the window
        ([[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 3.0, 2.0], [1.0, 1.0, 2.0, 2.0]],
         [(2, "node-b", 2.0), (3, "node-b", 2.0)]),
        # millisecond times: 3x but under the 10 ms gap, noise
        ([[0.002, 0.002, 0.002, 0.006]] * 5, []),
        # two ranks: the other's time is the median
        ([[0.1, 0.5]] * 5, [(1, "node-a", 5.0)]),
    ],
)
def test_stragglers_table(window, expected):
    found = stragglers(window, NODES[: len(window[0])])
    assert [(s.rank, s.node, pytest.approx(s.slowdown)) for s in found] == expected


def test_one_rank_or_ragged_windows_name_nobody():
    assert stragglers([[5.0]] * 5) == []
    assert stragglers([[1.0, 2.0], [1.0, 2.0, 3.0]]) == []
    assert stragglers([]) == []


def test_ratios_skip_gaps_under_the_floor():
    assert ratios([1.0, 1.0, 1.5]) == [None, None, pytest.approx(1.5)]
    assert ratios([0.0, 0.0, 0.005]) == [None, None, None]


def test_detector_needs_a_full_window_and_reports_each_rank_once():
    detector = Detector(window=3)
    slow = {"rank_step_s": [0.1, 0.1, 0.4]}
    assert detector.observe(slow, ["a", "a", "b"]) == []
    assert detector.observe(slow, ["a", "a", "b"]) == []
    (found,) = detector.observe(slow, ["a", "a", "b"])
    assert found.message() == (
        "straggler: rank 2 on b is 4.0x slower than the median over the last 3 steps"
    )
    assert detector.observe(slow) == [] and [s.rank for s in detector.current] == [2]
    for _ in range(3):  # it recovers: no longer current, and not reported again
        detector.observe({"rank_step_s": [0.1, 0.1, 0.1]})
    assert detector.current == []
    assert detector.observe({"step": 9}) == []  # a record without per-rank times
