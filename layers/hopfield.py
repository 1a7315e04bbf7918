"""Modern Hopfield layers (Ramsauer et al., 2020, "Hopfield Networks is All You Need").

A modern (continuous) Hopfield network stores patterns ``X = (x_1, ..., x_N)`` and has
the energy (paper eq. 2, patterns as rows of ``X`` here)::

    E(xi) = -lse(beta, X xi) + 1/2 xi^T xi + beta^-1 log N + 1/2 M^2,
    lse(beta, z) = beta^-1 log sum_i exp(beta z_i),     M = max_i ||x_i||

whose update rule (eq. 3) is ``xi_new = X^T softmax(beta X xi)``: the concave-convex
procedure, so the energy never increases, and one step retrieves a well separated
pattern with an error exponentially small in ``beta`` (Theorem 4). Small ``beta``
gives metastable states that average over many patterns.

As a layer (eq. 10), state patterns ``R`` query stored patterns ``Y``::

    Q = R W_Q,  K = Y W_K,  V = P W_V   (P: the pattern projection input, default Y)
    Z = softmax(beta Q K^T) V,  then an output projection W_O.

(The paper writes V = Y W_K W_V; hflayers' default, and ours, projects P with its own
W_V -- its ``pattern_projection_as_connected`` option, not ported, gives the paper's form.)

:func:`hopfield_update` and :func:`hopfield_energy` are the plain functions;
:func:`associate` runs the update iteration of the layers *in the association space*
like the reference ``hflayers`` code: ``xi_0 = softmax(beta Q K^T)``, then
``xi_{n+1} = softmax(beta (xi_n K) K^T)`` (the new state patterns ``xi_n K`` are
re-associated with the same keys) until the change ``||xi_{n+1} - xi_n||`` is at most
``update_steps_eps`` or ``update_steps_max`` extra steps were made. ``0`` is the
usual one step, ``None`` iterates until converged (``lax.while_loop``: jit-able,
forward-mode only); an ``int`` limit runs a ``lax.scan`` that is jit-able and
differentiable (converged rows are frozen with ``where``).

Differences from ``hflayers`` (ml-jku/hopfield-layers), all deliberate:

* the stopping test is per query row (per batch element, head and state pattern)
  instead of the Frobenius norm over all queries maximised over the batch, so that
  results do not depend on how a batch is composed; with an int limit and a tiny eps
  both agree;
* masks follow the flax convention, True = may associate (hflayers: True = ignore);
  a query whose stored patterns are all masked gets a zero association (hflayers: NaN);
* arguments come query first (``state_pattern, stored_pattern, pattern_projection``,
  like flax attention), not as hflayers' ``(stored, state, projection)`` tuple;
* batch first always; ``concat_bias_pattern``, ``add_zero_association``,
  ``pattern_projection_as_connected`` and ``association_activation`` are not ported.

Defaults follow hflayers: projections and the output projection ~ N(0, 0.02) with
zero biases, LayerNorm (eps 1e-5, affine) of stored, state and projected patterns on,
Hopfield-space normalisation off, ``scaling = 1/sqrt(hidden_size)`` (1.0 when every
pattern is static and nothing is projected).

Shapes (set-based layers; they do not follow the sequence contract, see DESIGN.md)::

    Hopfield()(R, Y=None, P=None)    R: (batch, L, d_R)  Y: (batch, S, d_Y)  P: (batch, S, d_P)
                                    -> (batch, L, output_size)     [Y defaults to R, P to Y]
    HopfieldPooling(quantity=Q)(Y, P=None) -> (batch, Q * output_size)
    HopfieldLayer(quantity=N)(R)           -> (batch, L, output_size)
    masks: stored_pattern_mask (batch, S) bool; association_mask broadcastable to
           (batch, num_heads, L, S) bool.

The causal sequence mixer :class:`~mnemax.layers.causal_hopfield.CausalHopfield`
(re-exported here) follows the layer contract.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .base import Dtype, compute_dtype, partitioned
from .norms import layer_norm

# ----------------------------------------------------------------------------- functions


def hopfield_energy(xi, X, beta):
    """Energy of state pattern(s) ``xi`` (..., d) for stored patterns ``X`` (..., N, d).

    ``E = -lse(beta, X xi) + 1/2 xi.xi + log(N)/beta + 1/2 max_i ||x_i||^2``; leading
    dimensions broadcast. Returns (...,).
    """
    xi, X = jnp.asarray(xi), jnp.asarray(X)
    if X.ndim < 2 or xi.shape[-1] != X.shape[-1]:
        raise ValueError(f"X must have shape (..., N, {xi.shape[-1]}), got shape {X.shape}")
    n = X.shape[-2]
    z = jnp.einsum("...d,...nd->...n", xi, X)
    lse = jax.nn.logsumexp(beta * z, axis=-1) / beta
    big_m = jnp.max(jnp.sum(X * X, axis=-1), axis=-1)
    return -lse + 0.5 * jnp.sum(xi * xi, axis=-1) + jnp.log(n) / beta + 0.5 * big_m


def hopfield_update(xi, X, beta):
    """One Hopfield update ``xi_new = X^T softmax(beta X xi)``.

    ``xi``: (..., d) state pattern(s); ``X``: (..., N, d) stored patterns (rows); leading
    dimensions broadcast. Returns (..., d).
    """
    xi, X = jnp.asarray(xi), jnp.asarray(X)
    if X.ndim < 2 or xi.shape[-1] != X.shape[-1]:
        raise ValueError(f"X must have shape (..., N, {xi.shape[-1]}), got shape {X.shape}")
    p = jax.nn.softmax(beta * jnp.einsum("...d,...nd->...n", xi, X), axis=-1)
    return jnp.einsum("...n,...nd->...d", p, X)


def associate(q, k, beta, mask=None, update_steps_max: int | None = 0, update_steps_eps: float = 1e-4):
    """The association matrix after the Hopfield iteration in the association space.

    Args:
      q: (..., L, D) state patterns (projected queries).
      k: (..., S, D) stored patterns (projected keys).
      beta: scaling, broadcastable to (..., L, S) (e.g. per head (H, 1, 1)).
      mask: bool broadcastable to (..., L, S), True = may associate; None = all.
      update_steps_max: extra update steps after the first (0: one step; None: until
        converged, via ``lax.while_loop``).
      update_steps_eps: a row stops once its association changes by at most this (L2).

    Returns:
      xi: (..., L, S), rows sum to 1 (0 for rows with no valid stored pattern).
    """
    if update_steps_max is not None and update_steps_max < 0:
        raise ValueError(f"update_steps_max must be >= 0 or None, got {update_steps_max}")
    if not update_steps_eps > 0:
        raise ValueError(f"update_steps_eps must be > 0, got {update_steps_eps}")
    neg = jnp.finfo(q.dtype).min

    def softmax_of(state):
        logits = beta * jnp.einsum("...ld,...sd->...ls", state, k)
        if mask is not None:
            logits = jnp.where(mask, logits, neg)
        return jax.nn.softmax(logits, axis=-1)

    xi = softmax_of(q)
    if update_steps_max != 0:
        active = jnp.ones(xi.shape[:-1], bool)

        def step(carry):
            xi, active = carry
            new = softmax_of(jnp.einsum("...ls,...sd->...ld", xi, k))
            new = jnp.where(active[..., None], new, xi)
            changed = jnp.sqrt(jnp.sum(jnp.square(new - xi), axis=-1)) > update_steps_eps
            return new, active & changed

        if update_steps_max is None:
            xi, _ = jax.lax.while_loop(lambda c: jnp.any(c[1]), step, (xi, active))
        else:
            (xi, _), _ = jax.lax.scan(lambda c, _: (step(c), None), (xi, active), None, length=update_steps_max)
    if mask is not None:
        xi = jnp.where(jnp.any(mask, axis=-1, keepdims=True), xi, 0)
    return xi


def _check3(x, name, batch=None, length=None):
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"{name} must have shape (batch, length, features), got shape {shape}")
    if batch is not None and shape[0] != batch:
        raise ValueError(f"{name} must have batch size {batch} (that of the state pattern), got shape {shape}")
    if length is not None and shape[1] != length:
        raise ValueError(f"{name} must have {length} patterns (as many as stored_pattern), got shape {shape}")


def default_scaling(head_dim: int, all_static: bool):
    """hflayers' default beta: 1/sqrt(head_dim), or 1.0 for a fully static association."""
    return 1.0 if all_static else 1.0 / head_dim**0.5


