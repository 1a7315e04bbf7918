"""The side-by-side memory benchmark (``mnemax-bench memory``); see :mod:`mnemax.train.bench`
for what it runs. Needs the ``bench`` extra: ``pip install -e ".[bench]"``.

    python benchmarks/memory_tasks.py --budget tiny [--smoke]
"""

import sys

from mnemax.train.bench.cli import main

if __name__ == "__main__":
    main(["memory", *sys.argv[1:]])
