"""The winner's samples: a grid drawn by trial-side code (the driver side never builds a model), reused while
the checkpoint and the settings are unchanged (report/samples.json records the checkpoint's hash)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trials.files import atomic_write_text
from trials.layout import CHECKPOINT_FILE

if TYPE_CHECKING:
    from tuner.report.experiment import Experiment

# The winner's grid: 6 x 6 images, probability-flow ODE by the multistep solver on 63 steps (trials.preview:
# as close to a tight solve as dopri5 at rtol 1e-3, for 65 evaluations instead of about 160), fixed seed.
SAMPLE_SETTINGS = {"n": 36, "method": "multistep", "steps": 63, "seed": 0}

# (checkpoint folder, output PNG, SAMPLE_SETTINGS) -> what trials.preview.draw_grid returns
Sampler = Callable[[Path, Path, dict[str, Any]], dict[str, Any]]


def subprocess_sampler(checkpoint: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """`python -m trials.preview` in a child process: the report's own process never builds a model."""
    root = Path(__file__).resolve().parents[2]  # the folder holding tuner/ and trials/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    cmd = [
        sys.executable,
        "-m",
        "trials.preview",
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--n",
        str(settings["n"]),
        "--method",
        str(settings["method"]),
        "--steps",
        str(settings["steps"]),
        "--seed",
        str(settings["seed"]),
        "--device",
        str(settings.get("device", "auto")),
        # One thread: a few seconds for a tuning-sized model, and on a busy machine more threads can make
        # it ten times slower (we measured 41 s against 4.5 s with 2 threads against 1 at load 7 on 2 cores).
        "--threads",
        str(settings.get("threads", 1)),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    last = ""
    for line in proc.stderr:  # its progress lines, passed on as they come
        print(f"  {line.rstrip()}", file=sys.stderr, flush=True)
        last = line.strip() or last
    stdout = proc.stdout.read()
    if proc.wait() != 0:
        raise RuntimeError(last or f"python -m trials.preview exited with status {proc.returncode}")
    return json.loads(stdout.strip().splitlines()[-1])


def winner_samples(exp: Experiment, out_dir: Path, sampler: Sampler | None) -> tuple[Path | None, dict | None, str]:
    """The winner's grid as (png, info, note); reused when the checkpoint and the settings are unchanged."""
    if exp.winner is None:
        return None, None, "No trial has a score yet, so there is no winner to sample from."
    if exp.winner.checkpoint is None:
        return None, None, f"The winner {exp.winner.trial_id} left no checkpoint to sample from."
    png, meta = out_dir / "samples.png", out_dir / "samples.json"
    ckpt_file = exp.winner.checkpoint / CHECKPOINT_FILE
    digest = hashlib.sha256(ckpt_file.read_bytes()).hexdigest()
    if meta.is_file() and png.is_file():
        old = json.loads(meta.read_text())
        if old.get("checkpoint_sha256") == digest and old.get("settings") == SAMPLE_SETTINGS:
            return png, {**old["info"], "reused": True}, ""
    if sampler is None:
        return None, None, "Samples were not drawn (--no-samples)."
    try:
        info = sampler(exp.winner.checkpoint, png, dict(SAMPLE_SETTINGS))
    except Exception as exc:  # noqa: BLE001 - a failed grid costs the picture, not the report
        return (
            None,
            None,
            f"Drawing the samples failed: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__}",
        )
    info = {k: v for k, v in info.items() if k != "png"}
    atomic_write_text(
        meta,
        json.dumps(
            {"checkpoint": str(ckpt_file), "checkpoint_sha256": digest, "settings": SAMPLE_SETTINGS, "info": info},
            indent=2,
        ),
    )
    return png, info, ""
