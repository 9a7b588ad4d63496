"""The report as one self-contained HTML page: figures embedded as base64 PNGs, no scripts, nothing fetched."""

from __future__ import annotations

import base64
import datetime
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.mlflow_runs import is_finite_number
from tuner.report.analysis import stopping_rule
from tuner.report.curves import STRONG
from tuner.report.text import decoded, params_text, short

if TYPE_CHECKING:
    from tuner.report.experiment import Experiment
    from tuner.report.importance import Importance

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


def page(
    exp: Experiment,
    imp: Importance,
    tied: dict[str, bool],
    notes: dict[str, str],
    sample_info: dict | None,
    figures: dict[str, Path],
) -> str:
    e = html.escape
    counts: dict[str, int] = {}
    for t in exp.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    status_text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    parts = [
        (
            f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(exp.name)}: tuning report"
            f"</title><style>{CSS}</style></head><body>"
        ),
        f"<h1>Tuning experiment <code>{e(exp.name)}</code></h1>",
    ]
    state = "finished" if exp.finished else "<b>not finished</b> (interrupted or still running): scores so far"
    parts.append(
        f"<p>{len(exp.trials)} trials ({e(status_text)}); the search is {state}. "
        f"Space: <code>{e(str(exp.space.source))}</code>, metric: validation bits/dim of the probability-flow "
        f"ODE (lower is better).</p>"
    )
    if exp.winner:
        w = exp.winner
        score = f"{w.bpd:.4f}" + (f" ± {w.stderr:.4f}" if is_finite_number(w.stderr) else "")
        parts.append(
            f"<p><b>Winner: trial <code>{e(w.trial_id)}</code></b>, {e(params_text(exp, w.trial_id))}: val "
            f"bits/dim {score} ({e(w.fidelity)} fidelity{'' if w.fidelity == 'accurate' else ', best so far'}).</p>"
        )

    def figure(key: str, title: str, caption: str, extra_class: str = "") -> None:
        parts.append(f"<h2>{e(title)}</h2>")
        if key in figures:
            data = base64.b64encode(figures[key].read_bytes()).decode("ascii")
            parts.append(
                f"<figure class='{extra_class}'><img alt='{e(title)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{caption}</figcaption></figure>"
            )
        else:
            parts.append(f"<p class='note'>{caption}</p>")

    rungs, rule = stopping_rule(exp.space)
    rung_text = f"Dotted lines: {e(rule)}; a ▼ marks where a stopped trial stopped." if rungs else f"{e(rule)}."
    figure(
        "learning_curves",
        "Learning curves",
        f"Val bits/dim at fast fidelity at every rung report, one line per trial: the best {STRONG} by last "
        f"score and the winner in colour, named with their score and how they ended in the legend; the others "
        f"thin and grey. A marker shows where each trial ended. {rung_text} Trials that never reported (e.g. "
        f"errored at start) have no line; the title counts them.",
    )
    imp_caption = e(imp.note)
    if imp.values:
        imp_caption += " Trials used: " + ", ".join(f"<code>{e(t)}</code>" for t in imp.trial_ids) + "."
    figure("importance", "Hyperparameter importance", imp_caption)
    figure(
        "hyperparameters",
        "Hyperparameters against val bits/dim",
        "Each trial's last fast val bits/dim against each hyperparameter (log axes for log-uniform ranges; "
        "choices spread slightly sideways so that equal values stay visible). A trial stopped early was scored "
        "after fewer steps, so compare filled markers with filled markers.",
    )
    figure(
        "rescores",
        "Accurate re-scores",
        "The best trials by fast score, re-scored from their last checkpoints at accurate fidelity; the best "
        "re-score wins. " + e(notes.get("rescores", "")),
    )
    if exp.rescores:
        parts.append(rescore_table(exp, tied))
    if sample_info:
        s = sample_info
        sample_caption = (
            f"{s['n_images']} samples from the winner <code>{e(exp.winner.trial_id)}</code> "
            f"({e(params_text(exp, exp.winner.trial_id))}), its checkpoint at step {s['step']} "
            f"(EMA weights): probability-flow ODE, {e(str(s['method']))}, {solver_detail(s)} (a quick "
            f"look, not the full run's rtol 1e-5), from t = 1 to eps = "
            f"{s['eps']:.2g}, seed {s['seed']}: <b>NFE {s['nfe']}</b>, {s['seconds']:.1f} s on "
            f"{e(str(s['device']))}. The full run (<code>train.py</code>) trains longer and draws "
            f"sharper ones."
        )
    else:
        sample_caption = e(notes.get("samples", ""))
    figure("samples", "Samples from the winner", sample_caption, "samples")
    parts.append("<h2>All trials</h2>")
    parts.append(trials_table(exp))
    parts.append(
        f"<p class='note'>Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} from "
        f"<code>{e(str(exp.folder))}</code>. Rebuild: <code>python -m tuner.report {e(str(exp.folder))}"
        f"</code></p></body></html>"
    )
    return "\n".join(parts)


def solver_detail(info: dict[str, Any]) -> str:
    """'63 steps' for a fixed-grid solve, 'rtol 0.001, atol 0.001' for an adaptive one (an older report's)."""
    if info.get("steps"):
        return f"{info['steps']} steps"
    return f"rtol {info['rtol']:g}, atol {info['atol']:g}"


def rescore_table(exp: Experiment, tied: dict[str, bool]) -> str:
    e = html.escape
    paired = any("paired_diff" in r for r in exp.rescores.values())
    head = (
        ["trial", "val bits/dim (accurate)", "stderr", "NFE", "seconds"]
        + (["paired diff to winner", "its stderr"] if paired else [])
        + ["tied with winner", "note"]
    )
    rows = []
    winner_id = exp.winner.trial_id if exp.winner else None
    for tid, r in sorted(
        exp.rescores.items(), key=lambda kv: kv[1].get("mean", math.inf) if not kv[1].get("failed") else math.inf
    ):
        failed = r.get("failed") or not is_finite_number(r.get("mean"))
        cells = [
            f"<code>{e(tid)}</code>",
            _num(r.get("mean")),
            _num(r.get("stderr")),
            _num(r.get("nfe"), "{:.0f}"),
            _num(r.get("seconds"), "{:.1f}"),
        ]
        if paired:
            cells += [_num(r.get("paired_diff")), _num(r.get("paired_diff_stderr"))]
        verdict = "winner" if tid == winner_id else ("failed" if failed else ("yes" if tied.get(tid) else "no"))
        cells += [verdict, e(str(r.get("reason") or ""))]
        rows.append("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells) + "</tr>")
    return "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


def trials_table(exp: Experiment) -> str:
    e = html.escape
    names = [hp.name for hp in exp.space.hyperparameters]
    head = ["trial", "status", *names, "last val bits/dim (fast)", "steps", "accurate re-score"]
    rows = []
    order = sorted(exp.trials, key=lambda t: t.final_bpd if is_finite_number(t.final_bpd) else math.inf)
    for t in order:
        r = exp.rescores.get(t.trial_id, {})
        acc = r.get("mean") if not r.get("failed") else None
        cells = [f"<td><code>{e(t.trial_id)}</code></td>", f"<td>{e(t.status)}</td>"]
        cells += [f"<td>{e(short(decoded(exp, n, t.params.get(n))))}</td>" for n in names]
        cells += [_num(t.final_bpd), f"<td class='num'>{t.steps}</td>", _num(acc)]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


def _num(value: Any, fmt: str = "{:.4f}") -> str:
    return f"<td class='num'>{fmt.format(float(value))}</td>" if is_finite_number(value) else "<td class='num'>–</td>"
