"""Experiment 4: continue a legacy flax.optim Adam checkpoint under optax."""
