"""mnemax.train: the sharded trainer, TFDS memory tasks, checkpoints (``train`` extras)."""
