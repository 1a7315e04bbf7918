"""MQAR (multi-query associative recall): ``--config=configs/mqar.py:<family>``.

The default (``transformer``) trains a 2-layer Transformer whose keys pass a short
causal conv (``key_conv=4``: one attention layer can then bind each value to the key
before it) to >= 90% held-out recall of 16 key-value pairs on a 2-core CPU in a few
minutes; ``transformer-vanilla`` is the plain Transformer, which must first learn a
previous-token head and needs far more steps. Every registered family is offered
(``FAMILIES``, from the registry); ``TUNED`` sizes some of them for this task.
"""

from mnemax.configs.base import apply_family, base_config, task_families

# family (or a variant) -> (preset, overrides sized for this task); every other registered
# family runs at its tiny preset (configs.base.task_families)
TUNED = {
    "transformer": ("transformer-tiny", {"d_model": 64, "n_layers": 2, "num_heads": 2, "window": 128, "key_conv": 4}),
    "transformer-vanilla": ("transformer-tiny", {"d_model": 64, "n_layers": 2, "num_heads": 2, "window": 128}),
    "mamba": ("mamba-tiny", {"d_model": 64, "n_layers": 2, "d_state": 16}),
    "lssl": ("lssl-tiny", {"d_model": 64, "n_layers": 2, "state_size": 32, "channels": 2}),
    "s4d": ("s4d-tiny", {"d_model": 64, "n_layers": 2, "state_size": 32}),
    "xlstm": ("xlstm-tiny", {"d_model": 64, "num_heads": 2}),
    "mlstm": ("mlstm-tiny", {"d_model": 64, "num_heads": 2}),
    "slstm": ("slstm-tiny", {"d_model": 64}),
    "hopfield": ("hopfield-tiny", {"d_model": 64, "memory_size": 128}),
    "hcam": ("hcam-tiny", {"d_model": 64, "chunk_size": 8, "num_chunks": 16, "top_k": 4}),
    # the same backbone; pools of 32 notes (room for the 16 key-value pairs), cross-layer read at layer 2
    "memmamba": (
        "memmamba-tiny",
        {"d_model": 64, "n_layers": 2, "d_state": 16, "pool_size": 32, "pool_dim": 32, "num_heads": 2,
         "cross_layer_every": 2, "pool_chunk": 8},
    ),
}
FAMILIES = task_families(TUNED)


def get_config(arg: str = "transformer"):
    c = base_config()
    c.task.name = "mqar"
    c.task.params.seq_len = 128
    c.task.params.num_pairs = 16
    c.task.params.vocab_size = 128
    c.task.num_train = 20000
    c.task.num_test = 1000
    c.train.steps = 600
    c.train.batch_size = 64
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 50
    c.eval.every_steps = 200
    c.checkpoint.every_steps = 200
    return apply_family(c, FAMILIES, arg)
