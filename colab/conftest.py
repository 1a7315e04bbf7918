"""Notebooks run in CI (pytest --nbmake) at small sizes: the kernels nbmake starts
inherit this environment variable, which the notebooks read."""

import os

os.environ.setdefault("MNEMAX_SMALL", "1")
