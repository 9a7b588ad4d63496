"""GPU check: the headline search (search_spaces/vpsde.yaml on mnist-5k) on this machine's GPUs, briefly.

    python bench/gpu_check.py [--budget 480] [--trials-per-gpu 4] [--storage runs/gpu_check]
    python bench/gpu_check.py --summarize runs/gpu_check/<experiment>    # print a finished check again

It runs `tune.py` as a user would (a local Ray, which finds the GPUs itself) on vpsde.yaml with a time budget
and `trials-per-gpu` trials sharing each GPU (gpus_per_trial 1/4, max_concurrent = GPUs x 4), samples
`nvidia-smi` every 2 s in a background thread while it runs, then prints from the experiment folder: per
trial the training images per second, precision and TF32 state, device and Ray's GPU, peak GPU memory
(torch.cuda.max_memory_allocated, which the trials report on CUDA); per rung the evaluator's seconds and
NFE; the GPUs' utilisation during the search; and the winner. A machine without CUDA gets one line and exit
status 2. Everything it prints is also kept in the experiment folder (gpu_check.json, gpu_samples.csv).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLES_CSV = "gpu_samples.csv"
SUMMARY_JSON = "gpu_check.json"
SMI_QUERY = "index,utilization.gpu,memory.used,memory.total"


# ---- running ------------------------------------------------------------------------------------------
def cuda_or_exit() -> dict[str, Any]:
    """What torch sees of CUDA here; without a device, one line on stderr and exit status 2."""
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        print(
            f"gpu_check: no CUDA device here (torch {torch.__version__}, {build}); run it on a machine with a GPU",
            file=sys.stderr,
        )
        sys.exit(2)
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count(),
        "gpu_name": torch.cuda.get_device_name(0),
        "bf16": torch.cuda.is_bf16_supported(),
    }


class GpuSampler(threading.Thread):
    """`nvidia-smi` every `interval` seconds: (unix time, gpu index, utilisation %, memory used MiB, total MiB)."""

    def __init__(self, interval: float = 2.0):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, int, float, float, float]] = []
        self.error = ""
        self._halt = threading.Event()

    def run(self) -> None:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            self.error = "nvidia-smi not found: no utilisation samples"
            return
        while not self._halt.is_set():
            now = time.time()
            try:
                out = subprocess.run(
                    [smi, f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                self.samples.extend(parse_smi(out.stdout, now))
            except (OSError, subprocess.TimeoutExpired) as exc:  # a slow sample is skipped, not fatal
                self.error = f"nvidia-smi: {exc}"
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=15)


def parse_smi(text: str, when: float) -> list[tuple[float, int, float, float, float]]:
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            rows.append((when, int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3])))
        except (ValueError, IndexError):  # "[N/A]" or a driver message
            continue
    return rows


def write_space(source: Path, out: Path, gpus: int, trials_per_gpu: int, budget: float) -> dict[str, Any]:
    raw = yaml.safe_load(source.read_text())
    concurrent = gpus * trials_per_gpu
    raw["search"].update(time_budget_s=budget, max_concurrent=concurrent)
    # The space's CPUs per trial, unless this machine has too few cores for that many trials at once.
    cpus = min(float(raw["resources"].get("cpus_per_trial", 1)), max(1, (os.cpu_count() or 1) // concurrent))
    raw["resources"].update(gpus_per_trial=1 / trials_per_gpu, cpus_per_trial=cpus)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw


def run_check(args) -> Path:
    cuda = cuda_or_exit()
    storage = args.storage.resolve()
    storage.mkdir(parents=True, exist_ok=True)
    name = args.name or f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"
    space_file = storage / f"{name}.yaml"
    write_space(args.space, space_file, cuda["gpus"], args.trials_per_gpu, args.budget)
    cmd = [sys.executable, str(ROOT / "tune.py"), "--space", str(space_file), "--name", name, "--storage", str(storage)]
    print(
        f"gpu_check: {cuda['gpus']} x {cuda['gpu_name']} (torch {cuda['torch']}, CUDA {cuda['cuda']}); "
        f"{args.space.name} on mnist-5k, {args.trials_per_gpu} trials per GPU, {args.budget:.0f} s search budget\n"
        f"$ {' '.join(cmd)}",
        flush=True,
    )
    sampler = GpuSampler(args.interval)
    sampler.start()
    started = time.time()
    log = storage / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=storage, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # shown as it comes, and kept
            sys.stdout.write(line)
            out.write(line)
        status = proc.wait()
    sampler.stop()
    experiment = storage / name
    experiment.mkdir(exist_ok=True)
    write_samples(experiment / SAMPLES_CSV, sampler.samples)
    meta = {
        **cuda,
        "space": str(args.space),
        "trials_per_gpu": args.trials_per_gpu,
        "budget_s": args.budget,
        "tune_exit_status": status,
        "tune_seconds": time.time() - started,
        "sampler_error": sampler.error,
    }
    (experiment / "gpu_check_run.json").write_text(json.dumps(meta, indent=1))
    if status not in (0, 3):  # 3: only MLflow records left to send; the search and its files are complete
        print(f"gpu_check: tune.py exited with {status}; its output is in {log}", file=sys.stderr)
    return experiment


def write_samples(path: Path, samples) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["time", "gpu", "utilization_pct", "memory_used_mib", "memory_total_mib"])
        w.writerows(samples)


# ---- reading a finished check -------------------------------------------------------------------------
def _median(values) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def trial_records(experiment: Path) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for result_file in sorted(experiment.glob("*/result.json")):
        records = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        records = [r for r in records if "val_bpd" in r]
        if records:
            out[records[-1]["trial_id"]] = records
    return out


def summarize(experiment: Path) -> dict[str, Any]:
    """Everything the check prints, from the experiment folder alone (the trials' result.json files,
    trials.csv and best_config.yaml from the export, gpu_samples.csv from the sampler)."""
    from tuner.export import read_provenance, read_table

    trials = []
    rungs: dict[int, list[dict[str, Any]]] = {}
    spans = []
    for trial_id, records in trial_records(experiment).items():
        first, last = records[0], records[-1]
        config = last.get("config", {})
        peaks = [r["gpu_peak_mem_mb"] for r in records if "gpu_peak_mem_mb" in r]
        trials.append(
            {
                "trial_id": trial_id,
                "batch_size": config.get("batch_size"),
                "ch_mult": config.get("ch_mult"),
                "num_res_blocks": config.get("num_res_blocks"),
                "steps": last.get("step"),
                "images_per_sec": _median(r.get("images_per_sec") for r in records),
                "precision": last.get("precision", ""),
                "tf32_matmul": last.get("tf32_matmul"),
                "tf32_cudnn": last.get("tf32_cudnn"),
                "device": last.get("device", ""),
                "gpu_ids": last.get("gpu_ids", ""),
                "cuda_available": last.get("cuda_available"),
                "peak_gpu_mem_mb": max(peaks) if peaks else math.nan,
                "val_bpd_last": last.get("val_bpd"),
            }
        )
        for r in records:
            rungs.setdefault(int(r["step"]), []).append(r)
        if "started_at" in first:
            spans.append((first["started_at"], first["started_at"] + last.get("seconds", 0.0)))
    rung_rows = [
        {
            "step": step,
            "trials": len(rs),
            "eval_seconds": _median(r.get("eval_seconds") for r in rs),
            "eval_seconds_max": max((r.get("eval_seconds", math.nan) for r in rs), default=math.nan),
            "nfe": sorted({int(r["nfe"]) for r in rs if "nfe" in r}),
        }
        for step, rs in sorted(rungs.items())
    ]
    window = (min(s for s, _ in spans), max(e for _, e in spans)) if spans else None
    winner = {}
    provenance = read_provenance(experiment)
    table = read_table(experiment)
    if provenance:
        winner = {
            k: provenance.get(k)
            for k in ("trial_id", "val_bpd_fast", "val_bpd_accurate", "val_bpd_accurate_stderr", "steps_trained")
        }
        if table is not None:
            row = table[table.trial_id == provenance.get("trial_id")]
            if len(row):
                winner["hyperparameters"] = {
                    c: row.iloc[0][c]
                    for c in ("lr", "batch_size", "num_res_blocks", "ch_mult", "sampling_eps")
                    if c in row.columns
                }
    run_meta_path = experiment / "gpu_check_run.json"
    return {
        "experiment": str(experiment),
        "trials": trials,
        "rungs": rung_rows,
        "gpu_utilization": gpu_utilization(experiment / SAMPLES_CSV, window),
        "search_window_s": (window[1] - window[0]) if window else math.nan,
        "winner": winner,
        "run": json.loads(run_meta_path.read_text()) if run_meta_path.is_file() else {},
    }


def gpu_utilization(path: Path, window: tuple[float, float] | None) -> dict[str, dict[str, float]]:
    """Per GPU, over the samples taken while trials trained (all samples when that is unknown)."""
    if not path.is_file():
        return {}
    by_gpu: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            t = float(row["time"])
            if window is None or window[0] <= t <= window[1]:
                by_gpu.setdefault(row["gpu"], []).append((float(row["utilization_pct"]), float(row["memory_used_mib"])))
    return {
        gpu: {
            "samples": len(v),
            "mean_pct": statistics.fmean(u for u, _ in v),
            "median_pct": statistics.median(u for u, _ in v),
            "max_pct": max(u for u, _ in v),
            "memory_used_max_mib": max(m for _, m in v),
        }
        for gpu, v in sorted(by_gpu.items())
    }


def _fmt(value, spec: str = ".0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def print_summary(summary: dict[str, Any]) -> None:
    run = summary["run"]
    if run:
        print(
            f"\nGPU check of {summary['experiment']}: {run.get('gpus')} x {run.get('gpu_name')}, torch "
            f"{run.get('torch')}, CUDA {run.get('cuda')}; {run.get('trials_per_gpu')} trials per GPU, "
            f"{run.get('budget_s', 0):.0f} s budget; tune.py {run.get('tune_seconds', 0):.0f} s, "
            f"exit status {run.get('tune_exit_status')}"
        )
    else:
        print(f"\nGPU check of {summary['experiment']}")
    trials = sorted(summary["trials"], key=lambda t: t["trial_id"])
    print(f"\nTrials ({len(trials)}; search window {_fmt(summary['search_window_s'])} s):\n")
    print(
        "| trial | batch | ch_mult | res blocks | steps | train images/s | precision | TF32 matmul / cuDNN | "
        "device (Ray GPU) | peak GPU MiB | last fast val bpd |"
    )
    print("|---|---:|---|---:|---:|---:|---|---|---|---:|---:|")
    for t in trials:
        tf32 = f"{_fmt(t['tf32_matmul'])} / {_fmt(t['tf32_cudnn'])}"
        print(
            f"| {t['trial_id']} | {_fmt(t['batch_size'])} | {_fmt(t['ch_mult'])} | {_fmt(t['num_res_blocks'])} | "
            f"{_fmt(t['steps'])} | {_fmt(t['images_per_sec'])} | {t['precision']} | {tf32} | "
            f"{t['device']} ({t['gpu_ids'] or 'none'}) | {_fmt(t['peak_gpu_mem_mb'])} | {_fmt(t['val_bpd_last'], '.3f')} |"
        )
    print("\nPer rung (fast fidelity):\n")
    print("| step | trials | evaluator s: median (max) | NFE |")
    print("|---:|---:|---:|---|")
    for r in summary["rungs"]:
        print(
            f"| {r['step']} | {r['trials']} | {_fmt(r['eval_seconds'], '.2f')} ({_fmt(r['eval_seconds_max'], '.2f')}) | "
            f"{', '.join(map(str, r['nfe'])) or '-'} |"
        )
    util = summary["gpu_utilization"]
    print("\nGPU utilisation while trials trained (nvidia-smi samples):")
    if not util:
        print(f"  none recorded{': ' + run['sampler_error'] if run.get('sampler_error') else ''}")
    for gpu, u in util.items():
        print(
            f"  GPU {gpu}: mean {u['mean_pct']:.0f}%, median {u['median_pct']:.0f}%, max {u['max_pct']:.0f}%; "
            f"memory used at most {u['memory_used_max_mib']:.0f} MiB ({u['samples']} samples)"
        )
    w = summary["winner"]
    if not w:
        print("\nWinner: none (no best_config.yaml: the search did not finish its export)")
    else:
        hps = ", ".join(f"{k} {_fmt(v, '.3g')}" for k, v in w.get("hyperparameters", {}).items())
        print(
            f"\nWinner: {w['trial_id']} ({hps}): val bits/dim {_fmt(w['val_bpd_accurate'], '.4f')} ± "
            f"{_fmt(w['val_bpd_accurate_stderr'], '.4f')} accurate, {_fmt(w['val_bpd_fast'], '.4f')} fast, "
            f"{_fmt(w['steps_trained'])} steps"
        )


def main() -> None:
    from trials.cli import OneLineArgumentParser, positive_float, positive_int

    p = OneLineArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "vpsde.yaml")
    p.add_argument("--budget", type=positive_float, default=480.0, help="search time budget, seconds")
    p.add_argument("--trials-per-gpu", type=positive_int, default=4)
    p.add_argument("--storage", type=Path, default=Path("runs") / "gpu_check")
    p.add_argument("--name", help="experiment name (default: gpu-check-<date>-<time>)")
    p.add_argument("--interval", type=positive_float, default=2.0, help="seconds between nvidia-smi samples")
    p.add_argument(
        "--summarize",
        type=Path,
        metavar="EXPERIMENT_DIR",
        help="print the summary of a finished check's folder (no GPU needed)",
    )
    args = p.parse_args()
    if args.summarize is not None:
        if not args.summarize.is_dir():
            p.error(f"--summarize: no such folder {args.summarize}")
        experiment = args.summarize
    else:
        experiment = run_check(args)
    summary = summarize(experiment)
    (experiment / SUMMARY_JSON).write_text(json.dumps(summary, indent=1, default=str))
    print_summary(summary)


if __name__ == "__main__":
    main()
