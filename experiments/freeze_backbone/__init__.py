"""Experiment 2: fine-tune from a donor with the convolutions frozen."""
