"""Numerical building blocks without learnable weights (EM prototypes, matching, ...). No Ray."""
