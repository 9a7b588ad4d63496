"""The embedded mnist-5k data, the stratified split and the torchvision source's error messages."""

import dataclasses

import pytest
import torch

from trials.config import DataConfig
from trials.data import DataError, load_data, stratified_split, to_model_space
from trials.datasets import DATASETS


@pytest.fixture(scope="module")
def mnist5k():
    return load_data(DataConfig(name="mnist-5k"))


def test_mnist_5k_shapes_and_dtype(mnist5k):
    assert mnist5k.train.shape == (4500, 1, 28, 28) and mnist5k.train.dtype == torch.uint8
    assert mnist5k.val.shape == (500, 1, 28, 28)
    assert mnist5k.test_is_val and torch.equal(mnist5k.test, mnist5k.val)
    # real digits: mostly black background, some saturated strokes
    assert (mnist5k.train == 0).float().mean() > 0.7 and mnist5k.train.max() == 255


def test_split_is_stratified(mnist5k):
    assert torch.bincount(mnist5k.val_labels, minlength=10).tolist() == [50] * 10
    assert torch.bincount(mnist5k.train_labels, minlength=10).tolist() == [450] * 10


def test_split_is_deterministic_and_disjoint(mnist5k):
    again = load_data(DataConfig(name="mnist-5k"))
    assert torch.equal(again.val, mnist5k.val) and torch.equal(again.train, mnist5k.train)
    train_rows = {bytes(img.numpy().tobytes()) for img in mnist5k.train}
    overlap = sum(bytes(img.numpy().tobytes()) in train_rows for img in mnist5k.val)
    # mnist-5k holds a handful of pixel-identical digits at most; disjoint indices are checked below
    assert overlap <= 2
    labels = torch.arange(5000) % 10
    tr, va = stratified_split(labels, 500, seed=0)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 5000
    other_tr, other_va = stratified_split(labels, 500, seed=1)
    assert not torch.equal(va, other_va)  # the seed matters, so "deterministic" is not "constant"


def test_largest_remainder_quotas_add_up_for_uneven_classes():
    labels = torch.tensor(
        [0] * 5923
        + [1] * 6742
        + [2] * 5958
        + [3] * 6131
        + [4] * 5842
        + [5] * 5421
        + [6] * 5918
        + [7] * 6265
        + [8] * 5851
        + [9] * 5949
    )  # MNIST's train counts
    tr, va = stratified_split(labels, 5000, seed=0)
    assert len(va) == 5000 and len(tr) == 55000
    counts = torch.bincount(labels[va], minlength=10).double()
    expected = torch.bincount(labels, minlength=10).double() * 5000 / 60000
    assert (counts - expected).abs().max() < 1.0


def test_to_model_space_ranges():
    images = torch.tensor([[0, 255]], dtype=torch.uint8)
    assert to_model_space(images, 0.0, centered=False).tolist() == [[0.0, 255 / 256]]
    x = to_model_space(images, torch.full((1, 2), 0.999), centered=True)
    assert x.min() >= -1 and x.max() < 1
    assert torch.allclose(to_model_space(images, 0.5, True), 2 * to_model_space(images, 0.5, False) - 1)


def test_missing_mnist_root_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="--download"):
        load_data(DataConfig(name="mnist", root=str(tmp_path)))


def test_corrupt_mnist_root_is_a_one_line_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataError) as info:
        load_data(DataConfig(name="mnist", root=str(tmp_path)))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_fake_mnist_root_is_read_and_split(tmp_path, monkeypatch):
    """A small MNIST in torchvision's raw format, written here, goes through the real loading code."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)

    def write(name, n):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        (raw / f"{name}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + images.numpy().tobytes()
        )
        (raw / f"{name}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.numpy().tobytes()
        )
        return images

    train_images = write("train", 6000)
    write("t10k", 100)
    # the real 5,000 of 60,000, scaled to 6,000 images
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(DATASETS["mnist"], val_images=500))
    data = load_data(DataConfig(name="mnist", root=str(tmp_path)))
    assert data.train.shape == (5500, 1, 28, 28) and data.val.shape == (500, 1, 28, 28)
    assert data.test.shape == (100, 1, 28, 28) and not data.test_is_val
    assert torch.bincount(data.val_labels).tolist() == [50] * 10
    assert {bytes(x.numpy().tobytes()) for x in data.val} <= {bytes(x.numpy().tobytes()) for x in train_images}
