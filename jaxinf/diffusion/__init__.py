"""Diffusion: schedules, solver step rules, the single lax.scan sampling driver, guidance."""
