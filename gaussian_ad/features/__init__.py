"""Feature extraction: pooled levels and patch features from one backbone pass."""
