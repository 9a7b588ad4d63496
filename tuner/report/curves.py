"""The learning-curves figure: val bits/dim at fast fidelity against step, one line per trial that reported.

It has to stay readable from eight trials to a thousand: the best `STRONG` trials by last score and the
winner are drawn as strong, coloured lines named in the one legend; every other trial is a thin faint grey
line (one LineCollection, cheap to draw however many there are), so the crowd shows where most trials went
without hiding the ones worth reading. Markers show where each trial ended (▼ stopped early, ✖ errored, ...);
the title counts the trials by status.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tuner.mlflow_runs import is_finite_number
from tuner.report.analysis import stopping_rule
from tuner.report.figures import END_MARKERS, STATUS_COLOURS, new_figure, save

if TYPE_CHECKING:
    from tuner.report.experiment import Experiment

STRONG = 10  # the best trials drawn strong and named; the winner is added when it is not among them
FAINT = {"color": "#808080", "alpha": 0.25, "linewidth": 0.7}


def strong_trials(exp: Experiment, n: int = STRONG) -> list[str]:
    """The trials drawn strong, best last fast score first: the best n with a finite last score, and the winner."""
    scored = [t for t in exp.trials if is_finite_number(t.final_bpd)]
    ids = [t.trial_id for t in sorted(scored, key=lambda t: t.final_bpd)[:n]]  # stable: ties keep Tune's order
    if exp.winner and exp.winner.trial_id not in ids and any(t.trial_id == exp.winner.trial_id for t in exp.trials):
        ids.append(exp.winner.trial_id)
    return ids


def learning_curves_figure(exp: Experiment, n_strong: int = STRONG):
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_hex

    fig = new_figure(9.5, 5.2)
    ax = fig.subplots()
    winner_id = exp.winner.trial_id if exp.winner else None
    strong = strong_trials(exp, n_strong)
    # tab10 without its grey (the faint lines' colour), then two dark ones: eleven colours for the best ten + winner
    palette = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7] + ["#393b79", "#8c6d31"]
    colour_of = {tid: to_hex(palette[i % len(palette)]) for i, tid in enumerate(strong)}
    curves = {}  # trial id -> (steps, values) of its finite reports; plain arrays, cheap for a thousand trials
    for t in exp.trials:
        steps, values = t.history["step"].to_numpy(), t.history["val_bpd"].to_numpy(dtype=float)
        curves[t.trial_id] = (steps, values, np.isfinite(values))
    top = max([float(v[ok].max()) for _, v, ok in curves.values() if ok.any()] + [0.0])
    counts: dict[str, int] = {}
    silent: dict[str, int] = {}
    faint_segments, faint_ends = [], {}  # ends: status -> ([x], [y]), one marker artist per status
    by_id = {}
    for t in exp.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
        steps, values, ok = curves[t.trial_id]
        if not ok.any():
            silent[t.status] = silent.get(t.status, 0) + 1
            continue
        h = (steps[ok], values[ok])
        end = (h[0][-1], h[1][-1])
        diverged_at = steps[-1] if t.status == "diverged" and not ok.all() else None
        if t.trial_id in colour_of:
            by_id[t.trial_id] = (t, h, end, diverged_at)
            continue
        faint_segments.append(np.column_stack(h))
        xs, ys = faint_ends.setdefault(t.status, ([], []))
        xs.append(end[0])
        ys.append(end[1])
        if diverged_at is not None:  # its last report is inf: mark it at the top
            ax.plot(diverged_at, top, marker="x", ms=5, ls="none", color=FAINT["color"], clip_on=False, zorder=2)
    if faint_segments:
        ax.add_collection(LineCollection(faint_segments, zorder=1, gid="faint", **FAINT))
        for status, (xs, ys) in faint_ends.items():
            ax.plot(
                xs,
                ys,
                marker=END_MARKERS.get(status, "o"),
                ms=3.5,
                ls="none",
                color=FAINT["color"],
                alpha=0.4,
                zorder=1,
            )
    for tid in strong:  # best first, so the legend reads as a ranking
        if tid not in by_id:
            continue
        t, h, end, diverged_at = by_id[tid]
        colour, is_winner = colour_of[tid], tid == winner_id
        label = f"{tid}  {t.final_bpd:.3f}  {t.status}" + ("  (winner)" if is_winner else "")
        ax.plot(
            h[0],
            h[1],
            color=colour,
            lw=2.6 if is_winner else 1.6,
            zorder=4 if is_winner else 3,
            marker=END_MARKERS.get(t.status, "o"),
            markevery=[len(h[0]) - 1],
            ms=9 if is_winner else 7,
            mec="black" if is_winner else colour,
            label=label,
            gid=f"strong {tid}",
        )
        if diverged_at is not None:
            ax.plot(diverged_at, top, marker="x", ms=9, color=colour, clip_on=False, zorder=4)
        if is_winner:
            ax.annotate(f"winner {tid}", end, xytext=(6, -12), textcoords="offset points", fontsize=9)
    for r in stopping_rule(exp.space)[0]:
        ax.axvline(r, color="#888888", ls=":", lw=1, zorder=1)
        ax.annotate(
            f"rung {r}",
            (r, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=8,
            color="#555555",
        )
    ax.set_xlim(0, exp.max_steps * 1.04)
    best = min(n_strong, sum(tid in by_id for tid in strong))
    title = f"best {best} by last val bits/dim" + (" and the winner" if len(strong) > n_strong else "")
    ax.legend(
        loc="upper right",
        fontsize=8,
        title_fontsize=8,
        title=title + (f"; {len(faint_segments)} others faint" if faint_segments else ""),
    )
    fid = exp.space.base_config.eval.fast
    ax.set_xlabel("training step")
    ax.set_ylabel(f"val bits/dim (fast: {fid.n_images} images, {fid.describe()})")
    status_text = ", ".join(
        f"{counts[s]} {s}" + (f" ({silent[s]} without a report)" if silent.get(s) else "")
        for s in [*STATUS_COLOURS, *sorted(set(counts) - set(STATUS_COLOURS))]
        if s in counts
    )
    ax.set_title(f"{exp.name}: learning curves of {len(exp.trials)} trials\n{status_text}", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def plot_learning_curves(exp: Experiment, path: Path) -> Path:
    return save(learning_curves_figure(exp), path)
