"""Prefect tasks: thin wrappers over the gaussian_ad library."""
