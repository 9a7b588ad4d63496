"""The experiment report, built from a recorded experiment (tests/fixtures/recorded) without starting Ray."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
import yaml

from tuner import report as rp
from tuner.space import load_space

RECORDED = Path(__file__).resolve().parent / "fixtures" / "recorded"
FULL_LENGTH = 20  # fixed.train.steps of the recorded space
WINNER = "57d702a9"


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def copy_recorded(tmp_path: Path) -> Path:
    folder = tmp_path / "recorded"
    shutil.copytree(RECORDED, folder)
    return folder


def no_sampler(*_):
    raise AssertionError("the sampler must not be called here")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build, samples included (trials.preview in a subprocess, as `python -m tuner.report` does)."""
    folder = copy_recorded(tmp_path_factory.mktemp("report"))
    return folder, rp.build_report(folder)


def test_report_is_one_self_contained_page_with_every_figure(built):
    folder, report = built
    assert report.html == folder / "report" / "report.html"
    text = report.html.read_text()
    parser = Tags()
    parser.feed(text)
    assert not [t for t, _ in parser.tags if t in ("script", "link", "iframe", "object", "embed")]
    refs = [a[k] for _, a in parser.tags for k in ("src", "href") if k in a]
    assert "http://" not in text and "https://" not in text  # nothing fetched, nothing to follow offline
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    images = [base64.b64decode(r.split(",", 1)[1]) for r in refs]
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in images)
    assert set(report.figures) == set(rp.FIGURES) and len(images) == len(rp.FIGURES)
    for name in rp.FIGURES:  # the same figures as files, and the page embeds exactly those bytes
        assert (folder / "report" / f"{name}.png").read_bytes() in images


def test_importance_is_over_the_full_length_trials_and_their_final_scores(built):
    folder, _ = built
    summary = json.loads((folder / "report" / "report.json").read_text())
    table = pd.read_csv(RECORDED / "trials.csv", dtype={"trial_id": str})
    full = table[(table.status == "completed") & (table.steps == FULL_LENGTH)]
    assert len(full) == 3 and len(table) == 8  # the recording: 3 completed, 2 stopped early, 3 errored
    assert sorted(summary["importance"]["trial_ids"]) == sorted(full.trial_id)
    assert "3 of 8 trials" in summary["importance"]["note"] and "rough" in summary["importance"]["note"]

    # The same study built by hand from trials.csv: hyperparameters as the searcher saw them, final fast score.
    space = load_space(RECORDED / "space.yaml")
    distributions = space.to_optuna()
    params = {}
    for d in RECORDED.iterdir():
        lines = (d / "result.json").read_text().splitlines() if (d / "result.json").is_file() else []
        if lines:
            params[json.loads(lines[0])["trial_id"]] = json.loads((d / "params.json").read_text())
    state = json.loads(next(RECORDED.glob("experiment_state-*.json")).read_text())
    created = [json.loads(entry[0])["trial_id"] for entry in state["trial_data"]]  # the order Tune made them in
    study = optuna.create_study()
    for row in sorted(full.itertuples(), key=lambda r: created.index(r.trial_id)):
        study.add_trial(
            optuna.trial.create_trial(params=params[row.trial_id], distributions=distributions, value=row.val_bpd_last)
        )
    expected = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
    )
    assert summary["importance"]["values"] == pytest.approx({k: float(v) for k, v in expected.items()})


def test_winner_ties_and_samples(built):
    folder, report = built
    summary = report.summary
    assert summary["winner"]["trial_id"] == WINNER and summary["winner"]["fidelity"] == "accurate"
    rescores = json.loads((RECORDED / "rescores.json").read_text())
    w = rescores[WINNER]
    overlapping = {tid for tid, r in rescores.items() if abs(r["mean"] - w["mean"]) <= r["stderr"] + w["stderr"]}
    assert set(summary["tied_with_winner"]) == overlapping == {WINNER}  # the recording's others are > 2 bits/dim worse
    assert "overlap" in summary["ties_note"]  # no paired differences in this recording: said so
    samples = summary["samples"]
    # The multistep solver's cost is known in advance: steps + 1 evaluations, and one for the denoising step.
    assert samples["method"] == "multistep" and samples["steps"] == 63 and samples["nfe"] == 63 + 1 + 1
    assert samples["n_images"] == 36 and samples["step"] == FULL_LENGTH and samples["sampler"] == "probability-flow ODE"
    text = report.html.read_text()
    assert f"NFE {samples['nfe']}" in text and "multistep, 63 steps" in text


