"""Experiments on model surgery, each runnable as `python -m experiments.<name>`.

Each writes `experiments/<name>/results/` (report.md, summary.json, PNGs);
shared code is in `experiments.common`.
"""
