"""The Expressive Leaky Memory (ELM) neuron and Branch-ELM (Spieler et al., 2023, "The
ELM Neuron: an Efficient and Expressive Cortical Neuron Model Can Solve Long-Horizon
Tasks"; reference code AaronSpieler/elmneuron).

Inputs ``x_t`` (num_input channels, e.g. spikes) are routed to ``d_tree * d_brch``
synapses (identity, random or structured routing), weighted by ``w_s >= 0`` (a ReLU of
the stored parameter, init 0.5) and summed per branch. With ``kappa = exp(-dt / tau)``:

v1 (``expressive_leaky_memory_neuron.py``): synaptic traces, then branch sums::

    s_t  = kappa_s * s_{t-1} + w_s * x_t                      (per synapse, tau_s = 5)
    dm_t = phi(MLP([branch_sums(s_t), kappa_m * m_{t-1}]))
    m_t  = kappa_m * m_{t-1} + lambda (1 - kappa_m) * dm_t    (lambda = 5)
    y_t  = W_y m_t + b_y

v2 (``expressive_leaky_memory_neuron_v2.py``): per-branch traces of the branch sums, and
the step size scaled through the time constant::

    b_t  = kappa_b * b_{t-1} + branch_sums(w_s * x_t)         (per branch, tau_b = 5)
    dm_t = phi(MLP([b_t, kappa_m * m_{t-1}]))
    m_t  = kappa_m * m_{t-1} + (1 - kappa_lambda) * dm_t,     kappa_lambda = exp(-dt lambda / tau_m)

``phi(z) = 1.7159 tanh(2 z / 3)`` (LeCun's tanh); the MLP has ``mlp_num_layers`` hidden
layers of ``2 d_m`` units (ReLU) and a linear output of ``d_m``. ``tau_m`` is
sigmoid-bounded, ``tau_m = tau_min + (tau_max - tau_min) sigmoid(theta)``, with
``theta`` initialised so that ``tau_m`` is log-spaced over [tau_min, tau_max] (learned
only with ``learn_memory_tau``; otherwise a constant, as in the reference, where it is
a parameter with ``requires_grad=False``). ``tau_s``/``tau_b`` are fixed. Linear layers
use PyTorch's default init U(+-1/sqrt(fan_in)) as the reference does.

Routing (Branch-ELM): ``"random"`` draws each synapse's input channel uniformly (with
replacement; numpy seed ``routing_seed``); ``"structured"`` is the reference's NeuronIO
routing: inputs interlocked (i -> (i mod 2) * (n // 2) + i // 2, alternating the two
halves, excitatory and inhibitory there), then branch j takes the d_brch consecutive
interlocked inputs starting at j * ceil(n / d_tree) (windows overlap; positions past
the end are masked). ``None`` needs d_tree * d_brch == num_input and groups consecutive
inputs.

The traces are linear and run on :func:`mnemax.kernels.linear_scan`; the memory
recurrence is nonlinear and runs as one ``lax.scan`` (the input half of the MLP's first
layer is applied to all steps before the scan).

Precision: whatever the compute ``dtype``, the synaptic (v1) or branch (v2) traces
(``w_s``, the inputs routed to the synapses, ``kappa_s``/``kappa_b``), every decay
(``kappa_m``, ``kappa_lambda``) and step size (``lambda (1 - kappa_m)``, ``1 -
kappa_lambda``, both through ``expm1``), ``phi`` and the memory recurrence with its carry
``m`` are float32 (float64 when ``dtype`` is): in bf16, ``exp(-1 / 1000)`` rounds to 1.0
and the slowest memory units would never move. The MLP's matmuls and hidden activations
and the ``W_y`` readout run in ``dtype``: the MLP's inputs (branch sums, ``kappa_m
m_{t-1}``) are cast down to it and its output is promoted to float32 before ``phi``; the
scan holds the MLP's weights in float32 and casts them in each step, so their gradients
are summed over time in float32. ``y`` is returned in ``dtype``; the state is float32.

The reference README's parameter counts (4601, 5852, 8002, 54002 for d_m = 1, 10, 20,
100) are of its NeuronIO setup: 1278 inputs, d_tree = 45 branches of d_brch = 100
synapses (so n_syn = 4500, not 1278), 2 outputs, tau_m in [1, 150] not learned. They
count trainable parameters only, ``n_syn + (d_tree + d_m) 2 d_m + 2 d_m + 2 d_m^2 + d_m
+ 2 d_m + 2``, which is what this module's params give (tau_m is a constant unless
learned).

Shapes::

    y, state = ELMNeuron(num_input=I, num_output=O, num_memory=d_m)(x, state, resets)
    x: (batch, time, I);  y: (batch, time, O)
    state: ELMState(traces=(batch, n_syn) for v1 / (batch, d_tree) for v2, memory=(batch, d_m)), float32

Logical axis names: 'synapse' (w_s), 'memory' (d_m), 'mlp' (hidden units).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mnemax.kernels import linear_scan
from mnemax.kernels.linear_scan import LinearScanConfig
from mnemax.kernels.sharding import KernelSharding

from .base import Dtype, begin_call, check_sequence, compute_dtype, partitioned, state_dtype
from .conv import torch_conv_init
from .norms import make_norm

ROUTINGS = (None, "random", "structured")
ACTIVATIONS = {"relu": jax.nn.relu, "silu": jax.nn.silu, "gelu": jax.nn.gelu, "tanh": jnp.tanh}


class ELMState(NamedTuple):
    traces: jax.Array  # (batch, n_syn) synaptic traces (v1) or (batch, d_tree) branch traces (v2)
    memory: jax.Array  # (batch, d_m)


def lecun_tanh(x):
    """phi(x) = 1.7159 tanh(2x/3)."""
    return 1.7159 * jnp.tanh(x * (2.0 / 3.0))


def scaled_sigmoid(x, lower: float, upper: float):
    return (upper - lower) * jax.nn.sigmoid(x) + lower


def inverse_scaled_sigmoid(y, lower: float, upper: float):
    y = np.clip(y, lower + 1e-6, upper - 1e-6)
    return np.log((y - lower) / (upper - y))


def interlocking_indices(num_input: int) -> np.ndarray:
    """i -> (i mod 2) * (n // 2) + i // 2: alternates the first and second half."""
    i = np.arange(num_input)
    return (i % 2) * (num_input // 2) + i // 2


def overlapping_window_indices(num_input: int, num_windows: int, per_window: int):
    """Window j covers j * ceil(n / num_windows) + (0 .. per_window - 1); returns the
    flattened indices (clipped to n - 1) and their validity (< n)."""
    stride = math.ceil(num_input / num_windows)
    idx = np.arange(num_windows)[:, None] * stride + np.arange(per_window)[None, :]
    valid = idx < num_input
    return np.minimum(idx, num_input - 1).reshape(-1), valid.reshape(-1)


def routing_indices(routing: str | None, num_input: int, num_branch: int, per_branch: int, seed: int = 0):
    """(synapse -> input index, validity mask) for a routing, or None for the identity."""
    n_syn = num_branch * per_branch
    if routing is None:
        if n_syn != num_input:
            raise ValueError(
                f"without routing, num_branch * num_synapse_per_branch ({num_branch} * {per_branch}) must equal "
                f"num_input ({num_input}); use routing='random' or 'structured'"
            )
        return None
    if routing == "random":
        return np.random.default_rng(seed).integers(0, num_input, n_syn), np.ones(n_syn, bool)
    if routing == "structured":
        if math.ceil(num_input / num_branch) > per_branch:
            raise ValueError(
                f"structured routing needs num_synapse_per_branch >= ceil(num_input / num_branch) = "
                f"{math.ceil(num_input / num_branch)}, got {per_branch}"
            )
        windows, valid = overlapping_window_indices(num_input, num_branch, per_branch)
        return interlocking_indices(num_input)[windows], valid
    raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")


def torch_linear_init(fan_in: int):
    """PyTorch's default nn.Linear init (weights and biases): U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    the same law as its Conv1d default."""
    return torch_conv_init(fan_in)


class ELMNeuron(nn.Module):
    """The (Branch-)ELM neuron on the layer contract (module docstring)."""

    num_input: int
    num_output: int
    num_memory: int = 100
    version: int = 1
    lambda_value: float = 5.0
    mlp_num_layers: int = 1
    mlp_hidden_size: int | None = None
    mlp_activation: str = "relu"
    tau_s_value: float = 5.0
    memory_tau_min: float = 1.0
    memory_tau_max: float = 1000.0
    learn_memory_tau: bool = False
    w_s_value: float = 0.5
    num_branch: int | None = None
    num_synapse_per_branch: int = 1
    routing: str | None = None
    routing_seed: int = 0
    delta_t: float = 1.0
    backend: str | None = None
    # linear_scan's config (its Pallas kernels' tuning) and sharding (the mesh axes splitting
    # the batch and the synapses/branches, for a Pallas backend under a mesh of several devices)
    kernel_config: LinearScanConfig | None = None
    kernel_sharding: KernelSharding | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def _branches(self) -> int:
        return self.num_input if self.num_branch is None else self.num_branch

    @property
    def num_synapse(self) -> int:
        return self._branches * self.num_synapse_per_branch

    def _check_config(self):
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {self.version}")
        if self.num_memory < 1 or self.num_output < 1 or self.num_input < 1:
            raise ValueError(
                f"num_input, num_output and num_memory must be >= 1, got {self.num_input}, "
                f"{self.num_output}, {self.num_memory}"
            )
        if self.mlp_activation not in ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {sorted(ACTIVATIONS)}, got {self.mlp_activation!r}")
        if not 0 < self.memory_tau_min < self.memory_tau_max:
            raise ValueError(
                f"need 0 < memory_tau_min < memory_tau_max, got {self.memory_tau_min}, {self.memory_tau_max}"
            )
        routing_indices(self.routing, self.num_input, self._branches, self.num_synapse_per_branch, self.routing_seed)

    def initial_state(self, batch_size: int) -> ELMState:
        self._check_config()
        sdt = state_dtype(self.dtype)
        n_traces = self.num_synapse if self.version == 1 else self._branches
        return ELMState(jnp.zeros((batch_size, n_traces), sdt), jnp.zeros((batch_size, self.num_memory), sdt))

    def tau_m_init(self) -> np.ndarray:
        """The log-spaced initial tau_m (as the reference: logspace over [min + 1e-6, max - 1e-6])."""
        return np.logspace(
            math.log10(self.memory_tau_min + 1e-6), math.log10(self.memory_tau_max - 1e-6), self.num_memory
        )

    def _tau_m(self, dt):
        proto_init = inverse_scaled_sigmoid(self.tau_m_init(), self.memory_tau_min, self.memory_tau_max)
        if self.learn_memory_tau:
            proto = self.param(
                "tau_m_proto",
                partitioned(lambda key, shape, dtype: jnp.asarray(proto_init, dtype), ("memory",)),
                (self.num_memory,),
                self.param_dtype,
            )
        else:
            proto = jnp.asarray(proto_init)
        return scaled_sigmoid(proto.astype(dt), self.memory_tau_min, self.memory_tau_max)

    @nn.compact
    def __call__(self, x, state: ELMState | None = None, resets=None):
        self._check_config()
        batch, time, resets, state, _ = begin_call(self, x, self.num_input, state, resets)
        dt = compute_dtype(self.dtype, x)
        sdt = state.memory.dtype
        # Traces, decays and the memory recurrence: float32 at least, whatever ``dt``
        # (kappa_m = exp(-1/1000) is 1.0 in bf16, which would freeze the slow units).
        rdt = jnp.promote_types(dt, jnp.float32)
        n_branch, d_m, n_syn = self._branches, self.num_memory, self.num_synapse
        hidden = self.mlp_hidden_size or 2 * d_m
        act = ACTIVATIONS[self.mlp_activation]

        w_s = jax.nn.relu(
            self.param(
                "w_s", partitioned(nn.initializers.constant(self.w_s_value), ("synapse",)), (n_syn,), self.param_dtype
            ).astype(rdt)
        )
        route = routing_indices(self.routing, self.num_input, n_branch, self.num_synapse_per_branch, self.routing_seed)
        inputs = x.astype(rdt)
        if route is not None:
            idx, valid = route
            inputs = inputs[..., jnp.asarray(idx)] * jnp.asarray(valid, rdt)
        weighted = w_s * inputs  # (batch, time, n_syn), rdt

        kappa_trace = jnp.exp(-self.delta_t / jnp.maximum(jnp.asarray(self.tau_s_value, rdt), 1e-6))
        if self.version == 1:
            s = linear_scan(kappa_trace, weighted, h0=state.traces.astype(rdt), resets=resets, backend=self.backend,
                            config=self.kernel_config, sharding=self.kernel_sharding)
            branch_in = s.reshape(batch, time, n_branch, -1).sum(-1)
            traces_last = s[:, -1]
        else:
            b_in = weighted.reshape(batch, time, n_branch, -1).sum(-1)
            branch_in = linear_scan(kappa_trace, b_in, h0=state.traces.astype(rdt), resets=resets, backend=self.backend,
                                    config=self.kernel_config, sharding=self.kernel_sharding)
            traces_last = branch_in[:, -1]

        tau_m = self._tau_m(rdt)
        kappa_m = jnp.exp(-self.delta_t / jnp.maximum(tau_m, 1e-6))
        if self.version == 1:
            step_size = self.lambda_value * -jnp.expm1(-self.delta_t / jnp.maximum(tau_m, 1e-6))  # lambda (1 - kappa_m)
        else:
            step_size = -jnp.expm1(-self.delta_t * self.lambda_value / jnp.maximum(tau_m, 1e-6))  # 1 - kappa_lambda

        # MLP (in dt): [branch inputs, kappa_m m] -> hidden (x mlp_num_layers, activation) -> d_m.
        sizes = [n_branch + d_m] + [hidden] * self.mlp_num_layers + [d_m]
        layers = []
        for i in range(len(sizes) - 1):
            out_name = "memory" if i == len(sizes) - 2 else "mlp"
            in_name = None if i == 0 else "mlp"
            kernel = self.param(
                f"mlp_{i}_kernel", partitioned(torch_linear_init(sizes[i]), (in_name, out_name)), sizes[i : i + 2],
                self.param_dtype,
            )
            bias = self.param(
                f"mlp_{i}_bias", partitioned(torch_linear_init(sizes[i]), (out_name,)), (sizes[i + 1],), self.param_dtype
            )
            layers.append((kernel, bias))
        (k0, b0), rest = layers[0], layers[1:]
        # input half of the first layer, all steps at once
        pre = branch_in.astype(dt) @ k0[:n_branch].astype(dt) + b0.astype(dt)
        # The scan closes over the weights in at least float32 and casts them to dt in each
        # step, so their gradients are summed over time in float32, not in dt.
        k0_m = k0[n_branch:].astype(rdt)
        rest = [(kernel.astype(rdt), bias.astype(rdt)) for kernel, bias in rest]

        def step(m_prev, inputs):  # m_prev: (batch, d_m) in rdt
            pre_t, reset_t = inputs
            m_prev = jnp.where(reset_t[:, None], 0, m_prev)
            z = pre_t + (kappa_m * m_prev).astype(dt) @ k0_m.astype(dt)
            for kernel, bias in rest:
                z = act(z) @ kernel.astype(dt) + bias.astype(dt)
            dm = lecun_tanh(z.astype(rdt))
            m = kappa_m * m_prev + step_size * dm
            return m, m

        reset_seq = jnp.zeros((batch, time), bool) if resets is None else resets
        m_last, ms = jax.lax.scan(step, state.memory.astype(rdt), (jnp.moveaxis(pre, 1, 0), jnp.moveaxis(reset_seq, 1, 0)))
        ms = jnp.moveaxis(ms, 0, 1)  # (batch, time, d_m), rdt; the readout casts it to dt
        y = nn.Dense(
            self.num_output,
            dtype=dt,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(torch_linear_init(d_m), ("memory", "embed")),
            bias_init=partitioned(torch_linear_init(d_m), ("embed",)),
            name="w_y",
        )(ms)
        return y, ELMState(traces_last.astype(sdt), m_last.astype(sdt))


class ELMBlock(nn.Module):
    """A residual ELM layer for stacks: ``x + elm(norm(x))`` around the :class:`ELMNeuron` it
    holds (``elm``: unbound, with ``num_input = num_output = features``; its parameters and
    state are the block's; the norm runs in its dtypes). State: :class:`ELMState`."""

    elm: ELMNeuron
    norm: str = "rms"

    @property
    def features(self) -> int:
        return self.elm.num_input

    def _check_neuron(self):
        if self.elm.num_output != self.elm.num_input:
            raise ValueError(
                f"ELMBlock's neuron must map the stream to itself (num_input = num_output), got num_input="
                f"{self.elm.num_input}, num_output={self.elm.num_output}"
            )

    def initial_state(self, batch_size: int) -> ELMState:
        self._check_neuron()
        return self.elm.initial_state(batch_size)

    @nn.compact
    def __call__(self, x, state: ELMState | None = None, resets=None):
        self._check_neuron()
        check_sequence(x, self.features)
        h, _ = make_norm(self.norm, name="norm", dtype=self.elm.dtype, param_dtype=self.elm.param_dtype)(x)
        h, state = self.elm(h, state, resets)
        return x + h.astype(x.dtype), state
