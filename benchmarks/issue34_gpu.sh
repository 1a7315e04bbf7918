#!/usr/bin/env bash
# Issue 34's GPU measurements in one device call each (benchmarks/RESULTS.md):
#
#   bash benchmarks/issue34_gpu.sh ops        # JAX: pallas_gpu and xla vs reference + timings, cuDNN rows (~450 s)
#   bash benchmarks/issue34_gpu.sh fla        # fla 0.6.0: simple GLA, DeltaNet, GDN, KDA (autotunes minutes)
#   bash benchmarks/issue34_gpu.sh fla_gla    # fla's chunk_gla alone (autotunes for minutes)
#   bash benchmarks/issue34_gpu.sh table      # fla's five ops, then `ops`: must-show 3 in one call (needs
#                                             # benchmarks/fla_autotune/ committed from an earlier fla run)
#   bash benchmarks/issue34_gpu.sh e2e        # training tokens/s at 2k and 32k, generation from a 16k prefill
#   bash benchmarks/issue34_gpu.sh kernels    # each pallas_gpu kernel of every op timed alone (where the time goes)
#   bash benchmarks/issue34_gpu.sh xla_channel  # xla's per-channel scores, factored vs sub-chunked
#   bash benchmarks/issue34_gpu.sh memory --tasks mqar --difficulties pairs=16 pairs=64 --families mamba2 gdn
#                                             # 10m memory cells of the new families (4 at a time, ~200-380 s each)
#
# Arguments after the part go to its Python script and override the part's own (the last
# occurrence of a flag wins), e.g. `bash benchmarks/issue34_gpu.sh kernels --ops gdn --config wy_block=64`.
#
# Run from the repository root on the device machine with the wheels carried (`carry: [".whl"]`;
# `bash benchmarks/device_wheels.sh all` downloads them here; see the device README): the script installs the project and the wheels, then runs one part.
# Every part prints its rows as it goes (unbuffered) and its table last, and writes its JSON
# under $OUT; each runs under a `timeout` (T34_LIMIT seconds, default 540) so that a hang ends
# with the rows so far rather than with the device's kill (which loses a piped `| tail`).
set -uo pipefail
LIMIT=${T34_LIMIT:-540}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
nvidia-smi --query-gpu=name --format=csv,noheader

# fla's autotuning (minutes per op on a fresh machine) persists across machines: fla caches each
# kernel's tuning results on disk (FLA_CACHE_RESULTS, on by default) under Triton's cache
# directory, keyed by the Triton build, the GPU target, the kernel source and the shapes' keys.
# The fla parts seed that directory from benchmarks/fla_autotune/ (tracked: a new checkout has
# it, unlike a gitignored folder) and from a carried .triton_autotune/ if any, and pack every
# *.autotune.json back into $OUT/fla_autotune.tgz, even after their `timeout` (one file: a call
# returns at most 8). Unpack it into benchmarks/fla_autotune/ here and commit it: every later
# machine then compiles only each kernel's chosen configuration instead of autotuning.
fla_cache_in() {
  export TRITON_CACHE_DIR=/tmp/triton_fla_cache
  mkdir -p "$TRITON_CACHE_DIR"
  local src
  for src in benchmarks/fla_autotune .triton_autotune; do
    if [ -d "$src" ]; then cp -r "$src"/. "$TRITON_CACHE_DIR"/; fi
  done
  echo "autotune results seeded: $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l)"
}
fla_cache_out() {
  [ -n "${OUT:-}" ] || return 0
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar --null -czf "$OUT/fla_autotune.tgz" -T -)
  echo "autotune results kept: $(tar -tzf "$OUT/fla_autotune.tgz" | grep -c 'autotune.json$') in \$OUT/fla_autotune.tgz" \
    "(here: mkdir -p benchmarks/fla_autotune && tar -xzf <files_at>/fla_autotune.tgz -C benchmarks/fla_autotune)"
}

