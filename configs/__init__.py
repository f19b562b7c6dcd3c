"""Experiment configs: `get_config()` in each file; `kosmos-jax CMD --config configs/NAME.py`."""
