"""Experiments: `python -m experiments.<name>`, one study each (see README's table)."""