def test_samples_are_reused_while_the_checkpoint_is_unchanged(built, tmp_path):
    folder = copy_recorded(tmp_path)
    shutil.copytree(built[0] / "report", folder / "report")
    again = rp.build_report(folder, sampler=no_sampler)
    assert again.summary["samples"]["reused"] is True and "samples" in again.figures

    checkpoint = next(folder.glob(f"run_trial_{WINNER}_*/checkpoint_000001/trainer.pt"))
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")  # another checkpoint: the grid must be drawn anew
    calls = []

    def fake(ckpt, out, settings):
        calls.append((ckpt, settings))
        out.write_bytes((built[0] / "report" / "samples.png").read_bytes())
        return {**built[1].summary["samples"], "nfe": 7, "reused": False}

    fresh = rp.build_report(folder, sampler=fake)
    assert len(calls) == 1 and calls[0][0] == checkpoint.parent and calls[0][1] == rp.SAMPLE_SETTINGS
    assert fresh.summary["samples"]["nfe"] == 7


def test_preview_refuses_a_method_it_cannot_sample_with_in_one_line(tmp_path, capsys):
    from trials.preview import main as preview

    checkpoint = next(copy_recorded(tmp_path).glob(f"run_trial_{WINNER}_*/checkpoint_000001"))
    status = preview(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "grid.png"), "--method", "rk4"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "preview.ode_method" in err and "rk4" in err
    assert not (tmp_path / "grid.png").exists()


def test_importance_is_omitted_with_the_reason_below_two_full_length_trials(tmp_path):
    folder = copy_recorded(tmp_path)
    table = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    table.loc[table.trial_id != WINNER, "status"] = table.loc[table.trial_id != WINNER, "status"].replace(
        "completed", "stopped early"
    )
    table.to_csv(folder / "trials.csv", index=False)
    out = rp.build_report(folder, sampler=None)
    assert "importance" not in out.figures and not (folder / "report" / "importance.png").exists()
    assert out.summary["importance"]["trial_ids"] == [WINNER]
    text = out.html.read_text()
    assert "at least 2 trials that reached the full 20 steps, and this experiment has 1" in text
    assert "samples" not in out.figures and "not drawn" in text  # sampler=None: said, not silently missing


def test_an_interrupted_experiment_reads_statuses_from_tunes_state(tmp_path):
    folder = copy_recorded(tmp_path)
    expected = dict(pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})[["trial_id", "status"]].values)
    for name in ("trials.csv", "rescores.json", "best_config.yaml"):
        (folder / name).unlink()
    state_file = next(folder.glob("experiment_state-*.json"))
    state = json.loads(state_file.read_text())
    running = None
    for entry in state["trial_data"]:  # one trial was still running when the search stopped
        trial = json.loads(entry[0])
        if trial["trial_id"] == "7fb9c396":
            trial["status"], running = "RUNNING", trial["trial_id"]
            entry[0] = json.dumps(trial)
    state_file.write_text(json.dumps(state))
    expected[running] = "interrupted"

    exp = rp.load_experiment(folder)
    assert {t.trial_id: t.status for t in exp.trials} == expected  # the export's statuses, rebuilt from Tune's
    assert not exp.finished and exp.winner.fidelity == "fast"
    scored = [t for t in exp.trials if t.status not in ("errored", "diverged") and math.isfinite(t.final_bpd)]
    assert exp.winner.trial_id == min(scored, key=lambda t: t.final_bpd).trial_id
    out = rp.build_report(folder, sampler=None)
    assert "rescores" not in out.figures and "not finished" in out.html.read_text()


