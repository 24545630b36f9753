"""Sample-quality metrics: Fréchet distance, and FD-digits / conditional accuracy from the
project's digits classifier."""
