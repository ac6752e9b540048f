"""Experiment 3: train the head alone, then unfreeze the backbone at step N."""
