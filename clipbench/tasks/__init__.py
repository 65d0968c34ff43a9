"""Evaluation tasks: arrays in, metrics out."""
