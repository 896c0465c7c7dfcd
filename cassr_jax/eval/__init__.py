"""Evaluation metrics, reports and comparison pictures."""
