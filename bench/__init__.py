"""The omni benchmark suite: `python -m bench [--quick] [--out DIR]` (see bench/run.py)."""
