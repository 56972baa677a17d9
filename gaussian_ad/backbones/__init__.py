"""Pretrained backbones: supported architectures, level taps and offline weight resolution."""
