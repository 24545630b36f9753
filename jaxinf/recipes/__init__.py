"""Study recipes: the trained models and evaluation set-ups that jaxinf's experiments share.

Generic machinery (models, samplers, decoders, the training step) lives in the other packages; a
recipe fixes one study's data, sizes and schedule on top of it (the digits DiT of the quickstart,
the few-step students on digits, the arithmetic solver, the byte-level code models). Experiments
import recipes; recipes never import experiments.
"""
