"""The full run's report: what `train.py` trained and measured, as one self-contained HTML page.

    python -m tuner.full_run_report runs/<name>/full_run

train.py writes it when a run finishes and attaches it to the run's MLflow run under report/; this command
rebuilds it from the run folder alone. It reads metrics.json (the training log, test bits/dim, the grids),
config.yaml (the config and the tuner's provenance), the PNGs, and the tuning trial's own training log from the
tuning experiment folder (Tune's result.json of the trial best_config.yaml names), and writes:

  report.html       the page: figures and grids embedded as base64 PNGs, no scripts, nothing fetched
  curves.png        training loss, val DSM and val bits/dim against step, the tuning trial's curves overlaid

Ray-free and torch-free: it reads files and draws with matplotlib.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from trials.cli import EXIT_BAD_INPUT, OneLineArgumentParser, UserError
from trials.files import atomic_write_text
from tuner.mlflow_runs import FULL_RUN_STATE, is_finite_number

REPORT_FILE = "report.html"
CURVES_FILE = "curves.png"
PANELS = (
    ("train_loss", "training loss (DSM)", True),
    ("val_dsm", "val DSM loss", True),
    ("val_bpd", "val bits/dim (fast fidelity)", False),
)
FULL_COLOUR, TRIAL_COLOUR = "#1f77b4", "#ff7f0e"


class ReportError(UserError, ValueError):
    """The folder is not a finished full run; one line, exit 2."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def trial_curve(metrics: dict[str, Any], run_config: dict[str, Any] | None) -> tuple[list[dict[str, Any]], str]:
    """The tuning trial's training log (one record per rung, by step) and a sentence about it.

    The trial is the one best_config.yaml's provenance names; its Tune results lie in the trial's folder of the
    tuning experiment (the folder of best_config.yaml). The overlay is left out, with the reason, when the config
    is hand-written, the results cannot be found, or the full run changed the data or the evaluator (its val
    bits/dim would then not be the trial's measure)."""
    prov = metrics.get("provenance") or {}
    trial_id = prov.get("trial_id")
    if not trial_id:
        return [], "A hand-written config: there is no tuning trial to compare with."
    config_file = Path(metrics.get("config_file", ""))
    exported = _read_yaml(config_file) or {}
    if run_config and exported and any(run_config.get(k) != exported.get(k) for k in ("data", "eval")):
        return [], (
            f"The full run's data or evaluator differ from tuning trial {trial_id}'s ({config_file}): "
            "its val bits/dim measure something else, so the trial's curve is not drawn."
        )
    folders = [Path(prov["checkpoint"]).parent] if prov.get("checkpoint") else []
    folders += sorted(p.parent for p in config_file.parent.glob("*/result.json"))
    for folder in folders:
        try:
            lines = (folder / "result.json").read_text().splitlines()
        except OSError:
            continue
        records = [r for r in (json.loads(line) for line in lines if line.strip()) if r.get("trial_id") == trial_id]
        if records:
            by_step = {int(r["step"]): r for r in records if "step" in r}  # a retried rung: the latest report
            return [by_step[s] for s in sorted(by_step)], (
                f"Dashed: tuning trial {trial_id} of experiment '{prov.get('experiment', '?')}' ({folder})."
            )
    return [], (
        f"Tuning trial {trial_id}'s results were not found next to {config_file} (moved or deleted): "
        "its curve is not drawn."
    )


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def curves_figure(history: list[dict[str, Any]], trial: list[dict[str, Any]], trial_steps: int | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (key, label, log_y) in zip(axes, PANELS):
        for records, colour, style, name in (
            (history, FULL_COLOUR, "-", "full run"),
            (trial, TRIAL_COLOUR, "--", "tuning trial"),
        ):
            points = [(r["step"], r[key]) for r in records if is_finite_number(r.get(key))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, color=colour, marker="o" if len(points) < 40 else None, ms=3, label=name)
        if trial_steps:
            ax.axvline(trial_steps, color="#999999", lw=0.8, ls=":")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        if log_y and any(is_finite_number(r.get(key)) and r[key] > 0 for r in history):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _img(data: bytes, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{size} src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _file_img(path: Path, alt: str, width: int | None = None) -> str:
    try:
        return _img(path.read_bytes(), alt, width)
    except OSError:
        return f"<p><em>{html.escape(alt)}: {html.escape(str(path))} is missing.</em></p>"


def _num(value: Any, fmt: str = ".4f") -> str:
    return format(value, fmt) if is_finite_number(value) else "—"


def _solver(fid: dict[str, Any]) -> str:
    """A score's solver as its fidelity record gives it: 'logsnr rk4, 32 steps' or 'logsnr dopri5, rtol 1e-05'."""
    how = f"{fid.get('steps')} steps" if fid.get("steps") else f"rtol {fid.get('rtol')}, atol {fid.get('atol')}"
    return f"{fid.get('frame', 't')} {fid.get('method')}, {how}"


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def build_page(
    out_dir: Path,
    metrics: dict[str, Any],
    run_config: dict[str, Any] | None,
    curves: bytes,
    note: str,
    trial: list[dict[str, Any]],
) -> str:
    e = html.escape
    prov, tr, bpd = metrics.get("provenance") or {}, metrics["train"], metrics["test_bpd"]
    fid, val_fid = bpd.get("fidelity") or {}, metrics.get("val_bpd_fidelity") or {}
    parts = [f"<h1>Full run: {e(out_dir.name)}</h1>"]
    origin = (
        f"trial {prov['trial_id']} of tuning experiment '{prov.get('experiment', '?')}'"
        if prov.get("trial_id")
        else "a hand-written config"
    )
    parts.append(
        f"<p>{e(origin)}, {tr['steps']:,} steps on {e(metrics.get('device', '?'))} "
        f"({e(str(tr.get('precision')))}), {tr['seconds'] / 60:.1f} minutes of training.</p>"
    )
    # Test bits/dim with its 95% interval (mean +- 1.96 standard errors over the test images)
    if bpd.get("failed") or not is_finite_number(bpd.get("mean")):
        parts.append(f"<h2>Test bits/dim</h2><p>Failed: {e(str(bpd.get('reason')))}</p>")
    else:
        half = 1.96 * bpd["stderr"] if is_finite_number(bpd.get("stderr")) else math.nan
        parts.append(
            f"<h2>Test bits/dim: {bpd['mean']:.4f} ± {_num(bpd.get('stderr'))}</h2><p>95% interval "
            f"[{_num(bpd['mean'] - half)}, {_num(bpd['mean'] + half)}] over {fid.get('n_images')} images of the "
            f"{e(str(bpd.get('split')))} split, accurate fidelity ({e(_solver(fid))}; NFE {bpd.get('nfe')}, "
            f"{_num(bpd.get('seconds'), '.1f')} s)."
            + (f" Warning: {e(str(bpd['reason']))}" if bpd.get("reason") else "")
            + "</p>"
        )
    # The training log
    scored = [r for r in metrics["history"] if is_finite_number(r.get("val_bpd"))]
    share = tr.get("scoring_share")
    parts.append("<h2>Training log</h2>" + _img(curves, "training curves"))
    parts.append(
        f"<p>Val bits/dim at fast fidelity ({val_fid.get('n_images')} validation images, {e(str(val_fid.get('solver')))}) "
        f"with the tuning experiment's evaluator (the same images, noise and probes as every rung), scored "
        f"{len(scored)} times: every {tr.get('score_every')} steps"
        f"{', at the trial’s last step (' + str(tr['trial_steps']) + ')' if tr.get('trial_steps') else ''} and at the end; "
        f"{_num(tr.get('scoring_seconds'), '.0f')} s in all, {_num(100 * share if share is not None else None, '.1f')}% "
        f"of the training time. {e(note)}</p>"
    )
    if trial and tr.get("trial_steps"):
        here = next((r for r in scored if r["step"] == tr["trial_steps"]), None)
        there = next((r for r in trial if r.get("step") == tr["trial_steps"]), None)
        if here and there and is_finite_number(there.get("val_bpd")):
            parts.append(
                f"<p>At step {tr['trial_steps']}, the trial's last rung: full run {here['val_bpd']:.4f}, "
                f"trial {there['val_bpd']:.4f} bits/dim (same config and seed, so the same weights up to "
                "rounding).</p>"
            )
    # Samples: the final grids, then those drawn while training
    parts.append("<h2>Samples</h2><div class=row>")
    for name, grid in metrics["samples"].items():
        caption = (
            f"{name}: {grid.get('n_images')} images, {grid.get('nfe')} score evaluations, "
            f"{_num(grid.get('seconds'), '.1f')} s"
            if not grid.get("failed")
            else f"{name}: failed, {grid.get('reason')}"
        )
        image = _file_img(out_dir / grid["file"], f"{name} samples", 280) if grid.get("file") else ""
        parts.append(f"<figure>{image}<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</div>")
    during = metrics.get("samples_during_training") or []
    if during:
        parts.append(
            "<h2>Samples over training</h2><p>The same starting noise at every step: the grids differ "
            "because the model does.</p><table><tr><th>step</th>"
        )
        samplers = sorted({d["sampler"] for d in during})
        parts.append("".join(f"<th>{e(s)}</th>" for s in samplers) + "</tr>")
        for step in sorted({d["step"] for d in during}):
            cells = {d["sampler"]: d for d in during if d["step"] == step}
            row = "".join(
                f"<td>{_file_img(out_dir / cells[s]['path'], f'{s} at step {step}', 140)}</td>"
                if cells.get(s, {}).get("path")
                else "<td>—</td>"
                for s in samplers
            )
            parts.append(f"<tr><th>{step}</th>{row}</tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No samples were drawn during training (sample.every, or train.py --sample-every N).</p>")
    # Provenance
    mlflow_state = _read_json(out_dir / FULL_RUN_STATE) or {}
    rows = [(k, v) for k, v in prov.items() if v not in (None, "")]
    rows += [
        ("config used", out_dir / "config.yaml"),
        ("MLflow", f"{mlflow_state.get('tracking_uri', '—')}, run {mlflow_state.get('run_id', '—')}"),
        ("data", metrics.get("data")),
        ("created", metrics.get("created")),
    ]
    parts.append("<h2>Provenance</h2>" + _table(rows))
    if run_config:
        flat = {
            f"{section}.{k}": v
            for section, values in run_config.items()
            if isinstance(values, dict)
            for k, v in values.items()
        }
        parts.append("<h2>Config</h2>" + _table(sorted(flat.items())))
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
        "font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}"
        ".row{display:flex;gap:2em;flex-wrap:wrap}figcaption{font-size:13px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Full run {e(out_dir.name)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def write_report(out_dir: Path) -> list[Path]:
    """report.html and curves.png in the run folder; returns their paths, the page first."""
    out_dir = Path(out_dir)
    metrics = _read_json(out_dir / "metrics.json")
    if not isinstance(metrics, dict) or "history" not in metrics:
        raise ReportError(f"{out_dir}: no metrics.json of a finished full run (train.py writes it at the end)")
    run_config = _read_yaml(out_dir / "config.yaml")
    run_config = {k: v for k, v in run_config.items() if k != "provenance"} if isinstance(run_config, dict) else None
    trial, note = trial_curve(metrics, run_config)
    curves = curves_figure(metrics["history"], trial, metrics["train"].get("trial_steps"))
    (out_dir / CURVES_FILE).write_bytes(curves)
    atomic_write_text(out_dir / REPORT_FILE, build_page(out_dir, metrics, run_config, curves, note, trial))
    return [out_dir / REPORT_FILE, out_dir / CURVES_FILE]


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(
        prog="python -m tuner.full_run_report", description="Rebuild a full run's report.html from its folder."
    )
    p.add_argument("folder", type=Path, help="the full run's folder (train.py's --out, default <experiment>/full_run)")
    args = p.parse_args(argv)
    try:
        paths = write_report(args.folder)
    except UserError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(paths[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
