"""jaxinf: fast, high-quality generative inference in JAX.

Models are Flax NNX modules crossed once into pure functions (`jaxinf.models.functional`);
samplers, decoders, guidance and caching see only `apply(params, ...)` and pytrees.
"""

__version__ = "0.1.0"
