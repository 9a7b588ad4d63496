"""The tuning replay's clock and its statistics, on a small synthetic curve table (no Ray, no training)."""

import itertools
import math

import numpy as np
import optuna.distributions as od
import pandas as pd
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from bench.replay import (
    CurveTable,
    Strategy,
    compare_medians,
    median_ci,
    quartiles,
    simulate,
    speedup_interval,
    table_agreement,
)
from tuner.searcher import OptunaSearcher, make_sampler

STEPS = (10, 20, 40)
LRS = (1e-4, 1e-3, 1e-2)


def table(train_seconds=5.0, eval_seconds=1.0, setup=2.0, offset=0.0) -> CurveTable:
    rows = []
    for lr, b in itertools.product(LRS, (16, 32)):
        for step in STEPS:
            for eps in (1e-5, 1e-3):
                value = 10 - math.log10(lr) * step / 40 + (0.5 if eps == 1e-3 else 0.0) + offset
                rows.append(
                    {
                        "lr": lr,
                        "batch_size": b,
                        "num_res_blocks": 1,
                        "ch_mult": "1,2,2",
                        "step": step,
                        "sampling_eps": eps,
                        "val_bpd": value,
                        "eval_seconds": eval_seconds,
                        "train_seconds": train_seconds,
                        "setup_seconds": setup,
                        "diverged": False,
                    }
                )
    return CurveTable(pd.DataFrame(rows))


SPACE = {
    "lr": od.FloatDistribution(1e-4, 1e-2, log=True),
    "batch_size": od.CategoricalDistribution([16, 32]),
    "num_res_blocks": od.CategoricalDistribution([1]),
    "ch_mult": od.CategoricalDistribution(["1,2,2"]),
    "sampling_eps": od.FloatDistribution(1e-5, 1e-3, log=True),
}


def random_searcher(seed):
    return OptunaSearcher(
        SPACE, make_sampler("random", seed, 1), metric="val_bpd", mode="min", full_steps=40, study_name="t"
    )


def test_snap_is_nearest_on_a_log_scale():
    t = table()
    key, eps = t.snap({"lr": 3.5e-3, "batch_size": 32, "num_res_blocks": 1, "ch_mult": "1,2,2", "sampling_eps": 2e-4})
    assert key == (1e-2, 32, 1, "1,2,2") and eps == 1e-3  # log10 3.5e-3 = -2.46 is nearer -2 than -3
    key, eps = t.snap({"lr": 2.9e-3, "batch_size": 16, "num_res_blocks": 1, "ch_mult": "1,2,2", "sampling_eps": 9e-5})
    assert key == (1e-3, 16, 1, "1,2,2") and eps == 1e-5


def test_fifo_clock_runs_every_trial_to_the_end_two_at_a_time():
    # Each trial: setup 2 + 3 rungs x (train 5 + eval 1) = 20 s; 2 slots for 100 s -> 5 rounds of 2 trials.
    run = simulate(Strategy(random_searcher, FIFOScheduler), table(), seed=0, horizon_s=100.0)
    times = sorted(t for t, _ in run.reports)
    assert times == [
        t for r in range(5) for t in (20 * r + 8, 20 * r + 8, 20 * r + 14, 20 * r + 14, 20 * r + 20, 20 * r + 20)
    ]
    assert run.trials == 12  # 10 finished, and the 2 started at 100 s


def test_asha_stops_trials_and_starts_more_in_the_same_time():
    asha = lambda: ASHAScheduler(
        time_attr="step", metric="val_bpd", mode="min", max_t=40, grace_period=10, reduction_factor=2
    )
    fifo_run = simulate(Strategy(random_searcher, FIFOScheduler), table(), seed=1, horizon_s=400.0)
    asha_run = simulate(Strategy(random_searcher, asha), table(), seed=1, horizon_s=400.0)
    assert asha_run.trials > fifo_run.trials
    assert len(asha_run.reports) > len(fifo_run.reports) - asha_run.trials  # stopped trials report fewer rungs


def test_eps_at_scoring_reports_the_best_eps_and_pays_for_every_eps():
    one = simulate(Strategy(random_searcher, FIFOScheduler), table(), seed=0, horizon_s=20.0)
    every = simulate(Strategy(random_searcher, FIFOScheduler, eps_at_scoring=True), table(), seed=0, horizon_s=23.0)
    assert [t for t, _ in every.reports][:1] == [9.0]  # setup 2 + train 5 + two evals of 1 s
    assert min(v for _, v in every.reports) <= min(v for _, v in one.reports)


def test_best_by_and_time_to_target():
    run = simulate(Strategy(random_searcher, FIFOScheduler), table(), seed=0, horizon_s=100.0)
    target = run.best_by(100.0)
    assert run.time_to(target) <= 100.0 and run.best_by(run.time_to(target)) == target
    assert run.time_to(target - 1e-9) == math.inf and run.best_by(1.0) == math.inf


