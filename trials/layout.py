"""The names of the files a trial leaves in its Tune checkpoint folders. It imports nothing, so the driver side
(the report, which finds the winner's checkpoint by name) reads the same name without Ray or torch."""

CHECKPOINT_FILE = "trainer.pt"  # the trainer's state: written by trials.trainable, read by trials.preview
