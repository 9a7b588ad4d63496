"""The full run's network as an MLflow model: logged to its run, registered under a name, loaded by URI.

The EMA network is logged with `mlflow.pytorch.log_model` in MLflow's safe `pt2` format: a torch.export program
of the noise predictor eps_theta(x, t), so `mlflow.pytorch.load_model` runs no pickle and needs none of this
repository's code; the run's TrialConfig rides in the model's metadata (`metadata["vpsde"]["config"]`).
trials/portable.py says how to sample from it. `python train.py --register-model NAME` registers it, and
`python sample.py --model models:/NAME/VERSION` (or runs:/<run id>/model, or a local model folder) draws from it.

This module is the one place on the driver side that handles a network: it imports mlflow.pytorch, and with it
torch, inside its functions only, which train.py and sample.py call with a network trials/ built; the tuning
driver never calls them, and importing the module imports neither.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trials.cli import UserError, first_line

MODEL_NAME = "model"  # its name in the run: runs:/<run id>/model
METADATA_KEY = "vpsde"
LOCAL_COPY = "mlflow_model"  # in the run folder, when the store did not take the model
URI_SCHEMES = ("models:/", "runs:/")


class ModelURIError(UserError, ValueError):
    """A model URI that names nothing loadable; one line."""


@dataclass
class LoggedModel:
    model_uri: str | None  # models:/<model id>, or None when only the local copy exists
    registered_uri: str | None  # models:/NAME/VERSION when registered
    local_copy: Path | None  # the model folder kept when the store did not take it


@contextmanager
def tracking_store(uri: str | None) -> Iterator[None]:
    """MLflow's fluent API (log_model, models:/ URIs) reads one process-wide tracking URI, and setting it also
    exports $MLFLOW_TRACKING_URI to every child process started later: set it for the call only, then put back
    what was there, so a caller's later subprocesses (a tuning driver, a test's) keep their own store."""
    if not uri:
        yield
        return
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets both the URI and the variable


def metadata(config: dict[str, Any], output: str) -> dict[str, Any]:
    return {METADATA_KEY: {"config": config, "output": output, "inputs": "x (B, C, H, W) float32, t (B,) float32"}}


def _signature_and_example(input_shape: tuple[int, ...]):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    images = TensorSpec(np.dtype("float32"), (-1, *input_shape), "x")
    signature = ModelSignature(
        inputs=Schema([images, TensorSpec(np.dtype("float32"), (-1,), "t")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, *input_shape))]),
    )
    # A batch of 2: torch.export keeps a dimension of size 1 static, and the batch must stay free.
    example = (np.zeros((2, *input_shape), np.float32), np.full((2,), 0.5, np.float32))
    return signature, example


def log_model(
    tracking_uri: str,
    run_id: str | None,
    network: Any,
    config: dict[str, Any],
    *,
    input_shape: tuple[int, ...],
    output: str,
    step: int,
    out_dir: Path,
    register_as: str | None = None,
    log: Callable[[str], None] = print,
    keep_locally: Callable[[Path], None] | None = None,
) -> LoggedModel:
    """Log `network` (a CPU nn.Module in eval mode) as the MLflow model of run `run_id`, registered as
    `register_as` when given. When the store does not take it, the model is saved to <out_dir>/mlflow_model
    and handed to `keep_locally` (the run's outbox attaches it as the run's model/ artifacts later)."""
    import mlflow
    import mlflow.pytorch

    signature, example = _signature_and_example(input_shape)
    settings = dict(
        signature=signature,
        input_example=example,
        metadata=metadata(config, output),
        serialization_format="pt2",
        pip_requirements=["torch", "numpy"],
    )
    if run_id is not None:
        try:
            # The active run gives the logged model its experiment (and its link to the run's metrics at `step`).
            with tracking_store(tracking_uri), mlflow.start_run(run_id=run_id):
                info = mlflow.pytorch.log_model(
                    network, name=MODEL_NAME, registered_model_name=register_as, step=step, **settings
                )
            registered = (
                f"models:/{register_as}/{info.registered_model_version}"
                if register_as and info.registered_model_version
                else None
            )
            return LoggedModel(info.model_uri, registered, None)
        except Exception as exc:  # noqa: BLE001 - any failure of the store: keep the model on disk instead
            log(f"MLflow: {tracking_uri} did not take the model ({type(exc).__name__}: {first_line(exc)})")
    folder = Path(out_dir) / LOCAL_COPY
    if folder.exists():
        import shutil

        shutil.rmtree(folder)  # a copy from an earlier attempt; MLflow refuses to save over a folder
    mlflow.pytorch.save_model(network, str(folder), **settings)
    if keep_locally is not None:
        keep_locally(folder)
    return LoggedModel(None, None, folder)


def is_model_uri(text: str) -> bool:
    return text.startswith(URI_SCHEMES)


def load_model(uri: str, tracking_uri: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The network (eps_theta) and config of a model logged by train.py: models:/NAME/VERSION, runs:/<id>/model,
    or a local model folder. Raises ModelURIError, one line, when the URI names nothing of the kind."""
    with tracking_store(tracking_uri):  # the registry follows the tracking store unless set apart
        return _load(uri)


def _load(uri: str) -> tuple[Any, dict[str, Any]]:
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    if not is_model_uri(uri) and not (Path(uri) / "MLmodel").is_file():
        raise ModelURIError(
            f"{uri}: not a model URI (models:/NAME/VERSION, runs:/<run id>/model) nor a folder holding an MLmodel file"
        )
    store = mlflow.get_tracking_uri()
    if is_model_uri(uri) and store.startswith("sqlite:///") and not Path(store[len("sqlite:///") :]).is_file():
        raise ModelURIError(
            f"{uri}: there is no MLflow store at {store} (give --mlflow-uri, or set MLFLOW_TRACKING_URI)"
        )  # rather than create an empty one to look in
    where = f" in {store}" if is_model_uri(uri) else ""
    try:
        info = mlflow.models.get_model_info(uri)
        config = (info.metadata or {}).get(METADATA_KEY, {}).get("config")
        if config is None:
            raise ModelURIError(
                f"{uri}: an MLflow model, but not one train.py logged (no '{METADATA_KEY}' config in its metadata)"
            )
        network = mlflow.pytorch.load_model(uri)
    except MlflowException as exc:
        raise ModelURIError(f"{uri}: cannot load it{where} ({first_line(exc)})") from None
    except OSError as exc:
        raise ModelURIError(f"{uri}: cannot read it ({exc.strerror or exc})") from None
    return network, config
