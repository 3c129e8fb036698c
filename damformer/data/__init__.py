"""Data: the FLAIR-2 reader, its miniature generator, shards, loaders and a webdataset pipeline."""

from damformer.data.classes import FLAIR_CLASSES, NUM_CLASSES, remap_labels
from damformer.data.domains import DOMAIN_PRESETS, select_domains
from damformer.data.flair2 import Flair2Dataset, Flair2Sample
from damformer.data.layout import Flair2Layout, PatchRef
from damformer.data.sentinel import SentinelOptions
from damformer.data.wds_pipeline import webdataset_pipeline

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
    "webdataset_pipeline",
]
