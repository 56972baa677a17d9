"""Prefect flows: training, scoring and the nightly schedule."""
