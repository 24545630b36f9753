"""Meshes, sharding rules and sharded inference (DESIGN.md, "Scale").

`mesh` builds meshes with the axes data, fsdp, tensor, sequence; `rules` maps logical axis names
to them; `shard` places parameters, inputs and caches; `kernels` runs the Pallas kernels under
`jax.shard_map`. Import the submodules (this package imports nothing, so that models can use
`rules` and `kernels` without an import cycle).
"""
