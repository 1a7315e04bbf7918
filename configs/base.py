"""The defaults every experiment config starts from (``ml_collections``).

Sections: ``model`` (a registered preset plus overrides of any config field or block
option: :func:`apply_family` lists every one of them in ``model.overrides``), ``task`` (a memory task, its parameters and dataset size), ``train``,
``eval``, ``mesh`` (data / fsdp / tensor sizes, -1 = the rest), ``checkpoint``,
``log`` and ``release``. Any field can be overridden on the command line, e.g.
``--config.train.steps=100 --config.mesh.fsdp=2``.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.preset = "transformer-tiny"
    c.model.overrides = ml_collections.ConfigDict()

    c.task = ml_collections.ConfigDict()
    c.task.name = "mqar"
    c.task.params = ml_collections.ConfigDict()
    c.task.num_train = 20000
    c.task.num_test = 1000
    c.task.seed = 0
    c.task.data_dir = ""  # empty: $MNEMAX_DATA_DIR or ~/mnemax_datasets

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 64
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100
    c.train.schedule = "cosine"
    c.train.weight_decay = 0.1
    # False: decay weight matrices only, as the references do (mnemax.layers.weight_decay_mask);
    # True: every parameter of rank >= 2, including the state-space dynamics (A_log, ...)
    c.train.decay_dynamics = False
    c.train.grad_clip = 1.0
    c.train.b1 = 0.9
    c.train.b2 = 0.98
    # a step whose loss, gradients or updates are not finite is skipped (the parameters and
    # optimizer state stay as they were) and counted; past this many the run stops with an error
    c.train.max_nonfinite_steps = 10

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 200
    c.eval.batch_size = 256
    c.eval.num_examples = -1  # -1: the whole test split

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.num_devices = -1  # -1: every device

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 3
    c.checkpoint.use_async = True
    # no checkpoint passes its content check: stop with an error (False) or train from step 0 (True)
    c.checkpoint.restart_if_corrupt = False
    # resuming under a config whose model, task, train or seed fields differ from the checkpoint's
    # is an error unless each differing field is named here, comma-separated ("train.steps,train.learning_rate";
    # a section name allows all of its fields)
    c.checkpoint.allow_changes = ""

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 50
    c.log.progress_bar = True
    c.log.tensorboard = True
    c.log.console = True

    c.release = ml_collections.ConfigDict()
    c.release.write = True
    return c


# ModelConfig fields a task sets (trainer.model_config): not offered as overrides.
TASK_SET_FIELDS = frozenset({"family", "block", "preset", "vocab_size", "input_dim", "head", "num_classes",
                             "output_dim", "tie_embeddings"})


def overridable_fields(preset: str) -> dict:
    """Every model field the command line may change for ``preset``, at the preset's values:
    the ``ModelConfig`` fields the task does not set, and every block option of the preset's
    family (the fields of its typed block config, ``mnemax.get_family(f).config``)."""
    import dataclasses

    import mnemax

    cfg = mnemax.get_config(preset)
    top = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in TASK_SET_FIELDS}
    block = dict(cfg.block)
    # a block option named like a ModelConfig field (mamba's norm_eps) is reached as the
    # top-level field, as mnemax.get_config(preset, norm_eps=...) does
    return {**block, **top}


def task_families(tuned: dict) -> dict:
    """The families a task config offers, ``{arg: (preset, overrides)}``: every registered
    family (``mnemax.list_families()``) at its tiny preset (``mnemax.tiny_preset``) with no
    overrides, and the task's own table ``tuned`` on top (a family's line sized for the
    task, or a variant under another name, e.g. ``transformer-vanilla``). A line named
    after a family must use a preset of that family (ValueError naming it)."""
    import mnemax

    out = {family: (mnemax.tiny_preset(family), {}) for family in mnemax.list_families()}
    for arg, (preset, overrides) in tuned.items():
        family = mnemax.get_config(preset).family  # ValueError for an unknown preset
        if arg in out and family != arg:
            raise ValueError(f"task config line {arg!r}: preset {preset!r} is of family {family!r}, not {arg!r}")
        out[arg] = (preset, dict(overrides))
    return out


def apply_family(config: ml_collections.ConfigDict, families: dict, arg: str) -> ml_collections.ConfigDict:
    """Sets ``config.model`` from a per-family table ``{arg: (preset, overrides)}``.

    ``config.model.overrides`` holds every overridable field of the preset
    (:func:`overridable_fields`) with the table's overrides on top, so any of them can be
    changed on the command line (``--config.model.overrides.mlp_ratio=2.0``)."""
    if arg not in families:
        raise ValueError(f"config argument: unknown family {arg!r}; this config has {sorted(families)}")
    preset, overrides = families[arg]
    config.model.preset = preset
    # typed `object`: a command-line value is parsed as a Python literal whatever the default's
    # type (dt_rank "auto" -> 3, backend None -> "xla", slstm_at (1,) -> "all")
    fields = {**overridable_fields(preset), **overrides}
    config.model.overrides = ml_collections.ConfigDict(
        {k: config_dict.FieldReference(v, field_type=object) for k, v in fields.items()}
    )
    return config
