"""damformer: DAM-Former unsupervised domain adaptation for aerial + Sentinel-2 land-cover segmentation."""

__version__ = "0.1.0"
