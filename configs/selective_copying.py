"""Selective copying: ``--config=configs/selective_copying.py:<family>``."""

from mnemax.configs.base import apply_family, base_config, task_families

# family (or a variant) -> (preset, overrides sized for this task); every other registered
# family runs at its tiny preset (configs.base.task_families)
TUNED = {
    "transformer": ("transformer-tiny", {"d_model": 64, "n_layers": 2, "num_heads": 2, "window": 128, "key_conv": 4}),
}
FAMILIES = task_families(TUNED)


def get_config(arg: str = "transformer"):
    c = base_config()
    c.task.name = "selective_copying"
    c.task.params.seq_len = 128
    c.task.params.num_tokens = 16
    c.task.params.data_vocab = 16
    c.train.steps = 2000
    c.train.learning_rate = 3e-3
    return apply_family(c, FAMILIES, arg)
