"""``python -m mnemax.train.bench memory ...``: the ``mnemax-bench`` console script."""

from .cli import main

main()
