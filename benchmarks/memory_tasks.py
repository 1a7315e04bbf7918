"""The side-by-side memory benchmark (``mnemax-bench memory``); see
:mod:`mnemax.train.bench_memory` for what it runs.

    python benchmarks/memory_tasks.py --budget tiny [--smoke]
"""

from mnemax.train.bench_memory import main

if __name__ == "__main__":
    main()