def test_paired_ties_recorded_by_the_export_are_used(tmp_path):
    folder = copy_recorded(tmp_path)
    rescores = json.loads((folder / "rescores.json").read_text())
    for tid, r in rescores.items():
        r["paired_diff"] = 0.0 if tid == WINNER else r["mean"] - rescores[WINNER]["mean"]
        r["paired_diff_stderr"] = 0.05
        r["tied_with_winner"] = tid in (WINNER, "c1620fa7")  # not what the overlap rule says: must win
    (folder / "rescores.json").write_text(json.dumps(rescores))
    out = rp.build_report(folder, sampler=None)
    assert sorted(out.summary["tied_with_winner"]) == sorted([WINNER, "c1620fa7"])
    text = out.html.read_text()
    assert "paired diff to winner" in text and "paired comparison" in text


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert rp.main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such experiment folder" in err

    folder = copy_recorded(tmp_path)
    (folder / "space.yaml").rename(tmp_path / "elsewhere.yaml")
    assert rp.main([str(folder), "--no-samples"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--space" in err
    assert rp.main([str(folder), "--no-samples", "--space", str(tmp_path / "elsewhere.yaml")]) == 0
    assert (folder / "report" / "report.html").is_file()


# ---- at scale: a synthetic experiment of many trials, its export written by the export itself ----------------------
SCALE_SPACE = {
    "steps: 20, val_every: 10": "steps: 180, val_every: 20",
    "grace_period: 10": "grace_period: 20",
    "reduction_factor: 2": "reduction_factor: 3",
}  # rungs at 20 and 60 of 180 steps


class RecordingTracker:
    tracking_uri, experiment_id, parent_run_id = "sqlite:///unused.db", "1", "parent"

    def log_comparison(self, *args):
        pass

    def log_summary(self, **kwargs):
        pass


def synthetic_experiment(folder: Path, n: int, seed: int = 0) -> Path:
    """An experiment folder of n trials as tune.py leaves it: Tune's trial folders and state file, then the export
    (trials_table and write_outputs, the same functions the driver calls), with three accurate re-scores of which
    one ties with the winner on the paired rule. ASHA-like: two thirds stop at each rung; a few error or diverge."""
    import random

    from tuner.export import write_outputs
    from tuner.mlflow_runs import completion_status
    from tuner.trials_table import rank_candidates, trials_table

    rng = random.Random(seed)
    folder.mkdir(parents=True)
    text = (RECORDED / "space.yaml").read_text()
    for old, new in SCALE_SPACE.items():
        text = text.replace(old, new)
    (folder / "space.yaml").write_text(text)
    space = load_space(folder / "space.yaml")
    full = space.base_config.train.steps
    trials, histories, checkpoints, statuses, state = [], {}, {}, {}, []
    for i in range(n):
        tid = f"{i:08x}"
        params = {
            hp.name: rng.choice(hp.labels())
            if hp.is_choice
            else math.exp(rng.uniform(math.log(hp.low), math.log(hp.high)))
            for hp in space.hyperparameters
        }
        params["train.device"] = "cpu"
        name = f"run_trial_{tid}_{i + 1}_synthetic"
        sub = folder / name
        sub.mkdir()
        (sub / "params.json").write_text(json.dumps(params))
        quality = rng.uniform(0, 3) + abs(math.log10(params["lr"]) + 2.7)  # best near lr 2e-3
        stop = 20 if rng.random() < 2 / 3 else 60 if rng.random() < 2 / 3 else full
        fate = rng.random()
        records = [
            {
                "trial_id": tid,
                "step": s,
                "val_bpd": 2.5 + quality + 30 / s + rng.gauss(0, 0.05),
                "val_bpd_stderr": 0.05,
                "seconds": s * 0.1,
            }
            for s in range(20, stop + 1, 20)
        ]
        if fate < 0.01:
            records = []  # errored before its first report
        elif fate < 0.03:
            records[-1].update(val_bpd=math.inf, diverged=True)
        (sub / "result.json").write_text("".join(json.dumps(r) + "\n" for r in records))
        tune_status = "ERROR" if fate < 0.01 else "TERMINATED"
        state.append([json.dumps({"trial_id": tid, "status": tune_status, "relative_logdir": name}), "{}"])
        last = records[-1] if records else {}
        statuses[tid] = "errored" if tune_status == "ERROR" else completion_status(last, full)
        trials.append(SimpleNamespace(trial_id=tid, config=params, last_result=last))
        if records:
            histories[tid] = pd.DataFrame(records)
            checkpoints[tid] = SimpleNamespace(path=str(sub / "checkpoint_000000"))
    (folder / "experiment_state-synthetic.json").write_text(json.dumps({"trial_data": state}))
    analysis = SimpleNamespace(
        trials=trials, trial_dataframes=histories, get_last_checkpoint=lambda trial: checkpoints.get(trial.trial_id)
    )
    best = [t.trial_id for t, _ in rank_candidates(analysis, statuses, 3)]
    images = [rng.uniform(1.5, 4.5) for _ in range(16)]
    # Per image: the third candidate wins; the first is 0.05 worse give or take 0.3 (tied: within 2 paired
    # standard errors); the second is 0.2 worse on every image (not tied, though all the error bars overlap).
    shifts = {
        best[2]: lambda k: 0.0,
        best[0]: lambda k: 0.05 + (0.3 if k % 2 else -0.3),
        best[1]: lambda k: 0.2 + (0.01 if k % 2 else -0.01),
    }
    rescores = {}
    for tid, shift in shifts.items():
        per_image = [v + shift(k) for k, v in enumerate(images)]
        rescores[tid] = {
            "mean": sum(per_image) / len(per_image),
            "stderr": 0.2,
            "per_image": per_image,
            "nfe": 100,
            "seconds": 1.0,
            "failed": False,
            "fidelity": {"name": "accurate"},
        }
    table = trials_table(analysis, space, statuses, rescores, {})
    write_outputs(folder, space, table, rescores, analysis, RecordingTracker())
    return folder


def test_learning_curves_draw_only_the_best_trials_strong(tmp_path):
    exp = rp.load_experiment(synthetic_experiment(tmp_path / "many", 300))
    reported = [t for t in exp.trials if t.history["val_bpd"].map(math.isfinite).any()]
    ranked = sorted((t for t in exp.trials if math.isfinite(t.final_bpd)), key=lambda t: t.final_bpd)
    top = [t.trial_id for t in ranked[: rp.STRONG]]
    mid = ranked[100].trial_id  # a winner far from the best last scores (e.g. an accurate re-score of an outlier)
    assert exp.winner.trial_id in top  # the synthetic winner is among the best by last score
    for winner, strong in ((exp.winner.trial_id, top), (mid, [*top, mid])):
        exp.winner = dataclasses.replace(exp.winner, trial_id=winner)
        fig = rp.learning_curves_figure(exp)
        (ax,) = fig.axes
        lines = {line.get_gid(): line for line in ax.get_lines() if (line.get_gid() or "").startswith("strong ")}
        assert list(lines) == [f"strong {tid}" for tid in strong]  # best first, the winner added only when outside
        assert [text.get_text().split()[0] for text in ax.get_legend().get_texts()] == strong
        assert not fig.legends and sum(a.get_legend() is not None for a in fig.axes) == 1  # one legend
        (faint,) = [c for c in ax.collections if c.get_gid() == "faint"]
        assert len(faint.get_segments()) == len(reported) - len(strong)  # every other reporting trial, faint
        assert faint.get_alpha() <= 0.3
        assert max(faint.get_linewidths()) < min(line.get_linewidth() for line in lines.values())
        assert lines[f"strong {winner}"].get_linewidth() == max(line.get_linewidth() for line in lines.values())
    # The axis names the fast fidelity's real solver: a fixed-step solve has no tolerance to quote.
    for fast in ({"method": "rk4", "steps": 7}, {"method": "dopri5", "steps": 0, "rtol": 1e-4, "atol": 1e-4}):
        fixed = copy.deepcopy(exp.space.fixed)
        fixed.setdefault("eval", {}).setdefault("fast", {}).update(fast)
        exp.space = dataclasses.replace(exp.space, fixed=fixed)
        label = rp.learning_curves_figure(exp).axes[0].get_ylabel()
        assert ("rk4 7 steps" in label and "rtol" not in label) if fast["steps"] else "dopri5 rtol 0.0001" in label


def test_a_large_experiment_reports_the_exports_winner_and_ties(tmp_path):
    folder = synthetic_experiment(tmp_path / "many", 120)
    table = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    out = rp.build_report(folder, sampler=None)
    best = yaml.safe_load((folder / "best_config.yaml").read_text())["provenance"]
    assert out.summary["winner"]["trial_id"] == best["trial_id"] == table.trial_id[0]
    exported_ties = set(table.trial_id[table.tied_with_winner.eq(True)])  # True, False or empty (not re-scored)
    assert set(out.summary["tied_with_winner"]) == exported_ties and len(exported_ties) == 2  # the winner and one
    assert "paired comparison" in out.summary["ties_note"]
    assert sum(out.summary["trials"].values()) == len(table) == 120
    assert set(out.figures) == set(rp.FIGURES) - {"samples"}
