"""Evaluation: uses stage 1 (and later stage 2) only through their public APIs."""
