"""Simulations and benchmarks run on top of the fedmerge library."""