# ----------------------------------------------------------------------------- layers


class PatternOps:
    """Helpers shared by the set layers and :class:`CausalHopfield` (a mixin: it reads
    ``num_heads``, ``hidden_size``, ``scaling``, ``norm_eps``, ``use_bias``,
    ``param_dtype`` and ``kernel_init`` from the module)."""

    def _head_dim(self, state_width: int, state_static: bool = False) -> int:
        if self.hidden_size is not None:
            return self.hidden_size
        if state_static:
            return state_width
        if state_width % self.num_heads:
            raise ValueError(
                f"the state pattern width ({state_width}) must be divisible by num_heads "
                f"({self.num_heads}) unless hidden_size is given"
            )
        return state_width // self.num_heads

    def _beta(self, head_dim: int, dt, all_static: bool = False, trailing: int = 2):
        """beta as a scalar, or per head shaped (heads, 1, ..., 1) with ``trailing`` ones."""
        if self.scaling is None:
            return jnp.asarray(default_scaling(head_dim, all_static), dt)
        beta = jnp.asarray(self.scaling, dt)
        if beta.ndim == 1:
            if beta.shape[0] != self.num_heads:
                raise ValueError(f"scaling must be a float or one value per head ({self.num_heads}), got {self.scaling}")
            beta = beta.reshape((self.num_heads,) + (1,) * trailing)
        return beta

    def _norm(self, xs, name: str, affine: bool, names=("embed",)):
        """LayerNorm of ``xs`` (an array, or a tuple of arrays sharing one affine map)."""
        single = not isinstance(xs, tuple)
        xs = (xs,) if single else xs
        scale = bias = None
        if affine:
            d = xs[0].shape[-1]
            scale = self.param(f"{name}_scale", partitioned(nn.initializers.ones, names), (d,), self.param_dtype)
            bias = self.param(f"{name}_bias", partitioned(nn.initializers.zeros, names), (d,), self.param_dtype)
        out = tuple(layer_norm(x, scale, bias, self.norm_eps).astype(x.dtype) for x in xs)
        return out[0] if single else out

    def _project(self, x, static: bool, width: int, name: str, dt):
        """(..., d) -> (..., heads, width): a projection per head, or the input repeated
        over heads when static."""
        if static:
            if x.shape[-1] != width:
                raise ValueError(
                    f"a static {name} pattern must have width {width} (the per-head size), got shape {x.shape}"
                )
            return jnp.broadcast_to(x[..., None, :], x.shape[:-1] + (self.num_heads, width)).astype(dt)
        return nn.DenseGeneral(
            (self.num_heads, width),
            use_bias=self.use_bias,
            dtype=dt,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(self.kernel_init, ("embed", "heads", "head_dim")),
            bias_init=partitioned(nn.initializers.zeros, ("heads", "head_dim")),
            name=f"{name}_proj",
        )(x)

    def _out_projection(self, out, features: int, dt, n_axes: int = 2):
        names = (None,) * (n_axes - 2) + ("heads", "head_dim", "embed")
        return nn.DenseGeneral(
            features,
            axis=tuple(range(-n_axes, 0)),
            use_bias=self.use_bias,
            dtype=dt,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(self.kernel_init, names),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="out_proj",
        )(out)


