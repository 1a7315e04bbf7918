"""Spiking adding (ELM's SHD-Adding pattern): ``--config=configs/spiking_adding.py:<family>``."""

from mnemax.configs.base import apply_family, base_config, task_families

# family (or a variant) -> (preset, overrides sized for this task); every other registered
# family runs at its tiny preset (configs.base.task_families)
TUNED = {
    "transformer": ("transformer-tiny", {"d_model": 64, "n_layers": 2, "num_heads": 2, "window": 128}),
    "elm": ("elm-small", {"num_memory": 64}),
    "branch-elm": ("branch-elm-small", {"num_memory": 64, "num_branch": 16, "num_synapse_per_branch": 4}),
    "slstm": ("slstm-tiny", {"d_model": 64}),
}
FAMILIES = task_families(TUNED)


def get_config(arg: str = "transformer"):
    c = base_config()
    c.task.name = "spiking_adding"
    c.task.params.num_channels = 32
    c.task.params.bins_per_digit = 40
    c.train.steps = 2000
    c.train.learning_rate = 2e-3
    return apply_family(c, FAMILIES, arg)
