"""A space sized for GPUs on a cluster without GPUs: the estimate's arithmetic, and tune.py stopping with exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.tune.schedulers import ASHAScheduler

from tuner import cpu_only
from tuner.search_tables import SCHEDULERS, asha_rungs
from tuner.space import load_space, parse_space

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("max_t, grace, eta", [(160, 40, 2), (6000, 1000, 3), (20, 10, 2), (100, 7, 3)])
def test_rungs_are_the_milestones_rays_asha_uses(max_t, grace, eta):
    scheduler = ASHAScheduler(
        time_attr="step", metric="val_bpd", mode="min", max_t=max_t, grace_period=grace, reduction_factor=eta
    )
    milestones = sorted(r.milestone if hasattr(r, "milestone") else r[0] for r in scheduler._brackets[0]._rungs)
    assert asha_rungs(max_t, grace, eta) == [m for m in milestones if m < max_t]
    assert SCHEDULERS["asha"].rungs(max_t, grace, eta) == asha_rungs(max_t, grace, eta)


def test_expected_steps_follow_ashas_promotion_rule():
    cpu = load_space(ROOT / "search_spaces" / "cpu.yaml")  # one rung, 40; full length 160; eta 4
    assert cpu_only.expected_steps_per_trial(cpu) == pytest.approx(40 + 120 / 4)
    gpu = load_space(ROOT / "search_spaces" / "vpsde.yaml")  # rungs 1000, 3000; full length 6000; eta 3
    assert cpu_only.expected_steps_per_trial(gpu) == pytest.approx(1000 + 2000 / 3 + 3000 / 9)
    raw = yaml.safe_load((ROOT / "search_spaces" / "cpu.yaml").read_text())
    raw["search"]["scheduler"] = "fifo"
    assert cpu_only.expected_steps_per_trial(parse_space(raw, "fifo.yaml")) == 160


def test_estimate_counts_the_trials_that_fit_side_by_side():
    gpu = load_space(ROOT / "search_spaces" / "vpsde.yaml")  # 48 trials, 8 at a time, 2 CPUs each
    assert cpu_only.sized_for_gpus(gpu) and not cpu_only.sized_for_gpus(load_space(ROOT / "search_spaces" / "cpu.yaml"))
    two_cores = cpu_only.estimate(gpu, seconds_per_step=3.0, cluster_cpus=2)
    assert two_cores.parallel == 1 and two_cores.seconds == pytest.approx(3.0 * 2000 * 48)
    big = cpu_only.estimate(gpu, seconds_per_step=3.0, cluster_cpus=64)
    assert big.parallel == 8 and big.seconds == pytest.approx(3.0 * 2000 * 48 / 8)
    lines = cpu_only.explain(gpu, two_cores, "batch_size 256")
    assert "3.3 days" in lines[1] and "search_spaces/cpu.yaml" in lines[2] and "--allow-cpu" in lines[2]
    assert cpu_only.middle_params(gpu) == {
        "lr": pytest.approx(1e-5**0.5 * 1e-2**0.5),
        "batch_size": 256,
        "num_res_blocks": 2,
        "ch_mult": "1,2,4",
        "sampling_eps": pytest.approx(1e-4),
    }


@pytest.mark.slow
def test_tune_stops_a_gpu_space_on_a_cluster_without_gpus(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    raw = yaml.safe_load((ROOT / "search_spaces" / "tiny.yaml").read_text())
    raw["resources"]["gpus_per_trial"] = 0.5
    space = tmp_path / "gpu.yaml"
    space.write_text(yaml.safe_dump(raw))
    out = subprocess.run(
        [sys.executable, str(ROOT / "tune.py"), "--space", str(space), "--storage", str(tmp_path / "runs")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_DEDUP_LOGS": "0"},
    )
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "is sized for GPUs (resources.gpus_per_trial: 0.5), but this Ray cluster has no GPU" in out.stdout
    assert "s per training step of its model" in out.stdout and "Estimate: 4 trials" in out.stdout
    assert "search_spaces/cpu.yaml" in out.stdout
    error = [line for line in out.stderr.splitlines() if line.startswith("tune.py: error:")]
    assert len(error) == 1 and "--allow-cpu" in error[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "runs" / "tiny").exists()  # nothing written for the experiment
