"""Analyses of jaxinf's models from their configs: `roofline` (FLOPs, bytes and idealised runtime
per layer on data-sheet devices and this machine)."""
