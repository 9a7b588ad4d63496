"""The experiment report: what a tuning run found, as PNG figures and one self-contained HTML page.

    python -m tuner.report runs/<name> [--space FILE] [--no-samples]

`tune.py` writes it at the end of a search (and after `--resume`) and attaches it to the MLflow parent run;
this command rebuilds it from the experiment folder alone, finished or interrupted. It reads:

  space.yaml                 the search space (tune.py keeps a copy; --space for older experiments)
  <trial folders>            Tune's params.json and result.json per trial: the val bits/dim at every rung
  experiment_state-*.json    Tune's trial statuses, for an experiment that never reached the export
  trials.csv, rescores.json, best_config.yaml   the export, when the search finished

and writes <experiment>/report/:

  report.html            everything below on one page; figures embedded as base64 PNGs, no scripts, nothing
                         fetched, so it opens offline and travels as one file
  learning_curves.png    val bits/dim (fast fidelity) against step for every trial, coloured by status, with
                         ASHA's rungs and a marker where each stopped trial stopped
  importance.png         Optuna's fANOVA importance of each hyperparameter for the final val bits/dim, over
                         the trials that reached the full length (omitted, with the reason, below two)
  hyperparameters.png    each hyperparameter against the final val bits/dim (log axes for log ranges)
  rescores.png           the accurate re-scores with their standard errors, and which tie with the winner
  samples.png            the winner's samples: probability-flow ODE at a loose tolerance from its checkpoint
  report.json            the numbers behind the page (importance and the trials it used, ties, samples)

The driver side never builds a model, so the sample grid comes from trial-side code: a Ray task during
tune.py (the `sampler` argument), or `python -m trials.preview` as a subprocess here. An unchanged
checkpoint reuses the grid already drawn (report/samples.json records the checkpoint's hash).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import html
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pandas as pd
import yaml

from trials.cli import UserError
from trials.files import atomic_write_text
from tuner.cpu_only import asha_rungs
from tuner.mlflow_runs import is_finite_number
from tuner.export import TIE_STDERRS
from trials.progress import Progress
from tuner.space import SearchSpace, SpaceError, load_space
from tuner.tracking import trial_status

REPORT_DIR = "report"
SPACE_COPY = "space.yaml"
CHECKPOINT_FILE = "trainer.pt"  # inside each Tune checkpoint folder (trials.trainable.CHECKPOINT_FILE)
# The winner's grid: 6 x 6 images, probability-flow ODE at a loose tolerance, fixed seed.
SAMPLE_SETTINGS = {"n": 36, "rtol": 1e-3, "atol": 1e-3, "seed": 0}
STATUS_COLOURS = {
    "completed": "#1f77b4",
    "stopped early": "#ff7f0e",
    "errored": "#d62728",
    "diverged": "#9467bd",
    "interrupted": "#7f7f7f",
    "not started": "#bbbbbb",
}
END_MARKERS = {"completed": "o", "stopped early": "v", "errored": "X", "diverged": "x", "interrupted": ">"}
FIGURES = ("learning_curves", "importance", "hyperparameters", "rescores", "samples")

# (checkpoint folder, output PNG, SAMPLE_SETTINGS) -> what trials.preview.draw_grid returns
Sampler = Callable[[Path, Path, dict[str, Any]], dict[str, Any]]


class ReportError(UserError, ValueError):
    """The folder is not an experiment the report can read; one line, exit 2."""


# ---- what the experiment folder holds ---------------------------------------------------------------
@dataclass
class TrialRecord:
    trial_id: str
    status: str
    params: dict[str, Any]  # as the searcher sampled them (list choices as their 'a,b,c' labels)
    history: pd.DataFrame  # one row per reported step: step, val_bpd, val_bpd_stderr
    folder: Path | None = None

    @property
    def steps(self) -> int:
        return int(self.history["step"].iloc[-1]) if len(self.history) else 0

    @property
    def final_bpd(self) -> float:
        return float(self.history["val_bpd"].iloc[-1]) if len(self.history) else math.nan

    def checkpoint(self) -> Path | None:
        """The trial's newest Tune checkpoint folder that holds a trainer checkpoint."""
        if self.folder is None:
            return None
        found = sorted(p for p in self.folder.glob("checkpoint_*") if (p / CHECKPOINT_FILE).is_file())
        return found[-1] if found else None


