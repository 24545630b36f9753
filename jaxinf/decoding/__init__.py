"""Decoding: sampling rules, prefill + lax.while_loop generation for any SequenceModel, and the
accelerators that verify drafts against it."""
