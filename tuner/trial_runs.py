"""The child runs of a tuning experiment, one per trial: created on first sight, found again after a resume, then
its rungs, its comparison with the winner and its end.

Apart from tuner/tracking.py (the parent run, the tracker a process shares, Tune's callback) because it has state
of its own (each trial's run key and last logged step) and is what Tune's event loop runs at every report, where
it must only ever append to the outbox. Ray-free.
"""

from __future__ import annotations

from typing import Any

from tuner.mlflow_runs import MLFLOW_EXPERIMENT, ROLE_TAG, TRIAL_ID_TAG, is_finite_number, param_value
from tuner.outbox import Outbox, now_ms
from tuner.tracking_state import TrackingState

METRIC_KEYS = ("train_loss", "val_dsm", "val_bpd", "val_bpd_stderr", "nfe", "eval_seconds", "images_per_sec", "seconds")


class TrialRuns:
    """The child runs of the parent run `state` names, written through `outbox`."""

    def __init__(self, outbox: Outbox, state: TrackingState):
        self.outbox, self.state = outbox, state
        self._keys: dict[str, str] = {}  # trial_id -> child run key, for the trials seen in this process
        self._last_step: dict[str, int] = {}  # child run key -> the last step logged by this process

    def run(self, trial_id: str, trial_name: str, params: dict[str, Any]) -> str:
        """The trial's child run, created on first sight and found again after a resume or a retry.

        Returns its run id, or, while the store has not created it yet, the key later calls name it by."""
        if trial_id not in self._keys:
            key = self._keys[trial_id] = self.state.child_key(trial_id)
            self.outbox.create_run(
                key,
                experiment=MLFLOW_EXPERIMENT,
                name=trial_name,
                parent=self.state.parent_key,
                find_tags={TRIAL_ID_TAG: trial_id},
                reopen=True,
                tags={TRIAL_ID_TAG: trial_id, ROLE_TAG: "trial", "status": "running"},
                params={k: param_value(v) for k, v in params.items()},
            )
        return self.outbox.ref(self._keys[trial_id])

    def ref(self, trial_id: str) -> str | None:
        """The ref of a child run this process has already asked for, else None."""
        key = self._keys.get(trial_id)
        return None if key is None else self.outbox.ref(key)

    def run_ids(self) -> dict[str, str]:
        """trial_id -> child run id for the trials that have one (those the store has not created yet have none)."""
        ids = self.state.child_run_ids()
        parent, experiment_id = self.state.parent_run_id, self.state.experiment_id
        if parent and experiment_id:
            runs = self.outbox.read(
                lambda client: client.search_runs(
                    [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=10_000
                ),
                [],
                what=f"listing the child runs of {parent}",
            )
            ids.update({r.data.tags[TRIAL_ID_TAG]: r.info.run_id for r in runs if TRIAL_ID_TAG in r.data.tags})
        return ids

    def log_rung(self, run_id: str, result: dict[str, Any]) -> None:
        """One rung of a trial, from Tune's callback: appended to the journal, never waiting for the store.

        A rung the run already holds is not logged again: a trial restored in this process from the checkpoint
        before a rung reports it again (checked here), and so does every trial of a driver killed after logging
        a rung but before Tune saved its state (checked by the sender against the store: `new_steps_of`)."""
        step, now = int(result.get("step", 0)), now_ms()
        key = self.outbox.key_of(run_id) or run_id
        if step <= self._last_step.get(key, -1):
            return
        self._last_step[key] = step
        metrics = [(k, float(result[k]), now, step) for k in METRIC_KEYS if k in result and is_finite_number(result[k])]
        tags = {"reason": str(result["reason"])} if result.get("reason") else {}
        if result.get("precision"):  # what train.precision resolved to on the trial's device
            tags["precision"] = str(result["precision"])
        self.outbox.log_batch(run_id, metrics=metrics, tags=tags, new_steps_of="seconds")

    def log_comparison(self, run_id: str, diff: float, stderr: float, tied: bool) -> None:
        """A re-scored trial's paired difference to the winner (see tuner.export.paired_to_winner)."""
        now = now_ms()
        self.outbox.log_batch(
            run_id,
            metrics=[("paired_diff_to_winner", diff, now, 0), ("paired_diff_to_winner_stderr", stderr, now, 0)],
            tags={"tied_with_winner": str(tied).lower()},
        )

    def finish(self, run_id: str, status: str, reason: str = "") -> None:
        tags = {"status": status, **({"reason": reason[:4000]} if reason else {})}
        self.outbox.log_batch(run_id, tags=tags)
        mlflow_status = {"errored": "FAILED", "diverged": "FAILED", "interrupted": "KILLED"}.get(status, "FINISHED")
        self.outbox.terminate(run_id, mlflow_status)
