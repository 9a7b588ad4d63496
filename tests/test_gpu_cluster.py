"""Live: a GPU-sized space on a two-node Ray cluster whose nodes declare one GPU each.

This machine has no GPU, but Ray schedules what nodes declare (`ray start --num-gpus 1`), so the driver's
side of a GPU cluster runs for real here: the CPU-only check must let a space with `gpus_per_trial: 0.25`
run, Ray must pack four trials onto each declared GPU and no more, and each trial must record the GPU Ray
assigned it (`ray.get_gpu_ids()`, `CUDA_VISIBLE_DEVICES`) and what torch could use. Where torch sees no
CUDA (here) the trial says so in one line and trains on the CPU.

The nodes declare more CPUs than four trials need (3 each, half a CPU a trial), and the search allows more
trials at a time than the GPUs hold, so the GPUs are what limits the packing: a trial that ignored its
GPU request would show as a fifth trial on one GPU id. The cluster is started as in tests/test_cluster.py
(its own ports, temp dirs and token; only its own process groups are stopped).
"""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.test_cluster import ray_list, two_node_cluster
from trials.trainer import trial_device

ROOT = Path(__file__).resolve().parents[1]
NUM_TRIALS = 10
CPUS_PER_NODE = 3
TRIALS_PER_GPU = 4
NOTE = "sees no CUDA device: training on the CPU instead"

# vpsde.yaml's shape (its five hyperparameters, TPE + ASHA, a quarter GPU a trial) at tiny.yaml's size.
SPACE = {
    "name": "gpu-tiny",
    "hyperparameters": {
        "lr": {"type": "loguniform", "low": 1.0e-4, "high": 3.0e-3},
        "batch_size": {"type": "choice", "values": [16, 32]},
        "num_res_blocks": {"type": "choice", "values": [1, 2]},
        "ch_mult": {"type": "choice", "values": [[1, 2, 2], [1, 2, 4]]},
        "sampling_eps": {"type": "loguniform", "low": 1.0e-5, "high": 1.0e-3},
    },
    "fixed": {
        "data": {"name": "mnist-5k"},
        "model": {"ch": 8, "attn_resolutions": [], "dropout": 0.0},
        "train": {
            "steps": 20,
            "val_every": 10,
            "log_every": 10,
            "val_images": 32,
            "ema_decay": 0.9,
            "precision": "auto",
        },
        "eval": {
            "batch_size": 8,
            "fast": {"n_images": 4, "method": "rk4", "steps": 2},
            "accurate": {"n_images": 8, "method": "rk4", "steps": 4},
        },
    },
    "search": {
        "algorithm": "tpe",
        "scheduler": "asha",
        "num_samples": NUM_TRIALS,
        "max_concurrent": 12,
        "seed": 0,
        "grace_period": 10,
        "reduction_factor": 2,
        "top_k": 1,
        "max_failures": 0,
    },
    "resources": {"cpus_per_trial": 0.5, "gpus_per_trial": 1 / TRIALS_PER_GPU},
}


def test_a_trial_without_cuda_trains_on_the_cpu_and_says_why():
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here")
    device, note = trial_device("auto", ["0"])
    assert device == torch.device("cpu") and "Ray assigned GPU 0" in note and NOTE in note and "\n" not in note
    device, note = trial_device("cuda", ["1"])  # even when the config asks for CUDA by name
    assert device == torch.device("cpu") and "GPU 1" in note
    assert trial_device("auto", []) == (torch.device("cpu"), None)  # no GPU assigned: nothing to say
    assert trial_device("cpu", ["0"]) == (torch.device("cpu"), None)  # CPU asked for: as asked
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        trial_device("cuda", [])  # train.device: cuda without a GPU anywhere is still the user's error


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    flags = [f"--num-cpus={CPUS_PER_NODE}", "--num-gpus=1"]
    with two_node_cluster(tmp_path_factory.mktemp("gpu-cluster-logs"), flags) as (address, _, env):
        nodes = [n for n in ray_list(address, env, "nodes") if n["state"] == "ALIVE"]
        assert len(nodes) == 2 and all(n["resources_total"].get("GPU") == 1 for n in nodes), nodes
        yield address, env


@pytest.fixture(scope="module")
def gpu_search(gpu_cluster, tmp_path_factory):
    address, env = gpu_cluster
    workdir = tmp_path_factory.mktemp("gpu-tune")
    space = workdir / "gpu-tiny.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    cmd = [
        sys.executable,
        str(ROOT / "tune.py"),
        "--space",
        str(space),
        "--address",
        address,
        "--storage",
        str(workdir / "runs"),
    ]
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    (workdir / "tune.out").write_text(result.stdout)  # kept with pytest's temp folders, to read after a failure
    (workdir / "tune.err").write_text(result.stderr)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    folder = workdir / "runs" / SPACE["name"]
    trials = {}
    for result_file in folder.glob("*/result.json"):
        records = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        trials[records[-1]["trial_id"]] = records
    return result, folder, trials


