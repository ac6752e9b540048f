"""Experiment 1: warm start ten digits from a 0-4 donor, head resized or not."""
