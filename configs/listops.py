"""ListOps: ``--config=configs/listops.py:<family>``."""

from mnemax.configs.base import apply_family, base_config, task_families

# family (or a variant) -> (preset, overrides sized for this task); every other registered
# family runs at its tiny preset (configs.base.task_families)
TUNED = {
    "transformer": ("transformer-tiny", {"d_model": 128, "n_layers": 4, "num_heads": 4, "window": 256}),
}
FAMILIES = task_families(TUNED)


def get_config(arg: str = "transformer"):
    c = base_config()
    c.task.name = "listops"
    c.task.params.seq_len = 256
    c.task.params.max_depth = 4
    c.task.params.max_args = 5
    c.task.num_train = 50000
    c.train.steps = 5000
    c.train.learning_rate = 1e-3
    return apply_family(c, FAMILIES, arg)
