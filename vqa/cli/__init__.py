"""Command-line entry points, one Hydra app per module: ``python -m vqa.cli.<name>``.

train (also ``python train.py``), eval, predict, export, extract (the frozen encoder's
feature store). Each composes its config from ``configs/<name>.yaml``.
"""
