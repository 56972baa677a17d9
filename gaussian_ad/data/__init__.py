"""Image data: decoding, manifests, scoring sources, synthetic data and augmentation."""
