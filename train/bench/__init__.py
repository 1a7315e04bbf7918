"""The side-by-side memory benchmark: every registered family, the same tasks, matched budgets.

    pip install "mnemax[bench]"       # the training stack and matplotlib (the plots)
    mnemax-bench memory --budget tiny [--smoke] [--families ...] [--out benchmarks]
    python -m mnemax.train.bench memory ...                     (the same)

For each family, each task and each difficulty it trains a model sized to the
parameter budget (``d_model`` searched so that the count is as close as possible to
the budget's target) with fixed seeds, evaluates it on held-out data, and writes a
table (accuracy per family x task x difficulty) as markdown and JSON, plus plots of
accuracy against the difficulty axis (number of key-value pairs, context length).

The modules, in the order a run uses them:

- :mod:`.plan`: the budgets, the families (derived from the zoo's registry), the cells
  (task x difficulty), the sizing of a family's preset to a budget, the jobs of a run;
- :mod:`.runner`: one cell trained and evaluated (``Trainer.fit``), the jobs in this
  process or as concurrent processes;
- :mod:`.tables`: rows -> the markdown table (means and ranges over seeds);
- :mod:`.plots`: rows -> the accuracy plots (matplotlib, the ``bench`` extra);
- :mod:`.results`: the JSON / markdown / plot files of a run, merging and reading them back;
- :mod:`.cli`: ``mnemax-bench``, its flags; it checks that matplotlib imports before it
  trains anything.

Nothing here imports matplotlib at import time: the tables, plans and runner work
without it, and ``mnemax-bench`` names the missing extra at start-up.
"""