@dataclass
class Winner:
    trial_id: str
    bpd: float
    stderr: float
    fidelity: str  # "accurate": best re-score; "fast": best last fast score (the search did not finish)
    checkpoint: Path | None


@dataclass
class Experiment:
    folder: Path
    space: SearchSpace
    trials: list[TrialRecord]
    rescores: dict[str, dict[str, Any]]
    table: pd.DataFrame | None  # trials.csv when the search finished
    winner: Winner | None
    finished: bool

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def max_steps(self) -> int:
        return self.space.base_config.train.steps


def save_space(experiment_dir: Path, space: SearchSpace) -> None:
    """Keep the space file in the experiment folder (once: a resume leaves the original), so the report can
    be rebuilt from the folder alone."""
    target = Path(experiment_dir) / SPACE_COPY
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(Path(space.source).read_bytes())
    tmp.replace(target)


def load_experiment(folder: Path, space: SearchSpace | None = None) -> Experiment:
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder}: no such experiment folder")
    if space is None:
        if not (folder / SPACE_COPY).is_file():
            raise ReportError(f"{folder}: no {SPACE_COPY} (an experiment started before the report existed?): "
                              "pass the space it ran with as --space FILE")
        try:
            space = load_space(folder / SPACE_COPY)
        except SpaceError as exc:
            raise ReportError(str(exc)) from None
    states = _tune_states(folder)
    table = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str}) if (folder / "trials.csv").is_file() else None
    csv_status = dict(zip(table.trial_id, table.status)) if table is not None and len(table) else {}
    rescores = json.loads((folder / "rescores.json").read_text()) if (folder / "rescores.json").is_file() else {}

    trials = []
    # In the order Tune created the trials (its state lists them so; the searcher's study has the same order),
    # which makes the seeded importance below reproducible: fANOVA's forest depends on the row order.
    created = {name: i for i, name in enumerate(states)}
    subs = [p for p in folder.iterdir() if (p / "params.json").is_file()]
    for sub in sorted(subs, key=lambda p: (created.get(p.name, len(created)), p.name)):
        records = _results(sub / "result.json")
        state = states.get(sub.name, {})
        trial_id = state.get("trial_id") or (records[-1].get("trial_id") if records else None) or sub.name
        last = records[-1] if records else {}
        if trial_id in csv_status:
            status = csv_status[trial_id]
        elif state:
            status = trial_status(SimpleNamespace(status=state["status"], last_result=last), space.base_config.train.steps)
        else:
            status = "interrupted"
        history = pd.DataFrame([{"step": int(r["step"]), "val_bpd": float(r.get("val_bpd", math.nan)),
                                 "val_bpd_stderr": float(r.get("val_bpd_stderr", math.nan))}
                                for r in records if "step" in r], columns=["step", "val_bpd", "val_bpd_stderr"])
        # A trial retried from its checkpoint reports the steps after that checkpoint again; keep the latest.
        history = history.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
        params = json.loads((sub / "params.json").read_text())
        trials.append(TrialRecord(trial_id, status, params, history, sub))
    if not trials and table is None:
        raise ReportError(f"{folder}: no trials found (not a tune.py experiment folder, or none has started)")
    finished = table is not None
    return Experiment(folder, space, trials, rescores, table, _winner(folder, trials, rescores, table), finished)


