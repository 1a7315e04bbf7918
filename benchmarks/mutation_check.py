"""Mutation check: does the test suite fail when the numbers go wrong?

Each mutation below is one plausible bug (a dropped scale, an inverted comparison, a
loss scored on every step, a default that went missing...) in a kernel, a layer, a
converter, the trainer's metrics or the release bundle. For each, the script copies the
working tree to a temporary directory, applies the mutation there (the text it replaces
must occur exactly once), and runs the mutation's test files against the copy (the copy's
``mnemax`` comes first on ``PYTHONPATH``). A mutation counts as caught only when one of its
*anchor* tests fails: a test that compares numbers with an independent source (a numpy
reference written from the equations, an official package's fixture, a closed form) --
not a "gradient is non-zero" or "output is finite" check. It prints which tests failed
for each mutation and a table last; the exit status is non-zero if any mutation survives.

Before the mutations, the union of their test selections runs once on an unmutated copy:
a test that already fails would "catch" anything.

Usage (CPU, from the repository root, in the dev environment)::

    python benchmarks/mutation_check.py                 # every mutation
    python benchmarks/mutation_check.py --only memmamba_scale unmasked_loss
    python benchmarks/mutation_check.py --list

Add a mutation with each new family or kernel: keep the list growing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# package directory -> its import name (pyproject's [tool.setuptools.package-dir])
PACKAGE_DIRS = {"layers": "layers", "kernels": "kernels", "train": "train", "configs": "configs"}


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # file in the repository
    old: str  # text replaced (must occur exactly once)
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, "-k" expressions
    anchors: tuple[str, ...]  # substrings of the failing test ids that count as an independent catch
    why: str = ""


MUTATIONS = [
    # --- MemMamba (the five the audit found in their current form come first)
    Mutation("memmamba_scale", "layers/note_pool.py", "/ math.sqrt(q.shape[-1])", "",
             ("tests/test_memmamba_reference.py",), ("test_memmamba_reference.py",),
             "pool attention loses its 1/sqrt(d) scale"),
    Mutation("memmamba_gate", "layers/note_pool.py", "hard = (score > threshold).astype(score.dtype)",
             "hard = (score < threshold).astype(score.dtype)",
             ("tests/test_memmamba_reference.py",), ("test_memmamba_reference.py",),
             "the hard / straight-through gate opens below the threshold"),
    Mutation("unmasked_loss", "train/trainer.py", "m = mask.astype(jnp.float32)", "m = jnp.ones_like(mask, jnp.float32)",
             ("tests/test_metrics_reference.py",), ("test_masked_metrics_equal_per_step_loops", "test_trainer_evaluation_equals_numpy"),
             "every step scored, not only the answer steps"),
    Mutation("group_accuracy_counts_all", "train/trainer.py", 'out["group_correct"] = jnp.einsum("bt,bg->g", correct, onehot)',
             'out["group_correct"] = jnp.einsum("bt,bg->g", m, onehot)',
             ("tests/test_metrics_reference.py",), ("test_masked_metrics_equal_per_step_loops", "test_trainer_evaluation_equals_numpy"),
             "per-group accuracy counts every scored step as correct"),
    Mutation("xlstm7b_soft_cap_default", "layers/xlstm_cells.py", "gate_soft_cap: float | None = 15.0",
             "gate_soft_cap: float | None = None",
             ("tests/test_xlstm_layers.py", "-k", "soft_capped or bf16_compute"), ("test_soft_capped_gates_match_the_closed_form",),
             "the 7B layer's gate soft cap default removed"),
    Mutation("memmamba_read_before_write", "layers/note_pool.py",
             "        read = attend(q_t[:, None], pools, jnp.ones((batch, 1), bool), w_k, w_v)[:, 0]\n"
             "        pools = tuple(insert_note(p, v, s, w, replace) for p, (v, s, w) in zip(pools, notes_t))\n",
             "        pools = tuple(insert_note(p, v, s, w, replace) for p, (v, s, w) in zip(pools, notes_t))\n"
             "        read = attend(q_t[:, None], pools, jnp.ones((batch, 1), bool), w_k, w_v)[:, 0]\n",
             ("tests/test_memmamba_reference.py",), ("test_memmamba_reference.py",),
             "a token reads its own note (write before read)"),
    Mutation("memmamba_salience_tie", "layers/note_pool.py", "do = write & (~full | (salience > lowest))",
             "do = write & (~full | (salience >= lowest - 0.05))",
             ("tests/test_memmamba_reference.py",), ("test_memmamba_reference.py",),
             "a full pool replaces an entry it should have kept"),
    # --- kernels
    Mutation("selective_scan_chunk_decay", "kernels/selective_scan/xla.py",
             "decay = jnp.exp(dt_c[..., None] * A) * keep_c[:, :, None, None]",
             "decay = jnp.exp(dt_c[..., None] * A * 0.99) * keep_c[:, :, None, None]",
             ("tests/test_selective_scan.py", "-k", "python_loop or xla_matches"),
             ("test_backends_match_python_loop", "test_xla_matches_reference"),
             "the chunked scan's discretisation off by 1%"),
    Mutation("linear_scan_h0", "kernels/linear_scan/xla.py", "b = b.at[:, idx].add(a[:, idx] * h0.astype(b.dtype))",
             "b = b.at[:, idx].add(h0.astype(b.dtype))",
             ("tests/test_linear_scan.py", "-k", "values_match_python_loop"), ("test_values_match_python_loop",),
             "the initial state enters without its first decay"),
    Mutation("selective_scan_one_step_reset", "kernels/selective_scan/common.py",
             "        h = jnp.where(resets[:, 0, None, None], jnp.zeros_like(h), h)\n", "        pass\n",
             ("tests/test_pallas_selective_scan.py", "-k", "one_step and reference"),
             ("test_one_step_equals_the_multi_step_call", "test_one_step_gradients_equal_the_sequential_reference"),
             "a generated token keeps the state across a reset (the one-step closed form)"),
    Mutation("mlstm_chunk_stabiliser", "kernels/mlstm/xla.py", "m = jnp.maximum(log_a, intra_max)",
             "m = jnp.maximum(log_a, intra_max) + 0.5",
             ("tests/test_xlstm_kernels.py", "-k", "mlstm"), ("test_mlstm_forms_are_algebraically_equal_float64", "test_mlstm_backends"),
             "the chunkwise mLSTM's stabiliser shifted (changes h through eps and exp(-m))"),
    Mutation("slstm_forget", "kernels/slstm/reference.py", "    log_f = jax.nn.log_sigmoid(f_pre)\n",
             "    log_f = jax.nn.log_sigmoid(f_pre + 0.1)\n",
             ("tests/test_xlstm_kernels.py", "-k", "slstm"), ("test_slstm_backends_match_python_loop", "test_slstm_xla_gradients_match_reference"),
             "the sLSTM forget gate biased"),
    # --- layers
    Mutation("hcam_topk_weights", "layers/hcam.py", "weights = _softmax_masked(top_logits, top_visible)",
             "weights = _softmax_masked(top_logits * 0.5, top_visible)",
             ("tests/test_hcam.py", "-k", "top_k_selection or local_attention_and_read"), ("test_top_k_selection_and_relevance_weighting", "test_local_attention_and_read_match_numpy_loop"),
             "HCAM's chunk relevance softmax at the wrong temperature"),
    Mutation("hcam_local_rope", "layers/hcam.py",
             'kx = rope(jnp.einsum("btd,dhe->bthe", ext, p["local_key"]), ext_off)',
             'kx = jnp.einsum("btd,dhe->bthe", ext, p["local_key"])',
             ("tests/test_hcam.py", "-k", "local_attention_and_read"), ("test_local_attention_and_read_match_numpy_loop",),
             "HCAM's local attention (parallel path) loses the rotary positions of its keys"),
    Mutation("s4d_discretisation", "layers/s4d.py", "dtA = jnp.exp(log_dt.astype(rdt))[:, None] * A  # (H, modes)",
             "dtA = jnp.exp(log_dt.astype(rdt))[:, None] * A * 1.01  # (H, modes)",
             ("tests/test_ssm.py", "-k", "diagonal_ssm_equals_python_loop"), ("test_diagonal_ssm_equals_python_loop",), "S4D's zero-order hold off by 1%"),
    Mutation("layernorm_bias", "layers/norms.py", "        y = y + bias.astype(dt)\n", "        y = y - bias.astype(dt)\n",
             ("tests/test_layers.py", "-k", "norms"), ("test_norms_with_random_scale_and_bias_match_formulas",),
             "LayerNorm subtracts its bias"),
    Mutation("hopfield_beta", "layers/hopfield.py", 'logits = beta * jnp.einsum("...ld,...sd->...ls", state, k)',
             'logits = jnp.sqrt(beta) * jnp.einsum("...ld,...sd->...ls", state, k)',
             ("tests/test_hopfield.py", "tests/test_causal_hopfield.py", "-k",
              "projected_layer or static_unnormalised or pooling_classifier"),
             ("test_projected_layer_matches_numpy_reference", "test_static_unnormalised_layer_is_the_closed_form",
              "test_hopfield_pooling_classifier_streams"),
             "the Hopfield association loses part of its inverse temperature beta"),
    Mutation("elm_memory_decay", "layers/elm.py", "kappa_m = jnp.exp(-self.delta_t / jnp.maximum(tau_m, 1e-6))",
             "kappa_m = jnp.exp(-self.delta_t / jnp.maximum(tau_m * 1.1, 1e-6))",
             ("tests/test_elm.py", "-k", "python_loop"), ("test_elm_matches_python_loop_of_the_equations",),
             "ELM's memory units decay with the wrong time constant"),
    # --- converters
    Mutation("mamba_convert_dt_proj", "zoo/convert/mamba.py", '"dt_proj": {"kernel": take(p + "mixer.dt_proj.weight").T},',
             '"dt_proj": {"kernel": take(p + "mixer.dt_proj.weight").T * 1.01},',
             ("tests/test_mamba.py", "-k", "converted"), ("test_converted_hf_weights_match_hf_logits",), "the Mamba converter scales dt_proj by 1.01"),
    Mutation("xlstm_convert_gate_swap", "zoo/convert/xlstm.py",
             'gates = [sd(pre + f"{name}.weight").transpose(0, 2, 1) for name in ("fgate", "igate", "zgate", "ogate")]',
             'gates = [sd(pre + f"{name}.weight").transpose(0, 2, 1) for name in ("igate", "fgate", "zgate", "ogate")]',
             ("tests/test_xlstm_convert.py", "-k", "fixture"), ("match_fixture",),
             "the sLSTM converter takes upstream's gate names at face value"),
    # --- linear attention and the delta rule (issue 34): ops, Mamba-2, Gated DeltaNet, converters
    Mutation("gla_xla_state_in", "kernels/gated_linear_attention/xla.py",
             'return unchunk(o + einsum("bhntd,nbhdv->bhntv", q_in, S_in), c), final', "return unchunk(o, c), final",
             ("tests/test_linear_attention_ops.py", "-k", "gla and (backends_equal or fla_naive) and xla"),
             ("test_ops_equal_fla_naive_recurrences", "test_backends_equal_the_reference_with_gradients"),
             "the chunkwise GLA outputs lose the incoming state's term (q_in S_in) in every chunk"),
    Mutation("gla_xla_strict_mask", "kernels/gated_linear_attention/xla.py", "causal(chunk_size, strict=False)",
             "causal(chunk_size, strict=True)",
             ("tests/test_linear_attention_ops.py", "-k", "without_decay or (gla and xla and (backends_equal or fla_naive))"),
             ("test_ops_equal_fla_naive_recurrences", "test_backends_equal_the_reference_with_gradients",
              "test_gla_without_decay_is_causal_linear_attention"),
             "the chunkwise GLA's intra-chunk mask is strict: o_t misses its own step's k_t v_t"),
    # (strict -> non-strict in the delta rule's M is no bug: solve_triangular(unit_diagonal=True) never reads M's diagonal)
    Mutation("delta_xla_output_strict", "kernels/delta_rule/xla.py",
             "P = decayed_scores(c.q, c.k, c.G, causal(chunk_size, strict=False) & c.seg.same)",
             "P = decayed_scores(c.q, c.k, c.G, causal(chunk_size, strict=True) & c.seg.same)",
             ("tests/test_linear_attention_ops.py", "-k", "(delta or gdn or kda) and (backends_equal or fla_naive) and xla"),
             ("test_ops_equal_fla_naive_recurrences", "test_backends_equal_the_reference_with_gradients"),
             "the chunkwise delta rule's outputs miss the current step's write (strict mask in P)"),
    Mutation("delta_xla_M_without_beta", "kernels/delta_rule/xla.py",
             "M = decayed_scores(c.k, c.k, c.G, causal(chunk_size, strict=True) & c.seg.same) * bc[..., None, :]",
             "M = decayed_scores(c.k, c.k, c.G, causal(chunk_size, strict=True) & c.seg.same)",
             ("tests/test_linear_attention_ops.py", "-k", "(delta or gdn or kda) and (backends_equal or fla_naive) and xla"),
             ("test_ops_equal_fla_naive_recurrences", "test_backends_equal_the_reference_with_gradients"),
             "the UT transform's M_ts = beta_s k_t^T D_ts k_s loses beta_s"),
    Mutation("delta_reference_decay_after_update", "kernels/delta_rule/reference.py",
             "    if g_t is not None:\n"
             "        S = decay_factor(g_t, S) * S\n"
             '    err = v_t - jnp.einsum("bhdv,bhd->bhv", S, k_t, precision=HIGHEST)\n'
             "    S = S + (beta_t[..., None] * k_t)[..., :, None] * err[..., None, :]\n",
             '    err = v_t - jnp.einsum("bhdv,bhd->bhv", S, k_t, precision=HIGHEST)\n'
             "    S = S + (beta_t[..., None] * k_t)[..., :, None] * err[..., None, :]\n"
             "    if g_t is not None:\n"
             "        S = decay_factor(g_t, S) * S\n",
             ("tests/test_linear_attention_ops.py", "-k", "reference and (numpy_loop or fla_naive)"),
             ("test_ops_equal_fla_naive_recurrences", "test_reference_equals_a_numpy_loop_of_the_equations"),
             "the recurrent delta rule decays after the delta update (the new write decays too)"),
    Mutation("mamba2_D_skip", "layers/mamba2.py",
             "y = heads_first(o).astype(f32) + D.astype(f32)[:, None] * x.astype(f32)", "y = heads_first(o).astype(f32)",
             ("tests/test_mamba2.py", "-k", "converted_hf or equations_in_float64"),
             ("test_converted_hf_weights_match_hf_logits", "test_mixer_equals_the_equations_in_float64"),
             "Mamba-2 loses its D skip connection (D x)"),
    Mutation("mamba2_z_gate", "layers/mamba2.py", "h = y.astype(f32) * jax.nn.silu(z.astype(f32))", "h = y.astype(f32)",
             ("tests/test_mamba2.py", "-k", "converted_hf or equations_in_float64"),
             ("test_converted_hf_weights_match_hf_logits", "test_mixer_equals_the_equations_in_float64"),
             "Mamba-2's gated RMSNorm loses the z gate silu(z)"),
    Mutation("gdn_q_l2norm", "layers/delta_net.py",
             "q, k = l2_normalize(q).astype(cdt), l2_normalize(k).astype(cdt)",
             "q, k = q.astype(cdt), l2_normalize(k).astype(cdt)",
             ("tests/test_gated_deltanet.py", "-k", "converted_qwen3next or numpy_loop"),
             ("test_converted_qwen3next_layer_matches_its_outputs_and_states", "test_mixer_equals_a_numpy_loop_of_the_equations"),
             "Gated DeltaNet's q is not L2-normalised (the output RMSNorm hides all but its epsilon's share)"),
    Mutation("gdn_gate_before_norm", "layers/delta_net.py",
             "        y = rms_norm(o, scale, self.eps)\n"
             "        if gate is not None:\n"
             '            act = jax.nn.silu if self.activation == "silu" else jax.nn.sigmoid\n'
             "            y = y * act(gate.astype(y.dtype))\n",
             "        if gate is not None:\n"
             '            act = jax.nn.silu if self.activation == "silu" else jax.nn.sigmoid\n'
             "            o = o * act(gate.astype(o.dtype))\n"
             "        y = rms_norm(o, scale, self.eps)\n",
             ("tests/test_gated_deltanet.py", "-k", "converted_qwen3next or numpy_loop"),
             ("test_converted_qwen3next_layer_matches_its_outputs_and_states", "test_mixer_equals_a_numpy_loop_of_the_equations"),
             "Gated DeltaNet gates before its output norm (Mamba-2's order), not after"),
    Mutation("mamba2_convert_conv_taps", "zoo/convert/mamba2.py",
             '"conv1d": {"kernel": take(p + "conv1d.weight")[:, 0, :].T},',
             '"conv1d": {"kernel": take(p + "conv1d.weight")[:, 0, ::-1].T},',
             ("tests/test_mamba2.py", "-k", "converted_hf"), ("test_converted_hf_weights_match_hf_logits",),
             "the Mamba-2 converter reverses the conv taps (newest input weighted as the oldest)"),
    Mutation("qwen3next_convert_ba_swap", "zoo/convert/qwen3next.py",
             "b, a = ba[:, :r].reshape(hv, d), ba[:, r:].reshape(hv, d)",
             "a, b = ba[:, :r].reshape(hv, d), ba[:, r:].reshape(hv, d)",
             ("tests/test_gated_deltanet.py", "-k", "converted_qwen3next"),
             ("test_converted_qwen3next_layer_matches_its_outputs_and_states",),
             "the Qwen3-Next converter swaps in_proj_ba's beta and decay rows"),
    Mutation("qwen3next_convert_o_proj_layout", "zoo/convert/qwen3next.py",
             '"o_proj": {"kernel": shaped("out_proj.weight", (d, hv * dv)).T.reshape(hv, dv, d)},',
             '"o_proj": {"kernel": shaped("out_proj.weight", (d, hv * dv)).T.reshape(dv, hv, d).transpose(1, 0, 2)},',
             ("tests/test_gated_deltanet.py", "-k", "converted_qwen3next"),
             ("test_converted_qwen3next_layer_matches_its_outputs_and_states",),
             "the Qwen3-Next converter reads out_proj's input columns dim-major instead of head-major"),
    # --- release bundles
    Mutation("release_restores_float32", "zoo/release.py",
             "target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), expected, shardings)",
             "target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=s), expected, shardings)",
             ("tests/test_release_families.py", "-k", "round_trip and (mamba or hopfield)"), ("test_release_round_trip_is_bitwise",),
             "load_pretrained restores every parameter as float32 (bf16 bundles come back cast)"),
    # --- trainer
    Mutation("schedule_end_value", "train/trainer.py", "end_value=t.learning_rate * 0.01)", "end_value=t.learning_rate * 0.1)",
             ("tests/test_metrics_reference.py", "-k", "schedule"), ("test_learning_rate_schedule_is_the_closed_form",),
             "the cosine decays to 10% of the peak, not 1%"),
    Mutation("weight_decay_A_log", "layers/base.py", '"A_log",  # Mamba', '"A_log_",  # Mamba',
             ("tests/test_weight_decay.py",), ("test_mask_leaf_by_leaf", "test_mask_by_name_and_rank"),
             "Mamba's A_log decayed"),
]


def _copy_tree(dst: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue
        out = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copy2(src, out)
    # the import layout of pyproject's package-dir: mnemax = zoo, mnemax.layers = layers, ...
    for name, folder in PACKAGE_DIRS.items():
        os.symlink(os.path.join("..", folder), os.path.join(dst, "zoo", name))
    os.makedirs(os.path.join(dst, ".path"))
    os.symlink(os.path.join("..", "zoo"), os.path.join(dst, ".path", "mnemax"))


def _env(copy: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(copy, ".path") + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run_tests(copy: str, args: tuple[str, ...], timeout: int) -> tuple[int, list[str], str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *args]
    try:
        out = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, [], "timeout"
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out.stdout, flags=re.M)))
    return out.returncode, failed, out.stdout[-3000:]


def _apply(copy: str, m: Mutation) -> None:
    path = os.path.join(copy, m.path)
    text = open(path).read()
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"mutation {m.name}: the text to replace occurs {n} times in {m.path} (expected once); update the list")
    with open(path, "w") as f:
        f.write(text.replace(m.old, m.new))


def _check_import(copy: str) -> None:
    probe = subprocess.run([sys.executable, "-c", "import mnemax.layers, mnemax.train; print(mnemax.layers.__file__)"],
                           cwd=copy, env=_env(copy), capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.realpath(probe).startswith(os.path.realpath(copy)):
        raise SystemExit(f"the copy's mnemax is not the one imported ({probe}); the check would test the original tree")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="run only these mutations (names)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--no_baseline", action="store_true", help="skip the unmutated run of the selected tests")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = ap.parse_args(argv)
    todo = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(todo) != len(set(args.only)):
        raise SystemExit(f"--only: unknown {sorted(set(args.only) - {m.name for m in MUTATIONS})}")
    if args.list:
        for m in todo:
            print(f"{m.name:30s} {m.path:28s} {m.why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="mnemax-mutation-") as tmp:
        base = os.path.join(tmp, "base")
        _copy_tree(base)
        _check_import(base)
        if not args.no_baseline:
            for sel in dict.fromkeys(m.tests for m in todo):
                t0 = time.time()
                code, failed, tail = _run_tests(base, sel, args.timeout)
                print(f"baseline {' '.join(sel)}: exit {code} in {time.time() - t0:.0f}s", flush=True)
                if code != 0:
                    print(tail)
                    raise SystemExit(f"the unmutated tests fail ({failed}); fix them before checking mutations")
        rows = []
        for m in todo:
            copy = os.path.join(tmp, m.name)
            shutil.copytree(base, copy, symlinks=True)
            _apply(copy, m)
            t0 = time.time()
            code, failed, tail = _run_tests(copy, m.tests, args.timeout)
            anchored = [f for f in failed if any(a in f for a in m.anchors)]
            caught = bool(anchored)
            rows.append((m, caught, anchored, failed, time.time() - t0))
            print(f"\n== {m.name} ({m.path}): {m.why}\n   {'CAUGHT' if caught else 'SURVIVED'} in {time.time() - t0:.0f}s; "
                  f"failing tests ({len(failed)}):", flush=True)
            for f in failed:
                print(f"     {'*' if f in anchored else ' '} {f}")
            if not caught and code not in (0, 1):
                print(tail)
            shutil.rmtree(copy)
    print("\n| mutation | file | caught | anchor test that failed (of failing) |\n|---|---|---|---|")
    for m, caught, anchored, failed, _ in rows:
        first = anchored[0].split("::", 1)[-1] if anchored else "-"
        print(f"| {m.name} | {m.path} | {'yes' if caught else 'NO'} | {first} ({len(failed)}) |")
    survived = [m.name for m, caught, *_ in rows if not caught]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} mutations caught" + (f"; survived: {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