part=${1:-ops}
shift || true
case "$part" in
  ops)
    timeout "$LIMIT" python3 -u benchmarks/linear_attention.py --ops simple_gla,gla,deltanet,gdn,kda --backends xla,pallas_gpu "$@"
    ;;
  fla)
    fla_cache_in
    PYTHONPATH=/tmp/site timeout "$LIMIT" python3 -u benchmarks/linear_attention_fla.py --ops simple_gla,deltanet,gdn,kda "$@"
    fla_cache_out
    ;;
  table)
    # must-show 3's whole table in one call: fla's five ops first (seeded from the committed
    # autotune results; on a fresh machine without them fla autotunes for minutes and this part
    # cannot fit a call), then ours and xla with their checks, and cuDNN. T34_FLA_LIMIT bounds
    # the fla half (default 200 s), T34_LIMIT the rest; arguments go to linear_attention.py
    fla_cache_in
    PYTHONPATH=/tmp/site timeout "${T34_FLA_LIMIT:-200}" python3 -u benchmarks/linear_attention_fla.py \
      --ops simple_gla,gla,deltanet,gdn,kda
    fla_cache_out
    timeout "$LIMIT" python3 -u benchmarks/linear_attention.py --ops simple_gla,gla,deltanet,gdn,kda --backends xla,pallas_gpu \
      --precompile 12 "$@"
    ;;
  fla_gla)
    fla_cache_in
    PYTHONPATH=/tmp/site timeout "$LIMIT" python3 -u benchmarks/linear_attention_fla.py --ops gla "$@"
    fla_cache_out
    ;;
  e2e)
    timeout "$LIMIT" python3 -u benchmarks/throughput.py --families transformer,mamba2,gdn --contexts 2048,32768 --prefill 16384 \
      --out throughput_issue34.json "$@"
    ;;
  kernels)
    timeout "$LIMIT" python3 -u benchmarks/linear_attention_kernels.py --ops simple_gla,gla,deltanet,gdn,kda "$@"
    ;;
  xla_channel)
    timeout "$LIMIT" python3 -u benchmarks/xla_channel_scores.py --shape 8,2048,16,128 --dtype bfloat16 "$@"
    ;;
  memory)
    # the matrix-state ops on their Pallas GPU kernels (the platform default is xla; T34_BACKEND=xla
    # overrides). The image lacks TFDS and grain: carry the `train` wheels
    # (`bash benchmarks/device_wheels.sh train`)
    export PYTHONPATH=/tmp/site
    python3 -c "import mnemax.train.bench.cli" || { echo "the train wheels are missing: bash benchmarks/device_wheels.sh train" >&2; exit 3; }
    # T34_TAG names this run's folders and archive, so that two runs (another backend, other
    # families) can share one call and one GPU: `bash ... memory ... & sleep 60; T34_TAG=b
    # T34_BACKEND=xla bash ... memory ...; wait` (the pause keeps the two installs apart; `wait`,
    # not a `pgrep -f` loop, which matches the call's own command line and never ends)
    W=/tmp/mem34${T34_TAG:-}
    MNEMAX_KERNEL_BACKEND=${T34_BACKEND:-pallas_gpu} timeout "$LIMIT" python3 -u benchmarks/memory_tasks.py --budget 10m --steps 2000 \
      --learning_rate 1e-3 --parallel 4 --families mamba2 gdn deltanet gla --out "$W"_out --workdir "$W" "$@"
    # every finished cell's own table and every cell's log in one archive (a call returns at most 8
    # files), kept even when the timeout ended the run before its merged table; merge with
    # `mnemax-bench memory --merge <files_at>/cells/*/memory_10m_2000steps.json --out benchmarks`
    if [ -n "${OUT:-}" ] && [ -d "$W/cells" ]; then
      tar -czf "$OUT/mem34${T34_TAG:-}_cells.tgz" -C "$W" cells logs
      echo "cells kept: $(find "$W/cells" -name '*.json' | wc -l) in \$OUT/mem34${T34_TAG:-}_cells.tgz"
    fi
    ;;
  *)
    echo "unknown part $part: ops, fla, fla_gla, table, e2e, kernels, xla_channel or memory" >&2
    exit 2
    ;;
esac
