"""Decoding: sampling rules, prefill + lax.while_loop generation for any SequenceModel, tokenizers."""
