"""Recall after distractors (HCAM's Ballet pattern): ``--config=configs/recall.py:<family>``."""

from mnemax.configs.base import apply_family, base_config, task_families

# family (or a variant) -> (preset, overrides sized for this task); every other registered
# family runs at its tiny preset (configs.base.task_families)
TUNED = {
    "transformer": ("transformer-tiny", {"d_model": 64, "n_layers": 2, "num_heads": 2, "window": 256, "key_conv": 4}),
    "hopfield": ("hopfield-tiny", {"d_model": 64, "memory_size": 256}),
    "hcam": ("hcam-tiny", {"d_model": 64, "chunk_size": 16, "num_chunks": 16, "top_k": 2}),
    "mamba": ("mamba-tiny", {"d_model": 64, "n_layers": 2, "d_state": 16}),
    "xlstm": ("xlstm-tiny", {"d_model": 64, "num_heads": 2}),
}
FAMILIES = task_families(TUNED)


def get_config(arg: str = "transformer"):
    c = base_config()
    c.task.name = "recall"
    c.task.params.seq_len = 256
    c.task.params.num_dancers = 6
    c.task.params.dance_len = 16
    c.train.steps = 2000
    c.train.learning_rate = 3e-3
    return apply_family(c, FAMILIES, arg)
