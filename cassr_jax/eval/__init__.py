"""Evaluation: image-quality metrics and reports."""
