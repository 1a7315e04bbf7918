#!/usr/bin/env bash
# Download the wheels the accelerator machine lacks into .whl/ (gitignored), for `carry: [".whl"]`.
# The device image has jax, optax, orbax-checkpoint, torch and triton but no package registry
# (the device README and KINDS.md list its packages), so anything else travels as wheels:
#
#   bash benchmarks/device_wheels.sh fla     # fla-core, flash-linear-attention, einops (fla's rows)
#   bash benchmarks/device_wheels.sh train   # TFDS, grain and the rest of the `train` extras the
#                                            # memory benchmark imports, at constraints.txt's pins
#   bash benchmarks/device_wheels.sh all
#
# benchmarks/issue34_gpu.sh installs every wheel in .whl/ into /tmp/site on the device; the parts
# that need them put /tmp/site on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-all}
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -c constraints.txt -d .whl "$@"
}
mkdir -p .whl
case "$want" in fla|all)
  dl fla-core==0.6.0 flash-linear-attention==0.6.0 einops
esac
case "$want" in train|all)
  # tensorflow-datasets and its needs missing from the image (it needs no TensorFlow here: the
  # tasks write array_record files), grain, ml-collections, tensorboardX; protobuf at our pin
  # because googleapis-common-protos 1.76 needs >= 6.33.5
  dl tensorflow-datasets array_record dm-tree immutabledict simple-parsing docstring_parser \
    tensorflow-metadata googleapis-common-protos termcolor toml grain portpicker ml-collections \
    tensorboardX protobuf
  # promise (a TFDS need) is published as a source distribution only: build its pure-Python wheel
  python3 -m pip wheel -q --no-deps -w .whl "promise==$(grep -i '^promise==' constraints.txt | cut -d= -f3)"
esac
case "$want" in fla|train|all) ;;
  *) echo "unknown set $want: fla, train or all" >&2; exit 2 ;;
esac
ls -la .whl
du -sh .whl
