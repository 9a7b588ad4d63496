"""The report's figures other than the learning curves: importance, hyperparameters, accurate re-scores.

Figures use matplotlib's object API (Agg, no GUI backend) and are drawn per status group, not per trial, so a
search of a thousand trials draws as fast as one of ten.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.mlflow_runs import is_finite_number
from tuner.report.text import short

if TYPE_CHECKING:
    from tuner.report.experiment import Experiment
    from tuner.report.importance import Importance

STATUS_COLOURS = {
    "completed": "#1f77b4",
    "stopped early": "#ff7f0e",
    "errored": "#d62728",
    "diverged": "#9467bd",
    "interrupted": "#7f7f7f",
    "not started": "#bbbbbb",
}
END_MARKERS = {"completed": "o", "stopped early": "v", "errored": "X", "diverged": "x", "interrupted": ">"}


def new_figure(width: float, height: float):
    from matplotlib.figure import (
        Figure,  # the object API renders with Agg, no GUI backend involved
    )

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save(fig, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=100)
    return path


def or0(value: Any) -> float:
    return float(value) if is_finite_number(value) else 0.0


def plot_importance(exp: Experiment, imp: Importance, path: Path) -> Path | None:
    if imp.values is None:
        return None
    names = sorted(imp.values, key=imp.values.get)
    fig = new_figure(7.5, 0.45 * len(names) + 1.6)
    ax = fig.subplots()
    ax.barh(names, [imp.values[n] for n in names], color="#1f77b4")
    for i, n in enumerate(names):
        ax.annotate(
            f"{imp.values[n]:.2f}",
            (imp.values[n], i),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
        )
    ax.set_xlim(0, max(1.0, max(imp.values.values()) * 1.15))
    ax.set_xlabel("importance for final val bits/dim (fANOVA, sums to 1)")
    ax.set_title(f"hyperparameter importance over {len(imp.trial_ids)} full-length trials")
    ax.grid(axis="x", alpha=0.3)
    return save(fig, path)


def plot_hyperparameters(exp: Experiment, path: Path) -> Path:
    hps = exp.space.hyperparameters
    ncols = min(3, len(hps))
    nrows = math.ceil(len(hps) / ncols)
    fig = new_figure(4.3 * ncols, 3.4 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    scored = [t for t in exp.trials if is_finite_number(t.final_bpd)]
    winner_id = exp.winner.trial_id if exp.winner else None
    many = len(scored) > 100  # smaller, see-through markers, so that a dense cloud still shows its density
    for ax, hp in zip(axes, hps):
        groups: dict[str, tuple[list[float], list[float]]] = {}
        labels = hp.labels() if hp.is_choice else []
        for i, t in enumerate(scored):
            if hp.name not in t.params:
                continue
            if hp.is_choice:
                x = labels.index(t.params[hp.name]) + ((i % 5) - 2) * 0.05 if t.params[hp.name] in labels else math.nan
            else:
                x = float(t.params[hp.name])
            xs, ys = groups.setdefault(t.status, ([], []))
            xs.append(x)
            ys.append(t.final_bpd)
            if t.trial_id == winner_id:
                ax.plot(x, t.final_bpd, marker="*", ms=16, color="gold", mec="black", ls="none", zorder=5)
        for status, (xs, ys) in groups.items():
            colour = STATUS_COLOURS.get(status, "#333333")
            full = status == "completed"
            ax.plot(
                xs,
                ys,
                marker="o" if full else END_MARKERS.get(status, "o"),
                ls="none",
                ms=4 if many else 7,
                alpha=0.5 if many else 1.0,
                color=colour,
                mfc=colour if full else "none",
                zorder=3 if full else 2,
            )  # the full-length scores on top: they are the comparable ones
        if hp.is_choice:
            ax.set_xticks(range(len(hp.values)), [short(v) for v in hp.values])
            ax.set_xlim(-0.5, len(hp.values) - 0.5)
        elif hp.log_scale:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.set_xlim(hp.low, hp.high)
            ax.xaxis.set_minor_formatter(NullFormatter())  # labels at the decades only; minor ones overlap
        else:
            ax.set_xlim(hp.low, hp.high)
        ax.set_title(hp.name + (" (log axis)" if hp.log_scale else ""), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[: len(hps) : ncols]:
        ax.set_ylabel("final val bits/dim (fast)")
    for ax in axes[len(hps) :]:
        ax.set_visible(False)
    fig.suptitle(
        "each hyperparameter against the last val bits/dim of each trial; filled: full length, "
        "hollow: stopped early (scored after fewer steps); star: winner",
        fontsize=9,
    )
    return save(fig, path)


def plot_rescores(exp: Experiment, tied: dict[str, bool], path: Path) -> Path | None:
    rows = [(tid, r) for tid, r in exp.rescores.items()]
    if not rows:
        return None
    rows.sort(
        key=lambda item: (
            item[1]["mean"] if is_finite_number(item[1].get("mean")) and not item[1].get("failed") else math.inf
        )
    )
    by_id = {t.trial_id: t for t in exp.trials}
    fig = new_figure(8.5, 0.6 * len(rows) + 1.8)
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
        ax.errorbar(
            r["mean"], y, xerr=or0(r.get("stderr")), fmt="o", color=colour, mec="black", ecolor="black", capsize=5, ms=9
        )
        labels.append(f"{tid}" + (" winner" if tid == winner_id else " tied" if tied.get(tid) else ""))
    ax.set_yticks(range(len(rows) - 1, -1, -1), labels)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    acc = exp.space.base_config.eval.accurate
    ax.set_xlabel(
        f"val bits/dim, accurate ({acc.n_images} images, {acc.describe()}): mean ± 1 stderr; "
        "hollow diamond: last fast score"
    )
    ax.set_title("accurate re-scores of the best trials")
    ax.grid(axis="x", alpha=0.3)
    return save(fig, path)
