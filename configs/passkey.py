"""Passkey retrieval with accuracy by needle depth: ``--config=configs/passkey.py:<family>``.

Evaluate a trained release at longer contexts than trained with
``python -m mnemax.train.evaluate --release=W/release --task_param=seq_len=1024``.
"""

from mnemax.configs.base import apply_family, base_config, task_families

# family (or a variant) -> (preset, overrides sized for this task); every other registered
# family runs at its tiny preset (configs.base.task_families)
TUNED = {
    "transformer": ("transformer-tiny", {"d_model": 64, "n_layers": 2, "num_heads": 2, "window": 256, "key_conv": 4}),
    "mamba": ("mamba-tiny", {"d_model": 64, "n_layers": 2, "d_state": 16}),
    # the same backbone; pools of 16 notes (the 7-token needle fits), cross-layer read at layer 2
    "memmamba": (
        "memmamba-tiny",
        {"d_model": 64, "n_layers": 2, "d_state": 16, "pool_size": 16, "pool_dim": 32, "num_heads": 2,
         "cross_layer_every": 2, "pool_chunk": 8},
    ),
}
FAMILIES = task_families(TUNED)


def get_config(arg: str = "transformer"):
    c = base_config()
    c.task.name = "passkey"
    c.task.params.seq_len = 256
    c.task.params.key_len = 5
    c.task.params.depth = "uniform"
    c.task.params.depth_buckets = 5
    c.train.steps = 2000
    c.train.learning_rate = 3e-3
    return apply_family(c, FAMILIES, arg)
