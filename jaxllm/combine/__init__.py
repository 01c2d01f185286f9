"""Combining models: prediction ensembles (ensemble.py, generation.py) and weight averaging
(soup.py). The EMA of a run's params lives with the train state (training/ema.py)."""
