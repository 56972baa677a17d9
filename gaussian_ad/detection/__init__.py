"""The detector: a configuration plus fitted models; images in, scores out."""