def test_the_best_pick_is_the_report_best_by_names_and_reads_in_another_table():
    run = simulate(Strategy(random_searcher, FIFOScheduler), table(), seed=0, horizon_s=100.0)
    assert len(run.picks) == len(run.reports)
    for seconds in (10.0, 50.0, 100.0):
        pick = run.best_pick_by(seconds)
        assert table().value(*pick) == run.best_by(seconds)
        assert table(offset=0.25).value(*pick) == run.best_by(seconds) + 0.25  # the same point, scored elsewhere
    assert run.best_pick_by(1.0) is None


def test_table_agreement_reads_the_gap_and_the_ordering_of_the_same_points():
    shifted = table_agreement(table(), table(offset=0.25))
    assert list(shifted.step) == list(STEPS) and (shifted.points == 12).all()  # 6 grid points x 2 eps a step
    assert np.allclose(shifted[["gap_median", "gap_min", "gap_max"]], 0.25)
    assert np.allclose(shifted[["kendall_tau", "kendall_tau_best_quarter"]], 1.0)
    flipped = table().frame.assign(val_bpd=lambda f: -f.val_bpd)  # the opposite ordering at every step
    opposite = table_agreement(table(), CurveTable(flipped))
    assert np.allclose(opposite[["kendall_tau", "kendall_tau_best_quarter"]], -1.0)


def test_median_interval_covers_the_median_and_tightens_with_more_seeds():
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=20), rng.normal(size=400)
    for x in (small, large):
        med, lo, hi = median_ci(x)
        assert lo <= med <= hi
    assert (median_ci(large)[2] - median_ci(large)[1]) < (median_ci(small)[2] - median_ci(small)[1])


def test_quartiles_count_a_target_never_reached_as_the_longest_time():
    assert quartiles([1.0, 2.0, 3.0, math.inf]) == (1.0, math.inf)
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0, math.inf, math.inf, math.inf])[1] == math.inf
    assert quartiles([4.0, 1.0, 3.0, 2.0]) == (1.0, 4.0)


def test_the_default_row_is_the_spaces_own_search_settings():
    from pathlib import Path

    import yaml

    from bench.tuning_efficiency import replay_strategies
    from tuner.space import parse_space

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "search_spaces" / "cpu.yaml").read_text())
    raw["search"].update(algorithm="gp", scheduler="asha", grace_period=40, reduction_factor=4, startup_trials=6)
    strategies, default = replay_strategies(parse_space(raw, "gp.yaml"), table())
    assert default == "GP + ASHA, grace 40, rf 4, 6 start-up" and default in strategies
    assert next(iter(strategies)) == "random + FIFO"  # the baseline every speedup is measured against
    scheduler = strategies[default].make_scheduler()
    assert isinstance(scheduler, ASHAScheduler) and scheduler._reduction_factor == 4


def test_medians_are_better_only_when_the_intervals_are_apart():
    assert compare_medians((2.50, 2.48, 2.52), (2.60, 2.53, 2.70)) == "better, intervals apart"
    assert compare_medians((2.50, 2.48, 2.53), (2.60, 2.53, 2.70)) == "intervals overlap"  # touching is not apart
    assert compare_medians((2.70, 2.65, 2.75), (2.60, 2.55, 2.64)) == "worse, intervals apart"


def test_speedup_interval_brackets_the_ratio_of_medians():
    rng = np.random.default_rng(3)
    slow, fast = rng.exponential(30.0, 200), rng.exponential(10.0, 200)
    lo, hi = speedup_interval(slow, fast)
    assert lo < np.median(slow) / np.median(fast) < hi and lo > 1.5  # 3x apart: the interval excludes 1
    assert speedup_interval(rng.permutation(slow), fast) == (lo, hi)  # the order runs finished in does not count
    lo, hi = speedup_interval(slow, rng.permutation(slow))
    assert lo < 1.0 < hi  # the same times: no speedup can be claimed
    # Half the baseline's seeds never reach the target: its resampled medians are often inf.
    never = np.concatenate([np.full(100, np.inf), rng.exponential(30.0, 100)])
    assert speedup_interval(never, fast)[1] == np.inf


def test_more_slots_run_more_trials_at_once_on_the_same_clock():
    # 8 slots: 8 trials side by side, each 20 s (setup 2 + 3 rungs of 6 s); 40 s -> 2 rounds of 8, and 8 started.
    run = simulate(Strategy(random_searcher, FIFOScheduler), table(), seed=0, horizon_s=40.0, slots=8)
    times = sorted(t for t, _ in run.reports)
    assert times == sorted([t for r in range(2) for t in (20 * r + 8, 20 * r + 14, 20 * r + 20)] * 8)
    assert run.trials == 24


def test_replay_budgets_keep_the_compute_of_two_slots_unless_given():
    from bench.tuning_efficiency import replay_budgets

    assert replay_budgets(2) == (5, 10, 20, 40)
    assert replay_budgets(8) == (1.25, 2.5, 5, 10)  # 8 slots x 10 min = 2 slots x 40 min
    assert replay_budgets(32)[-1] == 2.5
    assert replay_budgets(8, [20, 5]) == (5, 20)  # wall-clock minutes as given, in order
