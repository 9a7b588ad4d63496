"""The winner and its ties, from re-scores alone (no Ray)."""

import math
import random

from tuner.export import TIE_STDERRS, paired_to_winner


def rescore(per_image, failed=False):
    mean = sum(per_image) / len(per_image)
    return {"mean": mean, "per_image": per_image, "failed": failed}


def test_paired_difference_separates_trials_whose_error_bars_overlap():
    rng = random.Random(0)
    images = [rng.uniform(1.5, 4.5) for _ in range(32)]  # image-to-image spread ~0.9 bits/dim
    winner = [v + rng.gauss(0, 0.01) for v in images]
    slightly_worse = [v + 0.05 + rng.gauss(0, 0.01) for v in images]  # 0.05 worse on every image
    same = [v + rng.gauss(0, 0.01) for v in images]
    rescores = {"w": rescore(winner), "worse": rescore(slightly_worse), "same": rescore(same)}

    # Unpaired, the two means are far inside each other's error bars ...
    se = lambda xs: (sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 / len(xs) ** 0.5
    assert abs(rescores["worse"]["mean"] - rescores["w"]["mean"]) < se(winner) + se(slightly_worse)
    # ... paired, the difference is measured to a fraction of that.
    out = paired_to_winner(rescores, "w")
    assert math.isclose(out["worse"]["paired_diff"], 0.05, abs_tol=0.01)
    assert out["worse"]["paired_diff_stderr"] < 0.005
    assert out["worse"]["tied_with_winner"] is False
    assert out["same"]["tied_with_winner"] is True
    assert out["w"] == {"paired_diff": 0.0, "paired_diff_stderr": 0.0, "tied_with_winner": True}


def test_tie_rule_is_two_standard_errors():
    base = [2.0, 3.0, 4.0, 5.0]
    for shift, tied in ((0.0, True), (1.0, False)):
        noisy = [b + shift + d for b, d in zip(base, (0.1, -0.1, 0.1, -0.1))]
        c = paired_to_winner({"w": rescore(base), "x": rescore(noisy)}, "w")["x"]
        assert c["tied_with_winner"] is (c["paired_diff"] <= TIE_STDERRS * c["paired_diff_stderr"]) is tied


def test_failed_or_unpaired_rescores_are_left_out():
    rescores = {"w": rescore([2.0, 3.0, 4.0]), "failed": rescore([2.0, 3.0, 4.0], failed=True),
                "other_images": rescore([2.0, 3.0]), "blown_up": rescore([2.0, math.inf, 4.0])}
    assert set(paired_to_winner(rescores, "w")) == {"w"}
    assert paired_to_winner(rescores, "missing") == {}
