"""Experiment 5: continue a 0-4 run under a ten-digit config (head resized)."""
