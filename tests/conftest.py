"""Shared fixtures: the embedded data loaded once, and tiny configs that train in seconds on a CPU."""

import os

import pytest

from trials.config import TrialConfig
from trials.data import load_data

TINY_MODEL = {"ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def tiny_config(**train) -> TrialConfig:
    settings = {
        "lr": 2e-3,
        "batch_size": 32,
        "steps": 20,
        "val_every": 10,
        "log_every": 5,
        "val_images": 64,
        "num_threads": 1,
        "ema_decay": 0.9,
    }
    settings.update(train)
    return TrialConfig.from_dict(
        {"model": TINY_MODEL, "train": settings, "eval": {"fast": {"n_images": 8}, "accurate": {"n_images": 16}}}
    )


@pytest.fixture(scope="session")
def mnist5k():
    return load_data(TrialConfig().data)


@pytest.fixture(scope="session", autouse=True)
def no_tracking_store_from_the_shell():
    """Tests start tune.py and train.py as subprocesses, which take $MLFLOW_TRACKING_URI as their store: one set in
    the developer's shell would send the tests' runs to that server, and the tests read their own stores. Unset for
    the session (the one place: the subprocesses inherit os.environ), put back after."""
    shell = os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    if shell is not None:
        os.environ["MLFLOW_TRACKING_URI"] = shell


@pytest.fixture(autouse=True)
def no_tracking_store_leaks(no_tracking_store_from_the_shell):
    """A test that leaves $MLFLOW_TRACKING_URI set (mlflow.set_tracking_uri exports it) would send every later
    test's runs to its store."""
    yield
    after = os.environ.get("MLFLOW_TRACKING_URI")
    if after is not None:
        import mlflow

        mlflow.set_tracking_uri(None)  # unsets it, for the tests after this one
        pytest.fail(f"the test left MLFLOW_TRACKING_URI={after!r} set for every later test")
