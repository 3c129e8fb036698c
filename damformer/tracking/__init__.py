"""Experiment tracking: MLflow runs, their figures, and comparing runs."""
