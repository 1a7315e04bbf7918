"""``delta_rule``: a matrix state written by the delta rule, with an optional decay -- the
op of DeltaNet (Schlag et al., 2021; Yang et al., 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length"), Gated DeltaNet (Yang, Kautz &
Hatamizadeh, 2024; the linear layers of Qwen3-Next) and Kimi Delta Attention (KDA,
Kimi Linear, 2025).

Per batch row and head, with ``beta_t`` the write strength and log decays ``g_t <= 0``::

    S'_t = Diag(exp g_t) S_{t-1}
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T  = (I - beta_t k_t k_t^T) S'_t + beta_t k_t v_t^T
    o_t  = S_t^T (scale q_t)                          S: (d_k, d_v)

``g=None`` is DeltaNet, one log decay per head and step is Gated DeltaNet, one per key
channel is KDA. The decay acts before the delta update (as in fla's recurrences; for a
decay per head the order does not matter). The models L2-normalise ``k`` and take ``beta
= sigmoid(.)`` in (0, 1) (or ``2 sigmoid`` in (0, 2), the negative-eigenvalue variant);
the op takes them as given.

Resets: ``resets[:, t]`` True clears the incoming state before step ``t``.

Forms (``backend=``; the table is :data:`BACKENDS`):

* ``reference`` -- ``lax.scan`` over time, the equations above (:mod:`.reference`).
* ``xla``       -- chunkwise through the WY/UT representation: one unit lower-triangular
  solve per chunk, the rest matmuls (:mod:`.xla`). The platform default everywhere until
  the Pallas kernels land.

A one-step call (``time == 1``, generation) takes the closed-form recurrent update
(:func:`.reference.one_step`) whatever the backend.

Shapes::

    o, state = delta_rule(q, k, v, beta, g=None, state=None, resets=None, scale=None, chunk_size=64)
    q, k: (batch, heads, time, d_k);  v: (batch, heads, time, d_v);  beta: (batch, heads, time)
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

__all__ = ["BACKENDS", "delta_rule", "zeros_state"]


def delta_rule(q, k, v, beta, g=None, *, state=None, resets=None, scale: float | None = None, chunk_size: int = 64,
               backend: str | None = None):
    """The delta-rule memory over a sequence; returns ``(o, state)`` (see the module
    docstring for the equations and shapes).

    Args:
      q, k: (batch, heads, time, d_k); v: (batch, heads, time, d_v).
      beta: write strengths, (batch, heads, time).
      g: log decays (<= 0): None, (batch, heads, time) or (batch, heads, time, d_k).
      state: incoming (batch, heads, d_k, d_v); None is the zero state.
      resets: (batch, time) bool; True clears the state before step t.
      scale: multiplies q; default ``d_k ** -0.5`` (fla's default).
      chunk_size: chunk length of the ``xla`` form.
      backend: ``"reference"`` or ``"xla"``; None picks by platform
        (``MNEMAX_KERNEL_BACKEND`` overrides).
    """
    q, k, v, beta, g, resets, scale = validate(q, k, v, beta, g, state, resets, chunk_size, scale)
    out_dtype = jnp.result_type(q, k, v)
    gates = (beta,) if g is None else (beta, g)
    cdt = jnp.promote_types(jnp.result_type(out_dtype, *gates), jnp.float32)
    batch, heads, time, d_k = q.shape
    state = zeros_state(batch, heads, d_k, v.shape[-1], cdt) if state is None else jnp.asarray(state, cdt)
    _, impl = BACKENDS.resolve(backend)
    if time == 1:  # generation: the closed-form step, whatever the backend
        o, state = _ONE_STEP(q, k, v, beta, g, state, resets, scale=scale)
    else:
        o, state = impl(q, k, v, beta, g, state, resets, chunk_size=chunk_size, scale=scale)
    return o.astype(out_dtype), state


_STATIC = ("chunk_size", "scale")
_ONE_STEP = jax.jit(reference.one_step, static_argnames=("scale",))

# The backends of ``delta_rule``: ``BACKENDS.available()``, ``BACKENDS.default(platform)``.
BACKENDS = dispatch.backends(OP, {
    "reference": jax.jit(reference.recurrent, static_argnames=_STATIC),
    "xla": jax.jit(xla.chunkwise, static_argnames=_STATIC),
})
