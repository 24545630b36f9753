"""Flax NNX model families, one a file; `functional.py` turns them into pure functions."""
