"""The statistical core: moments, Gaussians, thresholds, calibration, metrics (numpy only)."""
