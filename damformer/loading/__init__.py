"""Training input: resumable epoch and rare-class streams, the evaluation loader, augmentation, collation.

Everything here reads shards (:mod:`damformer.shards`) or the raw tree (``rawtree``) and yields batches
with the same keys, dtypes and shapes.
"""