@pytest.mark.slow
def test_the_cpu_only_check_lets_a_declared_gpu_cluster_run_the_gpu_space(gpu_search):
    result, folder, trials = gpu_search
    assert "is sized for GPUs" not in result.stdout and "Timing 2 training steps" not in result.stdout
    assert "GPUs: 2 on the Ray cluster, 0.25 per trial (4 trials per GPU): up to 8 trials at a time" in result.stdout
    table = pd.read_csv(folder / "trials.csv")
    assert len(table) == NUM_TRIALS and set(table.status) <= {"completed", "stopped early"}
    assert len(trials) == NUM_TRIALS


@pytest.mark.slow
def test_each_trial_records_its_gpu_and_what_torch_could_use(gpu_search):
    result, _, trials = gpu_search
    cuda = torch.cuda.is_available()  # the trials' torch is this one
    for trial_id, records in trials.items():
        placements = {
            (r["node_id"], r["gpu_ids"], r["cuda_visible_devices"], r["device"], r["cuda_available"]) for r in records
        }
        assert len(placements) == 1, f"{trial_id} moved: {placements}"  # recorded once, the same in every report
        node, gpu_ids, visible, device, cuda_available = placements.pop()
        assert len(gpu_ids.split(",")) == 1 and gpu_ids == visible, (gpu_ids, visible)  # Ray's one GPU, exported
        assert cuda_available is cuda and device == ("cuda:0" if cuda else "cpu")
        assert ("gpu_peak_mem_mb" in records[-1]) is cuda
    notes = [line for line in result.stdout.splitlines() if NOTE in line]
    if cuda:
        assert not notes
    else:
        # One line per trial at most (not one per rung): each trial starts once here (no failures allowed).
        assert 1 <= len(notes) <= NUM_TRIALS, notes
        assert all("Ray assigned GPU" in line for line in notes)
    # No error came through the trial's code. (Ray prints its own tracebacks when it ends the actor of a
    # trial ASHA stopped; those are not the trial's.)
    assert "trials/trainable.py" not in result.stdout + result.stderr


@pytest.mark.slow
def test_four_trials_share_each_declared_gpu_and_never_more(gpu_search):
    _, _, trials = gpu_search
    # Each trial's span on its GPU: from the start it recorded to its last report (its own clock).
    spans = {}
    for trial_id, records in trials.items():
        first, last = records[0], records[-1]
        spans[trial_id] = (
            (first["node_id"], first["gpu_ids"]),
            first["started_at"],
            first["started_at"] + last["seconds"],
        )
    peak = {}
    for gpu, begin, _ in spans.values():  # the most spans holding one GPU at once is reached at some span's start
        holding = sum(1 for g, b, e in spans.values() if g == gpu and b <= begin < e)
        peak[gpu] = max(peak.get(gpu, 0), holding)
    assert max(peak.values()) > 1, peak  # fractional GPUs are shared, not one trial per GPU
    assert max(peak.values()) <= TRIALS_PER_GPU, peak  # never a fifth quarter on one GPU
    assert len({node for node, _ in peak}) == 2, peak  # the second node's GPU was used too


# ---- bench/gpu_check.py: what runs without a GPU ---------------------------------------------------------
def test_gpu_check_says_in_one_line_that_it_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here")
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--budget", "60"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("gpu_check: no CUDA device here") and out.stderr.count("\n") == 1, out.stderr


