"""Inference: georeferenced land-cover maps from checkpoints (damformer predict)."""
