"""Scoring outputs: score and error tables, map overlays, and whole shards of a scoring run."""
