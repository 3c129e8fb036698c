"""The FLAIR-2 dataset: its on-disk layout, the reader, Sentinel-2 crops and dates, domains and classes."""

from damformer.data.classes import FLAIR_CLASSES, NUM_CLASSES, remap_labels
from damformer.data.domains import DOMAIN_PRESETS, select_domains
from damformer.data.flair2 import Flair2Dataset, Flair2Sample
from damformer.data.layout import Flair2Layout, PatchRef
from damformer.data.sentinel import SentinelOptions

__all__ = [
    "DOMAIN_PRESETS",
    "FLAIR_CLASSES",
    "NUM_CLASSES",
    "Flair2Dataset",
    "Flair2Layout",
    "Flair2Sample",
    "PatchRef",
    "SentinelOptions",
    "remap_labels",
    "select_domains",
]