class Hopfield(PatternOps, nn.Module):
    """Hopfield association of state patterns with stored patterns (module docstring).

    Attributes:
      num_heads: parallel association heads.
      hidden_size: association-space width per head (default: state width // heads,
        or the state width when state patterns are static).
      pattern_size: width per head of the projected patterns (default hidden_size).
      output_size: width of the output projection (default: the state pattern width).
      scaling: beta; a float or one per head (default 1/sqrt(hidden_size)).
      update_steps_max / update_steps_eps: the iteration (module docstring).
      normalize_*: LayerNorm of the stored / state / projected input patterns and of the
        projected queries and keys in the association space ("hopfield space"); the
        ``*_affine`` flags add a learned scale and bias.
      *_as_static: use that input as it is in every head (no projection); its width
        must then be hidden_size (stored, state) or pattern_size (projection).
      disable_out_projection: return the concatenated heads (heads * pattern_size).
      use_bias: biases of the input and output projections.
      dropout: dropout rate on the association matrix (needs the 'dropout' rng when
        ``deterministic`` is False).
    """

    num_heads: int = 1
    hidden_size: int | None = None
    pattern_size: int | None = None
    output_size: int | None = None
    scaling: float | Sequence[float] | None = None
    update_steps_max: int | None = 0
    update_steps_eps: float = 1e-4
    normalize_stored_pattern: bool = True
    normalize_stored_pattern_affine: bool = True
    normalize_state_pattern: bool = True
    normalize_state_pattern_affine: bool = True
    normalize_pattern_projection: bool = True
    normalize_pattern_projection_affine: bool = True
    normalize_hopfield_space: bool = False
    normalize_hopfield_space_affine: bool = False
    norm_eps: float = 1e-5
    stored_pattern_as_static: bool = False
    state_pattern_as_static: bool = False
    pattern_projection_as_static: bool = False
    disable_out_projection: bool = False
    use_bias: bool = True
    dropout: float = 0.0
    deterministic: bool | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

    # -- helpers shared by the three set layers -------------------------------------------

    def _all_static(self) -> bool:
        return (
            self.stored_pattern_as_static
            and self.state_pattern_as_static
            and self.pattern_projection_as_static
            and self.disable_out_projection
            and not self.normalize_hopfield_space
        )

    def _associate_patterns(
        self, state, stored, projection, stored_pattern_mask, association_mask, deterministic, return_associations
    ):
        """The shared body: normalise, project, iterate, read out. All inputs 3-D."""
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        batch, length, d_state = state.shape
        n_stored = stored.shape[1]
        dt = compute_dtype(self.dtype, state, stored, projection)
        if self.normalize_stored_pattern:
            stored = self._norm(stored, "norm_stored", self.normalize_stored_pattern_affine)
        if self.normalize_state_pattern:
            state = self._norm(state, "norm_state", self.normalize_state_pattern_affine)
        if self.normalize_pattern_projection:
            projection = self._norm(projection, "norm_projection", self.normalize_pattern_projection_affine)
        hd = self._head_dim(d_state, self.state_pattern_as_static)
        pd = self.pattern_size or hd
        q = self._project(state, self.state_pattern_as_static, hd, "state", dt)
        k = self._project(stored, self.stored_pattern_as_static, hd, "stored", dt)
        v = self._project(projection, self.pattern_projection_as_static, pd, "projection", dt)
        if self.normalize_hopfield_space:
            q, k = self._norm((q, k), "norm_hopfield", self.normalize_hopfield_space_affine, ("head_dim",))
        mask = None
        if stored_pattern_mask is not None:
            if getattr(stored_pattern_mask, "shape", None) != (batch, n_stored):
                raise ValueError(
                    f"stored_pattern_mask must have shape (batch, S) = {(batch, n_stored)}, "
                    f"got shape {getattr(stored_pattern_mask, 'shape', None)}"
                )
            mask = jnp.asarray(stored_pattern_mask, bool)[:, None, None, :]
        if association_mask is not None:
            am = jnp.asarray(association_mask, bool)
            try:
                jnp.broadcast_shapes(am.shape, (batch, self.num_heads, length, n_stored))
            except ValueError:
                raise ValueError(
                    f"association_mask must broadcast to (batch, heads, L, S) = "
                    f"{(batch, self.num_heads, length, n_stored)}, got shape {am.shape}"
                ) from None
            mask = am if mask is None else mask & am
        qh, kh, vh = (jnp.moveaxis(a, 2, 1) for a in (q, k, v))  # (batch, heads, n, width)
        xi = associate(qh, kh, self._beta(hd, dt, self._all_static()), mask, self.update_steps_max, self.update_steps_eps)
        if self.dropout > 0.0 and not nn.merge_param("deterministic", self.deterministic, deterministic):
            xi_drop = nn.Dropout(rate=self.dropout, deterministic=False, name="dropout")(xi)
        else:
            xi_drop = xi
        out = jnp.einsum("bhls,bhsd->blhd", xi_drop, vh)
        if self.disable_out_projection:
            out = out.reshape(batch, length, self.num_heads * pd)
        else:
            out = self._out_projection(out, self.output_size or d_state, dt)
        return (out, xi) if return_associations else out

    @nn.compact
    def __call__(
        self,
        state_pattern,
        stored_pattern=None,
        pattern_projection=None,
        *,
        stored_pattern_mask=None,
        association_mask=None,
        deterministic: bool | None = None,
        return_associations: bool = False,
    ):
        """Associates ``state_pattern`` (batch, L, d_R) with ``stored_pattern`` (batch, S,
        d_Y; default: the state patterns) and reads out ``pattern_projection`` (batch, S,
        d_P; default: the stored patterns). Returns (batch, L, output_size), and the
        association matrix (batch, heads, L, S) when ``return_associations``."""
        _check3(state_pattern, "state_pattern")
        stored = state_pattern if stored_pattern is None else stored_pattern
        _check3(stored, "stored_pattern", batch=state_pattern.shape[0])
        projection = stored if pattern_projection is None else pattern_projection
        _check3(projection, "pattern_projection", batch=state_pattern.shape[0], length=stored.shape[1])
        return self._associate_patterns(
            state_pattern, stored, projection, stored_pattern_mask, association_mask, deterministic, return_associations
        )


