"""Evaluation on labelled test sets, configuration selection, and the HTML report."""
