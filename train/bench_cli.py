"""``mnemax-bench``: benchmarks that ship with the package.

    mnemax-bench memory [--budget tiny|10m|125m] [--smoke] [--families ...] [--tasks ...]
"""

from __future__ import annotations

import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("memory",):
        print(__doc__.strip(), file=sys.stderr)
        raise SystemExit(2)
    from . import bench_memory

    bench_memory.main(argv[1:])


if __name__ == "__main__":
    main()