def _fake_check(folder: Path) -> Path:
    """A finished check's folder as tune.py, the trials and the sampler leave it: two trials on one GPU."""
    experiment = folder / "gpu-check-x"
    t0 = 1_000_000.0
    trials = {  # trial id -> (batch, start, [(step, images/s, eval s, NFE, val bpd, peak MiB)])
        "a": (128, t0, [(1000, 900.0, 2.0, 28, 3.1, 800.0), (3000, 1100.0, 2.4, 28, 2.5, 820.0)]),
        "b": (512, t0 + 5, [(1000, 2000.0, 3.0, 28, 3.4, 2900.0)]),
    }
    for trial_id, (batch, started, rungs) in trials.items():
        (experiment / f"run_trial_{trial_id}").mkdir(parents=True)
        lines = [
            json.dumps(
                {
                    "trial_id": trial_id,
                    "step": step,
                    "images_per_sec": ips,
                    "eval_seconds": ev,
                    "nfe": nfe,
                    "val_bpd": bpd,
                    "gpu_peak_mem_mb": peak,
                    "precision": "bf16",
                    "tf32_matmul": True,
                    "tf32_cudnn": True,
                    "device": "cuda:0",
                    "gpu_ids": "0",
                    "cuda_available": True,
                    "started_at": started,
                    "seconds": 60.0 * (i + 1),
                    "config": {"batch_size": batch, "ch_mult": "1,2,4", "num_res_blocks": 1},
                }
            )
            for i, (step, ips, ev, nfe, bpd, peak) in enumerate(rungs)
        ]
        (experiment / f"run_trial_{trial_id}" / "result.json").write_text("\n".join(lines) + "\n")
    pd.DataFrame(
        [
            {
                "trial_id": "a",
                "status": "completed",
                "lr": 3e-4,
                "batch_size": 128,
                "num_res_blocks": 1,
                "ch_mult": "[1, 2, 4]",
                "sampling_eps": 1e-4,
            },
            {
                "trial_id": "b",
                "status": "stopped early",
                "lr": 1e-3,
                "batch_size": 512,
                "num_res_blocks": 1,
                "ch_mult": "[1, 2, 4]",
                "sampling_eps": 1e-5,
            },
        ]
    ).to_csv(experiment / "trials.csv", index=False)
    (experiment / "best_config.yaml").write_text(
        yaml.safe_dump(
            {
                "provenance": {
                    "trial_id": "a",
                    "val_bpd_fast": 2.5,
                    "val_bpd_accurate": 2.61,
                    "val_bpd_accurate_stderr": 0.05,
                    "steps_trained": 3000,
                }
            }
        )
    )
    # Utilisation 90% while trials trained, 0% before they started (Ray starting) and after (the re-scores).
    samples = [
        (t0 - 30, 0, 0.0, 500.0, 143000.0),
        (t0 + 10, 0, 80.0, 4000.0, 143000.0),
        (t0 + 50, 0, 100.0, 4200.0, 143000.0),
        (t0 + 200, 0, 0.0, 600.0, 143000.0),
    ]
    with open(experiment / "gpu_samples.csv", "w") as f:
        f.write("time,gpu,utilization_pct,memory_used_mib,memory_total_mib\n")
        f.writelines(",".join(map(str, s)) + "\n" for s in samples)
    return experiment


def test_gpu_check_reads_a_finished_check_from_its_folder(tmp_path, capsys):
    from bench.gpu_check import print_summary, summarize

    summary = summarize(_fake_check(tmp_path))
    trials = {t["trial_id"]: t for t in summary["trials"]}
    assert trials["a"]["images_per_sec"] == 1000.0 and trials["a"]["peak_gpu_mem_mb"] == 820.0  # median; peak
    assert trials["b"]["batch_size"] == 512 and trials["b"]["steps"] == 1000
    assert [(r["step"], r["trials"], r["eval_seconds"], r["nfe"]) for r in summary["rungs"]] == [
        (1000, 2, 2.5, [28]),
        (3000, 1, 2.4, [28]),
    ]
    assert summary["search_window_s"] == 120.0  # a's start to a's last report
    util = summary["gpu_utilization"]["0"]
    assert (util["samples"], util["mean_pct"], util["memory_used_max_mib"]) == (2, 90.0, 4200.0)
    assert summary["winner"]["trial_id"] == "a" and summary["winner"]["hyperparameters"]["lr"] == 3e-4

    print_summary(summary)
    out = capsys.readouterr().out
    assert "| a | 128 | 1,2,4 | 1 | 3000 | 1000 | bf16 | True / True | cuda:0 (0) | 820 | 2.500 |" in out
    assert "| 1000 | 2 | 2.50 (3.00) | 28 |" in out
    assert "GPU 0: mean 90%, median 90%, max 100%; memory used at most 4200 MiB (2 samples)" in out
    assert "Winner: a (lr 0.0003, batch_size 128" in out and "2.6100 ± 0.0500 accurate" in out


def test_gpu_check_runs_vpsde_yaml_with_four_trials_a_gpu_and_reads_nvidia_smi(tmp_path):
    from bench.gpu_check import parse_smi, write_space
    from tuner.space import load_space

    write_space(ROOT / "search_spaces" / "vpsde.yaml", tmp_path / "check.yaml", gpus=2, trials_per_gpu=4, budget=480)
    space = load_space(tmp_path / "check.yaml")  # what tune.py will load: a valid space
    assert (space.resources.gpus_per_trial, space.search.max_concurrent, space.search.time_budget_s) == (0.25, 8, 480)
    assert space.base_config.data.name == "mnist-5k" and space.base_config.train.steps == 6000  # vpsde.yaml's own
    assert parse_smi("0, 87, 30211, 143771\n1, [N/A], 10, 143771\n", 5.0) == [(5.0, 0, 87.0, 30211.0, 143771.0)]