def _tune_states(folder: Path) -> dict[str, dict[str, str]]:
    """Tune's own record of each trial (by its folder name): trial_id and status (TERMINATED, ERROR, ...)."""
    files = sorted(folder.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        raw = json.loads(files[-1].read_text())
        out = {}
        for entry in raw.get("trial_data", []):
            trial = json.loads(entry[0])
            out[Path(trial.get("relative_logdir", "")).name] = {"trial_id": trial["trial_id"], "status": trial["status"]}
        return out
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return {}  # a state file from another Ray version: statuses then come from trials.csv or the results


def _results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # a line cut short by an interruption
    return records


def _winner(folder: Path, trials: list[TrialRecord], rescores: dict, table: pd.DataFrame | None) -> Winner | None:
    by_id = {t.trial_id: t for t in trials}
    provenance = {}
    if (folder / "best_config.yaml").is_file():
        provenance = (yaml.safe_load((folder / "best_config.yaml").read_text()) or {}).get("provenance") or {}
    trial_id, fidelity = provenance.get("trial_id"), None
    if trial_id is None:
        good = {tid: r["mean"] for tid, r in rescores.items() if not r.get("failed") and is_finite_number(r.get("mean"))}
        if good:
            trial_id, fidelity = min(good, key=good.get), "accurate"
    if trial_id is None:
        finite = [t for t in trials if t.status not in ("errored", "diverged") and is_finite_number(t.final_bpd)]
        if not finite:
            return None
        trial_id, fidelity = min(finite, key=lambda t: t.final_bpd).trial_id, "fast"
    rescore = rescores.get(trial_id, {})
    if fidelity is None:
        fidelity = "accurate" if is_finite_number(provenance.get("val_bpd_accurate")) else "fast"
    trial = by_id.get(trial_id)
    if fidelity == "accurate":
        bpd, stderr = float(rescore.get("mean", provenance.get("val_bpd_accurate"))), float(rescore.get("stderr", math.nan))
    else:
        bpd = trial.final_bpd if trial is not None else float(provenance.get("val_bpd_fast") or math.nan)
        stderr = float(trial.history["val_bpd_stderr"].iloc[-1]) if trial is not None and len(trial.history) else math.nan
    checkpoint = trial.checkpoint() if trial is not None else None
    if checkpoint is None and provenance.get("checkpoint") and (Path(provenance["checkpoint"]) / CHECKPOINT_FILE).is_file():
        checkpoint = Path(provenance["checkpoint"])
    return Winner(trial_id, bpd, stderr, fidelity, checkpoint)


# ---- the numbers behind the figures -------------------------------------------------------------------
@dataclass
class Importance:
    values: dict[str, float] | None  # None: omitted, see note
    trial_ids: list[str]
    note: str


def importance(exp: Experiment) -> Importance:
    """fANOVA importance (Optuna's default evaluator, seeded) for the final fast val bits/dim, over the trials
    that reached the full length: a trial ASHA stopped early was scored after fewer steps, so its score
    answers another question. The study is built in memory from the records, not taken from the searcher."""
    import optuna

    full = [t for t in exp.trials if t.status == "completed" and t.steps >= exp.max_steps and is_finite_number(t.final_bpd)]
    ids = [t.trial_id for t in full]
    if len(full) < 2:
        return Importance(None, ids, f"Omitted: importance needs at least 2 trials that reached the full "
                                    f"{exp.max_steps} steps, and this experiment has {len(full)}.")
    if len({t.final_bpd for t in full}) == 1:
        return Importance(None, ids, "Omitted: every trial that reached the full length has the same score.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = exp.space.to_optuna()
    study = optuna.create_study(direction="minimize")
    try:
        for t in full:
            study.add_trial(optuna.trial.create_trial(
                params={name: t.params[name] for name in distributions}, distributions=distributions, value=t.final_bpd))
    except (KeyError, ValueError) as exc:
        return Importance(None, ids, f"Omitted: a trial's hyperparameters do not fit the space file ({exc}).")
    values = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    n = len(full)
    rough = ("With this few trials the estimate is rough: it says which hyperparameters moved the score among "
             "these trials, not how they act over the whole space." if n < 20 else
             "It says which hyperparameters moved the score among these trials.")
    note = (f"fANOVA (Optuna's FanovaImportanceEvaluator, 64 trees, seed 0) over the {n} of {len(exp.trials)} trials "
            f"that reached the full {exp.max_steps} steps, for their final val bits/dim (fast fidelity). {rough}")
    return Importance({k: float(v) for k, v in values.items()}, ids, note)


def ties(exp: Experiment) -> tuple[dict[str, bool], str]:
    """Which re-scored trials are tied with the winner, and how that was decided."""
    if exp.winner is None or exp.winner.fidelity != "accurate":
        return {}, "No accurate re-scores yet (the search has not finished)."
    scored = {tid: r for tid, r in exp.rescores.items() if not r.get("failed") and is_finite_number(r.get("mean"))}
    recorded = {tid: r["tied_with_winner"] for tid, r in scored.items() if "tied_with_winner" in r}
    if exp.table is not None and "tied_with_winner" in exp.table.columns and not recorded:
        recorded = {tid: bool(v) for tid, v in zip(exp.table.trial_id, exp.table.tied_with_winner)
                    if tid in scored and not pd.isna(v)}
    if recorded:
        recorded[exp.winner.trial_id] = True
        return ({tid: bool(v) for tid, v in recorded.items()},
                f"Tied: the export's paired comparison with the winner on the same images cannot tell them apart "
                f"(paired difference within {TIE_STDERRS:g} standard errors; paired_diff ± paired_diff_stderr in the table).")
    w = scored.get(exp.winner.trial_id)
    if w is None:
        return {}, "The winner's re-score is missing."
    tied = {tid: abs(r["mean"] - w["mean"]) <= _or0(r.get("stderr")) + _or0(w.get("stderr")) for tid, r in scored.items()}
    return tied, ("No paired differences were recorded, so tied means only that the mean ± stderr intervals "
                  "overlap: a rough rule that ignores that every trial is scored on the same images.")


# ---- figures --------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # the object API renders with Agg, no GUI backend involved

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_learning_curves(exp: Experiment, path: Path) -> Path:
    from matplotlib.lines import Line2D

    fig = _figure(9.5, 5.2)
    ax = fig.subplots()
    counts: dict[str, int] = {}
    silent: dict[str, int] = {}
    winner_id = exp.winner.trial_id if exp.winner else None
    top = max([float(t.history["val_bpd"].replace(math.inf, math.nan).max()) for t in exp.trials if len(t.history)]
              + [0.0])
    for t in exp.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
        h = t.history[t.history["val_bpd"].map(is_finite_number)]
        if not len(h):
            silent[t.status] = silent.get(t.status, 0) + 1
            continue
        colour = STATUS_COLOURS.get(t.status, "#333333")
        is_winner = t.trial_id == winner_id
        ax.plot(h["step"], h["val_bpd"], color=colour, lw=2.6 if is_winner else 1.2, alpha=1 if is_winner else 0.8,
                zorder=3 if is_winner else 2)
        marker = END_MARKERS.get(t.status, "o")
        ax.plot(h["step"].iloc[-1], h["val_bpd"].iloc[-1], marker=marker, ms=9 if is_winner else 7, color=colour,
                mec="black" if is_winner else colour, ls="none", zorder=4)
        if t.status == "diverged" and len(t.history) > len(h):  # its last report is inf: mark it at the top
            ax.plot(t.history["step"].iloc[-1], top, marker="x", ms=9, color=colour, clip_on=False, zorder=4)
        if is_winner:
            ax.annotate(f"winner {t.trial_id}", (h["step"].iloc[-1], h["val_bpd"].iloc[-1]),
                        xytext=(6, -12), textcoords="offset points", fontsize=9)
    if exp.space.search.scheduler == "asha":
        for r in asha_rungs(exp.max_steps, exp.space.search.grace_period, exp.space.search.reduction_factor):
            ax.axvline(r, color="#888888", ls=":", lw=1, zorder=1)
            ax.annotate(f"rung {r}", (r, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8, color="#555555")
    ax.set_xlim(0, exp.max_steps * 1.04)
    handles = []
    for status in STATUS_COLOURS:
        if status in counts:
            extra = f", {silent[status]} without a report" if silent.get(status) else ""
            handles.append(Line2D([], [], color=STATUS_COLOURS[status], marker=END_MARKERS.get(status, "o"),
                                  label=f"{status} ({counts[status]}{extra})"))
    ax.legend(handles=handles, loc="upper right", fontsize=9, title="status (marker: where the trial ended)",
              title_fontsize=9)
    fid = exp.space.base_config.eval.fast
    ax.set_xlabel("training step")
    ax.set_ylabel(f"val bits/dim (fast: {fid.n_images} images, rtol {fid.rtol:g})")
    ax.set_title(f"{exp.name}: learning curves of {len(exp.trials)} trials")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_importance(exp: Experiment, imp: Importance, path: Path) -> Path | None:
    if imp.values is None:
        return None
    names = sorted(imp.values, key=imp.values.get)
    fig = _figure(7.5, 0.45 * len(names) + 1.6)
    ax = fig.subplots()
    ax.barh(names, [imp.values[n] for n in names], color="#1f77b4")
    for i, n in enumerate(names):
        ax.annotate(f"{imp.values[n]:.2f}", (imp.values[n], i), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=9)
    ax.set_xlim(0, max(1.0, max(imp.values.values()) * 1.15))
    ax.set_xlabel("importance for final val bits/dim (fANOVA, sums to 1)")
    ax.set_title(f"hyperparameter importance over {len(imp.trial_ids)} full-length trials")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_hyperparameters(exp: Experiment, path: Path) -> Path:
    hps = exp.space.hyperparameters
    ncols = min(3, len(hps))
    nrows = math.ceil(len(hps) / ncols)
    fig = _figure(4.3 * ncols, 3.4 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    scored = [t for t in exp.trials if is_finite_number(t.final_bpd)]
    winner_id = exp.winner.trial_id if exp.winner else None
    for ax, hp in zip(axes, hps):
        for i, t in enumerate(scored):
            if hp.name not in t.params:
                continue
            if hp.kind == "choice":
                labels = hp.labels()
                x = labels.index(t.params[hp.name]) + ((i % 5) - 2) * 0.05 if t.params[hp.name] in labels else math.nan
            else:
                x = float(t.params[hp.name])
            colour = STATUS_COLOURS.get(t.status, "#333333")
            full = t.status == "completed"
            ax.plot(x, t.final_bpd, marker="o" if full else END_MARKERS.get(t.status, "o"), ls="none", ms=7,
                    color=colour, mfc=colour if full else "none")
            if t.trial_id == winner_id:
                ax.plot(x, t.final_bpd, marker="*", ms=16, color="gold", mec="black", ls="none", zorder=5)
        if hp.kind == "choice":
            ax.set_xticks(range(len(hp.values)), [_short(v) for v in hp.values])
            ax.set_xlim(-0.5, len(hp.values) - 0.5)
        elif hp.kind == "loguniform":
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.set_xlim(hp.low, hp.high)
            ax.xaxis.set_minor_formatter(NullFormatter())  # labels at the decades only; minor ones overlap
        else:
            ax.set_xlim(hp.low, hp.high)
        ax.set_title(hp.name + (" (log axis)" if hp.kind == "loguniform" else ""), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[: len(hps): ncols]:
        ax.set_ylabel("final val bits/dim (fast)")
    for ax in axes[len(hps):]:
        ax.set_visible(False)
    fig.suptitle("each hyperparameter against the last val bits/dim of each trial; filled: full length, "
                 "hollow: stopped early (scored after fewer steps); star: winner", fontsize=9)
    return _save(fig, path)


def plot_rescores(exp: Experiment, tied: dict[str, bool], path: Path) -> Path | None:
    rows = [(tid, r) for tid, r in exp.rescores.items()]
    if not rows:
        return None
    rows.sort(key=lambda item: item[1]["mean"] if is_finite_number(item[1].get("mean")) and not item[1].get("failed") else math.inf)
    by_id = {t.trial_id: t for t in exp.trials}
    fig = _figure(8.5, 0.6 * len(rows) + 1.8)
    ax = fig.subplots()
    winner_id = exp.winner.trial_id if exp.winner else None
    labels = []
    for i, (tid, r) in enumerate(rows):
        y = len(rows) - 1 - i
        fast = by_id[tid].final_bpd if tid in by_id else math.nan
        if is_finite_number(fast):
            ax.plot(fast, y, marker="D", mfc="none", color="#888888", ls="none", ms=7)
        if r.get("failed") or not is_finite_number(r.get("mean")):
            labels.append(f"{tid} (failed)")
            continue
        colour = "gold" if tid == winner_id else ("#1f77b4" if tied.get(tid) else "#999999")
        ax.errorbar(r["mean"], y, xerr=_or0(r.get("stderr")), fmt="o", color=colour, mec="black", ecolor="black",
                    capsize=5, ms=9)
        labels.append(f"{tid}" + (" winner" if tid == winner_id else " tied" if tied.get(tid) else ""))
    ax.set_yticks(range(len(rows) - 1, -1, -1), labels)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    acc = exp.space.base_config.eval.accurate
    ax.set_xlabel(f"val bits/dim, accurate ({acc.n_images} images, rtol {acc.rtol:g}): mean ± 1 stderr; "
                  "hollow diamond: last fast score")
    ax.set_title("accurate re-scores of the best trials")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


# ---- the winner's samples --------------------------------------------------------------------------------
def subprocess_sampler(checkpoint: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """`python -m trials.preview` in a child process: the report's own process never builds a model."""
    root = Path(__file__).resolve().parents[1]  # the folder holding tuner/ and trials/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "trials.preview", "--checkpoint", str(checkpoint), "--out", str(out),
           "--n", str(settings["n"]), "--rtol", str(settings["rtol"]), "--atol", str(settings["atol"]),
           "--seed", str(settings["seed"]), "--device", str(settings.get("device", "auto")),
           # One thread: a few seconds for a tuning-sized model, and on a busy machine more threads can make
           # it ten times slower (we measured 41 s against 4.5 s with 2 threads against 1 at load 7 on 2 cores).
           "--threads", str(settings.get("threads", 1))]
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
    except Exception as exc:  # a failed grid costs the picture, not the report
        return None, None, f"Drawing the samples failed: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__}"
    info = {k: v for k, v in info.items() if k != "png"}
    atomic_write_text(meta, json.dumps({"checkpoint": str(ckpt_file), "checkpoint_sha256": digest,
                                    "settings": SAMPLE_SETTINGS, "info": info}, indent=2))
    return png, info, ""


# ---- the page ---------------------------------------------------------------------------------------------
@dataclass
class Report:
    html: Path
    figures: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return [self.html, *self.figures.values(), self.html.with_name("report.json")] + \
            ([self.html.with_name("samples.json")] if self.html.with_name("samples.json").is_file() else [])


def build_report(experiment_dir: Path, space: SearchSpace | None = None, sampler: Sampler | None = subprocess_sampler,
                 progress_out=None) -> Report:
    """Read the experiment folder and write <experiment>/report/; returns where everything went."""
    exp = load_experiment(experiment_dir, space)
    out_dir = exp.folder / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress("Report", len(FIGURES), out=progress_out)
    figures: dict[str, Path] = {}
    notes: dict[str, str] = {}

    figures["learning_curves"] = plot_learning_curves(exp, out_dir / "learning_curves.png")
    progress.done(1, "learning curves")
    imp = importance(exp)
    if (p := plot_importance(exp, imp, out_dir / "importance.png")) is not None:
        figures["importance"] = p
    notes["importance"] = imp.note
    progress.done(2, "hyperparameter importance")
    figures["hyperparameters"] = plot_hyperparameters(exp, out_dir / "hyperparameters.png")
    progress.done(3, "hyperparameters against val bits/dim")
    tied, notes["rescores"] = ties(exp)
    if (p := plot_rescores(exp, tied, out_dir / "rescores.png")) is not None:
        figures["rescores"] = p
    progress.done(4, "accurate re-scores")
    png, sample_info, notes["samples"] = winner_samples(exp, out_dir, sampler)
    if png is not None:
        figures["samples"] = png
    progress.done(5, "winner's samples" + (" (reused: checkpoint unchanged)" if sample_info and sample_info.get("reused") else ""))
    for stale in set(FIGURES) - set(figures):  # a figure this build could not make must not linger from the last
        (out_dir / f"{stale}.png").unlink(missing_ok=True)

    summary = _summary(exp, imp, tied, notes, sample_info, figures)
    atomic_write_text(out_dir / "report.json", json.dumps(summary, indent=2, default=_json_default))
    html_path = out_dir / "report.html"
    atomic_write_text(html_path, _page(exp, imp, tied, notes, sample_info, figures))
    return Report(html_path, figures, summary)


def _summary(exp, imp, tied, notes, sample_info, figures) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for t in exp.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    return {
        "experiment": exp.name,
        "folder": str(exp.folder),
        "finished": exp.finished,
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "trials": counts,
        "winner": dataclasses.asdict(exp.winner) if exp.winner else None,
        "importance": {"values": imp.values, "trial_ids": imp.trial_ids, "evaluator": "fanova", "note": imp.note},
        "tied_with_winner": sorted(tid for tid, v in tied.items() if v),
        "ties_note": notes.get("rescores", ""),
        "samples": sample_info,
        "samples_note": notes.get("samples", ""),
        "figures": {k: p.name for k, p in figures.items()},
    }


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .note { color: #444; font-size: 0.92em; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ddd; padding: 3px 7px; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.samples img { image-rendering: pixelated; width: 336px; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def _page(exp: Experiment, imp: Importance, tied: dict[str, bool], notes: dict[str, str],
          sample_info: dict | None, figures: dict[str, Path]) -> str:
    e = html.escape
    counts: dict[str, int] = {}
    for t in exp.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    status_text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(exp.name)}: tuning report</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Tuning experiment <code>{e(exp.name)}</code></h1>"]
    state = "finished" if exp.finished else "<b>not finished</b> (interrupted or still running): scores so far"
    parts.append(f"<p>{len(exp.trials)} trials ({e(status_text)}); the search is {state}. "
                 f"Space: <code>{e(str(exp.space.source))}</code>, metric: validation bits/dim of the probability-flow "
                 f"ODE (lower is better).</p>")
    if exp.winner:
        w = exp.winner
        params = _params_text(exp, w.trial_id)
        score = f"{w.bpd:.4f}" + (f" ± {w.stderr:.4f}" if is_finite_number(w.stderr) else "")
        parts.append(f"<p><b>Winner: trial <code>{e(w.trial_id)}</code></b>, {e(params)}: val bits/dim {score} "
                     f"({e(w.fidelity)} fidelity{'' if w.fidelity == 'accurate' else ', best so far'}).</p>")

    def figure(key: str, title: str, caption: str, extra_class: str = "") -> None:
        parts.append(f"<h2>{e(title)}</h2>")
        if key in figures:
            data = base64.b64encode(figures[key].read_bytes()).decode("ascii")
            parts.append(f"<figure class='{extra_class}'><img alt='{e(title)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{caption}</figcaption></figure>")
        else:
            parts.append(f"<p class='note'>{caption}</p>")

    rung_text = (f"Dotted lines: ASHA's rungs (grace period {exp.space.search.grace_period} steps, reduction "
                 f"factor {exp.space.search.reduction_factor}), where it keeps the better 1/"
                 f"{exp.space.search.reduction_factor} of the trials; a ▼ marks where a stopped trial stopped."
                 if exp.space.search.scheduler == "asha" else "FIFO scheduler: no trial is stopped early.")
    figure("learning_curves", "Learning curves",
           f"Val bits/dim at fast fidelity at every rung report, one line per trial, coloured by how the trial "
           f"ended. {rung_text} Trials that never reported (e.g. errored at start) have no line; the legend "
           f"counts them.")
    imp_caption = e(imp.note)
    if imp.values:
        imp_caption += " Trials used: " + ", ".join(f"<code>{e(t)}</code>" for t in imp.trial_ids) + "."
    figure("importance", "Hyperparameter importance", imp_caption)
    figure("hyperparameters", "Hyperparameters against val bits/dim",
           "Each trial's last fast val bits/dim against each hyperparameter (log axes for log-uniform ranges; "
           "choices spread slightly sideways so that equal values stay visible). A trial stopped early was scored "
           "after fewer steps, so compare filled markers with filled markers.")
    figure("rescores", "Accurate re-scores",
           "The best trials by fast score, re-scored from their last checkpoints at accurate fidelity; the best "
           "re-score wins. " + e(notes.get("rescores", "")))
    if exp.rescores:
        parts.append(_rescore_table(exp, tied))
    if sample_info:
        s = sample_info
        sample_caption = (f"{s['n_images']} samples from the winner <code>{e(exp.winner.trial_id)}</code> "
                          f"({e(_params_text(exp, exp.winner.trial_id))}), its checkpoint at step {s['step']} "
                          f"(EMA weights): probability-flow ODE, {e(str(s['method']))}, rtol {s['rtol']:g}, atol "
                          f"{s['atol']:g} (loose: a quick look, not the full run's 1e-5), from t = 1 to eps = "
                          f"{s['eps']:.2g}, seed {s['seed']}: <b>NFE {s['nfe']}</b>, {s['seconds']:.1f} s on "
                          f"{e(str(s['device']))}. The full run (<code>train.py</code>) trains longer and draws "
                          f"sharper ones.")
    else:
        sample_caption = e(notes.get("samples", ""))
    figure("samples", "Samples from the winner", sample_caption, "samples")
    parts.append("<h2>All trials</h2>")
    parts.append(_trials_table(exp))
    parts.append(f"<p class='note'>Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} from "
                 f"<code>{e(str(exp.folder))}</code>. Rebuild: <code>python -m tuner.report {e(str(exp.folder))}"
                 f"</code></p></body></html>")
    return "\n".join(parts)


def _rescore_table(exp: Experiment, tied: dict[str, bool]) -> str:
    e = html.escape
    paired = any("paired_diff" in r for r in exp.rescores.values())
    head = ["trial", "val bits/dim (accurate)", "stderr", "NFE", "seconds"] + \
           (["paired diff to winner", "its stderr"] if paired else []) + ["tied with winner", "note"]
    rows = []
    winner_id = exp.winner.trial_id if exp.winner else None
    for tid, r in sorted(exp.rescores.items(), key=lambda kv: kv[1].get("mean", math.inf) if not kv[1].get("failed") else math.inf):
        failed = r.get("failed") or not is_finite_number(r.get("mean"))
        cells = [f"<code>{e(tid)}</code>", _num(r.get("mean")), _num(r.get("stderr")), _num(r.get("nfe"), "{:.0f}"),
                 _num(r.get("seconds"), "{:.1f}")]
        if paired:
            cells += [_num(r.get("paired_diff")), _num(r.get("paired_diff_stderr"))]
        verdict = "winner" if tid == winner_id else ("failed" if failed else ("yes" if tied.get(tid) else "no"))
        cells += [verdict, e(str(r.get("reason") or ""))]
        rows.append("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells) + "</tr>")
    return "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


def _trials_table(exp: Experiment) -> str:
    e = html.escape
    names = [hp.name for hp in exp.space.hyperparameters]
    head = ["trial", "status", *names, "last val bits/dim (fast)", "steps", "accurate re-score"]
    rows = []
    order = sorted(exp.trials, key=lambda t: (t.final_bpd if is_finite_number(t.final_bpd) else math.inf))
    for t in order:
        r = exp.rescores.get(t.trial_id, {})
        acc = r.get("mean") if not r.get("failed") else None
        cells = [f"<td><code>{e(t.trial_id)}</code></td>", f"<td>{e(t.status)}</td>"]
        cells += [f"<td>{e(_short(_decoded(exp, n, t.params.get(n))))}</td>" for n in names]
        cells += [_num(t.final_bpd), f"<td class='num'>{t.steps}</td>", _num(acc)]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


# ---- small helpers ----------------------------------------------------------------------------------------
def _decoded(exp: Experiment, name: str, value: Any) -> Any:
    hp = next((h for h in exp.space.hyperparameters if h.name == name), None)
    try:
        return hp.decode(value) if hp is not None and value is not None else value
    except KeyError:
        return value


def _params_text(exp: Experiment, trial_id: str) -> str:
    trial = next((t for t in exp.trials if t.trial_id == trial_id), None)
    if trial is None:
        return ""
    return ", ".join(f"{n} {_short(_decoded(exp, n, v))}" for n, v in trial.params.items())


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def _num(value: Any, fmt: str = "{:.4f}") -> str:
    return f"<td class='num'>{fmt.format(float(value))}</td>" if is_finite_number(value) else "<td class='num'>–</td>"



def _or0(value: Any) -> float:
    return float(value) if is_finite_number(value) else 0.0


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)



# ---- command line --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from trials.cli import OneLineArgumentParser

    parser = OneLineArgumentParser(prog="python -m tuner.report",
                                   description="Rebuild the report of a finished or interrupted tuning experiment.")
    parser.add_argument("experiment", type=Path, help="the experiment folder, e.g. runs/cpu")
    parser.add_argument("--space", type=Path, help=f"the space file it ran with (default: the folder's {SPACE_COPY})")
    parser.add_argument("--no-samples", action="store_true",
                        help="do not draw the winner's samples (an unchanged earlier grid is still used)")
    args = parser.parse_args(argv)
    try:
        space = load_space(args.space) if args.space is not None else None
        report = build_report(args.experiment, space, sampler=None if args.no_samples else subprocess_sampler)
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"Report: {report.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
