"""Checkpoints: orbax for native training state, strict flat-array files for shipped weights,
and (later) converters from other libraries' safetensors."""
