"""Building the report: read the folder, work out the numbers, draw the figures, write the page and report.json."""

from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trials.files import atomic_write_text
from trials.progress import Progress
from tuner.report.analysis import ties
from tuner.report.curves import plot_learning_curves
from tuner.report.experiment import Experiment, load_experiment
from tuner.report.figures import plot_hyperparameters, plot_importance, plot_rescores
from tuner.report.importance import Importance, importance
from tuner.report.page import page
from tuner.report.sampling import Sampler, subprocess_sampler, winner_samples
from tuner.search_space import SearchSpace

REPORT_DIR = "report"
FIGURES = ("learning_curves", "importance", "hyperparameters", "rescores", "samples")


@dataclass
class Report:
    html: Path
    figures: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return [self.html, *self.figures.values(), self.html.with_name("report.json")] + (
            [self.html.with_name("samples.json")] if self.html.with_name("samples.json").is_file() else []
        )


def build_report(
    experiment_dir: Path,
    space: SearchSpace | None = None,
    sampler: Sampler | None = subprocess_sampler,
    progress_out=None,
) -> Report:
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
    progress.done(
        5, "winner's samples" + (" (reused: checkpoint unchanged)" if sample_info and sample_info.get("reused") else "")
    )
    for stale in set(FIGURES) - set(figures):  # a figure this build could not make must not linger from the last
        (out_dir / f"{stale}.png").unlink(missing_ok=True)

    summary = _summary(exp, imp, tied, notes, sample_info, figures)
    atomic_write_text(out_dir / "report.json", json.dumps(summary, indent=2, default=_json_default))
    html_path = out_dir / "report.html"
    atomic_write_text(html_path, page(exp, imp, tied, notes, sample_info, figures))
    return Report(html_path, figures, summary)


def _summary(
    exp: Experiment,
    imp: Importance,
    tied: dict[str, bool],
    notes: dict[str, str],
    sample_info: dict | None,
    figures: dict[str, Path],
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for t in exp.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    return {
        "experiment": exp.name,
        "folder": str(exp.folder),
        "finished": exp.finished,
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "trials": counts,
        "winner": dataclasses.asdict(exp.winner) if exp.winner else None,
        "importance": {"values": imp.values, "trial_ids": imp.trial_ids, "evaluator": "fanova", "note": imp.note},
        "tied_with_winner": sorted(tid for tid, v in tied.items() if v),
        "ties_note": notes.get("rescores", ""),
        "samples": sample_info,
        "samples_note": notes.get("samples", ""),
        "figures": {k: p.name for k, p in figures.items()},
    }


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
