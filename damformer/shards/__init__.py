"""Offline shards: FLAIR-2 samples as WebDataset tar shards, per domain, with a manifest.

``writer`` (write, resume, verify), ``format`` (a sample's files, encoded and decoded), ``tario`` (tar
writing and zero-copy memory-mapped reading), ``manifest`` (counts, sha256, class and band statistics)
and ``shardset`` (the folders of one role, checked against a model). Reading them for training is
:mod:`damformer.loading`'s job (its ``wds`` module reads them through the ``webdataset`` package).
"""

from damformer.shards.shardset import ShardInfo, ShardSet
from damformer.shards.writer import ShardWriteOptions, verify_shards, write_shards

__all__ = ["ShardInfo", "ShardSet", "ShardWriteOptions", "verify_shards", "write_shards"]