class HopfieldPooling(Hopfield):
    """Hopfield pooling: ``quantity`` learned state patterns (N(0, 0.02), hflayers' init)
    query the input set. ``__call__(stored_pattern, pattern_projection=None)`` with
    stored (batch, S, d) returns (batch, quantity * output_size) (flattened like
    hflayers; ``output_size`` defaults to ``state_size``). ``state_size`` is the width of
    the learned state patterns (default: the stored width; hidden_size when static).
    ``trainable=False`` stops their gradient."""

    quantity: int = 1
    state_size: int | None = None
    trainable: bool = True

    @nn.compact
    def __call__(
        self,
        stored_pattern,
        pattern_projection=None,
        *,
        stored_pattern_mask=None,
        association_mask=None,
        deterministic: bool | None = None,
        return_associations: bool = False,
    ):
        _check3(stored_pattern, "stored_pattern")
        projection = stored_pattern if pattern_projection is None else pattern_projection
        _check3(projection, "pattern_projection", batch=stored_pattern.shape[0], length=stored_pattern.shape[1])
        if self.quantity < 1:
            raise ValueError(f"quantity must be >= 1, got {self.quantity}")
        width = self.state_size or (
            self.hidden_size if (self.state_pattern_as_static and self.hidden_size) else stored_pattern.shape[-1]
        )
        queries = self.param(
            "pooling_weights",
            partitioned(nn.initializers.normal(0.02), (None, "embed")),
            (self.quantity, width),
            self.param_dtype,
        )
        if not self.trainable:
            queries = jax.lax.stop_gradient(queries)
        batch = stored_pattern.shape[0]
        state = jnp.broadcast_to(queries[None], (batch,) + queries.shape).astype(
            compute_dtype(self.dtype, stored_pattern)
        )
        result = self._associate_patterns(
            state, stored_pattern, projection, stored_pattern_mask, association_mask, deterministic, return_associations
        )
        out, xi = result if return_associations else (result, None)
        out = out.reshape(batch, -1)
        return (out, xi) if return_associations else out


