"""``gated_linear_attention``: linear attention with a decaying matrix state, the op of
GLA (Yang et al., 2023, "Gated Linear Attention Transformers with Hardware-Efficient
Training"), RetNet (Sun et al., 2023), Lightning attention (Qin et al., 2024) and
Mamba-2's SSD (Dao & Gu, 2024, "Transformers are SSMs").

Per batch row and head, with log decays ``g_t <= 0``::

    S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T        S: (d_k, d_v)
    o_t = S_t^T (scale q_t)

``g`` is one log decay per head and step (RetNet's fixed ``log gamma_h``, Lightning's,
Mamba-2's ``dt_t A_h``), one per key channel (GLA's ``log sigmoid(...)`` gate), or None
(plain linear attention, no decay). Mamba-2 maps to ``q = C``, ``k = dt B``, ``v = x``,
``scale = 1``.

Resets: ``resets[:, t]`` True clears the incoming state before step ``t``, so the state
after a reset is exactly that of a sequence started there.

Forms (``backend=``; the table is :data:`BACKENDS`):

* ``reference`` -- ``lax.scan`` over time, the equations above (:mod:`.reference`).
* ``xla``       -- chunkwise (:mod:`.xla`): intra-chunk decay-masked matmuls in log
  space, states carried across chunks; memory O(time * chunk_size) per head. The
  platform default everywhere until the Pallas kernels land.

A one-step call (``time == 1``, generation) takes the closed-form recurrent update
(:func:`.reference.one_step`) whatever the backend.

Shapes::

    o, state = gated_linear_attention(q, k, v, g, state=None, resets=None, scale=None, chunk_size=64)
    q, k: (batch, heads, time, d_k);  v: (batch, heads, time, d_v)
    g: None, (batch, heads, time) or (batch, heads, time, d_k) log decays (<= 0)
    resets: (batch, time) bool
    o: (batch, heads, time, d_v) in the dtype of q, k, v
    state: (batch, heads, d_k, d_v), float32 (float64 for float64 inputs)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import dispatch
from . import reference, xla
from .common import OP, validate, zeros_state

__all__ = ["BACKENDS", "gated_linear_attention", "zeros_state"]


def gated_linear_attention(q, k, v, g=None, *, state=None, resets=None, scale: float | None = None,
                           chunk_size: int = 64, backend: str | None = None):
    """The decayed linear attention over a sequence; returns ``(o, state)`` (see the
    module docstring for the equations and shapes).

    Args:
      q, k: (batch, heads, time, d_k); v: (batch, heads, time, d_v).
      g: log decays (<= 0): None, (batch, heads, time) or (batch, heads, time, d_k).
      state: incoming (batch, heads, d_k, d_v); None is the zero state.
      resets: (batch, time) bool; True clears the state before step t.
      scale: multiplies q; default ``d_k ** -0.5`` (fla's default; Mamba-2 uses 1).
      chunk_size: chunk length of the ``xla`` form.
      backend: ``"reference"`` or ``"xla"``; None picks by platform
        (``MNEMAX_KERNEL_BACKEND`` overrides).
    """
    q, k, v, g, resets, scale = validate(q, k, v, g, state, resets, chunk_size, scale)
    out_dtype = jnp.result_type(q, k, v)
    cdt = jnp.promote_types(out_dtype if g is None else jnp.result_type(out_dtype, g), jnp.float32)
    batch, heads, time, d_k = q.shape
    state = zeros_state(batch, heads, d_k, v.shape[-1], cdt) if state is None else jnp.asarray(state, cdt)
    _, impl = BACKENDS.resolve(backend)
    if time == 1:  # generation: the closed-form step, whatever the backend
        o, state = _ONE_STEP(q, k, v, g, state, resets, scale=scale)
    else:
        o, state = impl(q, k, v, g, state, resets, chunk_size=chunk_size, scale=scale)
    return o.astype(out_dtype), state


_STATIC = ("chunk_size", "scale")
_ONE_STEP = jax.jit(reference.one_step, static_argnames=("scale",))

# The backends of ``gated_linear_attention``: ``BACKENDS.available()``, ``BACKENDS.default(platform)``.
BACKENDS = dispatch.backends(OP, {
    "reference": jax.jit(reference.recurrent, static_argnames=_STATIC),
    "xla": jax.jit(xla.chunkwise, static_argnames=_STATIC),
})
