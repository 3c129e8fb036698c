"""Evaluation: confusion matrices and mIoU."""