class HopfieldLayer(Hopfield):
    """Hopfield lookup layer: ``quantity`` learned stored patterns (and, with
    ``lookup_weights_as_separated``, separate learned targets as pattern projections)
    form a lookup table queried by the input. ``__call__(state_pattern)`` with
    (batch, L, d) returns (batch, L, output_size). ``stored_size``/``target_size`` are the
    widths of the learned patterns (default: d; hidden_size/pattern_size when static);
    ``trainable`` / ``lookup_targets_as_trainable`` False stop their gradients."""

    quantity: int = 1
    stored_size: int | None = None
    target_size: int | None = None
    lookup_weights_as_separated: bool = False
    trainable: bool = True
    lookup_targets_as_trainable: bool = True

    @nn.compact
    def __call__(
        self,
        state_pattern,
        *,
        stored_pattern_mask=None,
        association_mask=None,
        deterministic: bool | None = None,
        return_associations: bool = False,
    ):
        _check3(state_pattern, "state_pattern")
        if self.quantity < 1:
            raise ValueError(f"quantity must be >= 1, got {self.quantity}")
        batch, _, d = state_pattern.shape
        hd = self._head_dim(d, self.state_pattern_as_static)
        width = self.stored_size or (hd if self.stored_pattern_as_static else d)
        init = partitioned(nn.initializers.normal(0.02), (None, "embed"))
        lookup = self.param("lookup_weights", init, (self.quantity, width), self.param_dtype)
        if not self.trainable:
            lookup = jax.lax.stop_gradient(lookup)
        targets = lookup
        if self.lookup_weights_as_separated:
            t_width = self.target_size or ((self.pattern_size or hd) if self.pattern_projection_as_static else width)
            targets = self.param("target_weights", init, (self.quantity, t_width), self.param_dtype)
            if not self.lookup_targets_as_trainable:
                targets = jax.lax.stop_gradient(targets)
        dt = compute_dtype(self.dtype, state_pattern)
        stored = jnp.broadcast_to(lookup[None], (batch,) + lookup.shape).astype(dt)
        projection = jnp.broadcast_to(targets[None], (batch,) + targets.shape).astype(dt)
        return self._associate_patterns(
            state_pattern, stored, projection, stored_pattern_mask, association_mask, deterministic, return_associations
        )


__all__ = [
    "Hopfield",
    "HopfieldLayer",
    "HopfieldPooling",
    "associate",
    "hopfield_energy",
    "hopfield_update",
]
