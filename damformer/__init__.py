"""damformer: DAM-Former unsupervised domain adaptation for aerial + Sentinel-2 land-cover segmentation."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``damformer.load_model``, imported on first use (``import damformer`` stays light)."""
    if name == "load_model":
        from damformer.runtime.model_files import load_model

        return load_model
    raise AttributeError(f"module 'damformer' has no attribute {name!r}")


__all__ = ["__version__", "load_model"]
