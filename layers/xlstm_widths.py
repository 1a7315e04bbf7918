"""Every width the xLSTM layers round, computed exactly as PyPI ``xlstm`` 2.0.6 computes it.

One place for the layers (:mod:`mnemax.layers.xlstm_cells`, :mod:`mnemax.layers.xlstm`), the
presets and the converter (:mod:`mnemax.convert`), held to upstream's own configs and
modules over a sweep of dims, factors and rounding rules by
``tests/test_xlstm_convert.py::test_rounded_widths_equal_upstream`` (table written by
``tests/fixtures/make_xlstm_fixtures.py``).

The two layouts round differently, and the difference matters:

* NeurIPS blocks (mLSTM up-projection, sLSTM-block FFN; upstream ``UpProjConfigMixin``)::

      width = int(R(proj_factor * d / multiple) * multiple),   R = ceil ("up") or floor ("down")

* xLSTM 7B FFN (upstream ``round_up_to_next_multiple_of``)::

      width = int(((d * ffn_proj_factor + multiple - 1) // multiple) * multiple)

  For a non-integer ``x = d * ffn_proj_factor`` this is *not* ``ceil(x / multiple)``: when
  ``x`` lies less than 1 above a multiple of ``multiple`` it stays on that multiple
  (d = 48, factor 2.6667: x = 128.0016 -> 128, where ceil gives 192).

* xLSTM 7B q/k and v widths: ``int(d * qk_dim_factor)``, ``int(d * v_dim_factor)`` (truncation).

* The mLSTM layer's block-diagonal q/k/v projections have ``inner // qkv_blocksize`` blocks,
  each ``inner / blocks`` wide (upstream ``LinearHeadwiseExpand``), so ``blocks`` must divide
  ``inner``.
"""

from __future__ import annotations

import math

ROUND_MODES = ("up", "down")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def up_proj_dim(features: int, proj_factor: float, multiple: int = 64, mode: str = "up") -> int:
    """NeurIPS xLSTM up-projection width (mLSTM inner width, sLSTM-block FFN width).

    ``int(R(proj_factor * features / multiple) * multiple)`` with ``R`` = ceil for
    ``mode="up"`` (upstream ``round_proj_up_dim_up=True``) or floor for ``"down"``.
    """
    _check_positive("features", features)
    _check_positive("proj_factor", proj_factor)
    _check_positive("multiple", multiple)
    if mode not in ROUND_MODES:
        raise ValueError(f"round mode must be one of {ROUND_MODES}, got {mode!r}")
    ratio = (proj_factor * features) / multiple
    ratio = math.ceil(ratio) if mode == "up" else math.floor(ratio)
    return int(ratio * multiple)


def large_ffn_dim(features: int, ffn_proj_factor: float, multiple: int = 64) -> int:
    """xLSTM 7B FFN width: ``int(((features * ffn_proj_factor + multiple - 1) // multiple) * multiple)``."""
    _check_positive("features", features)
    _check_positive("ffn_proj_factor", ffn_proj_factor)
    _check_positive("multiple", multiple)
    x = features * ffn_proj_factor
    return int(((x + multiple - 1) // multiple) * multiple)


def large_qk_v_dims(features: int, qk_dim_factor: float, v_dim_factor: float) -> tuple[int, int]:
    """xLSTM 7B ``(qk_dim, v_dim)``: ``int(features * qk_dim_factor)``, ``int(features * v_dim_factor)``."""
    _check_positive("features", features)
    _check_positive("qk_dim_factor", qk_dim_factor)
    _check_positive("v_dim_factor", v_dim_factor)
    return int(features * qk_dim_factor), int(features * v_dim_factor)


def qkv_proj_blocks(inner: int, qkv_blocksize: int) -> int:
    """Number of blocks of the mLSTM layer's block-diagonal q/k/v projections: ``inner // qkv_blocksize``."""
    _check_positive("qkv_blocksize", qkv_blocksize)
    return inner // qkv_blocksize
