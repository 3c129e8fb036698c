"""Our shards through a plain ``webdataset`` pipeline, for tools outside this package.

    from damformer.loading.wds import webdataset_pipeline
    from damformer.loading.collate import collate_samples

    dataset = webdataset_pipeline("runs/demo/shards/south", shuffle=100)
    for batch in dataset.batched(8, collation_fn=collate_samples):
        batch["aerial"]  # (8, 5, 512, 512) uint8 tensor, batch["label"] (8, 512, 512), batch["s2"] ...

Each element is the training sample dict of :func:`damformer.loading.augment.training_sample` (``key``,
``domain``, ``aerial``, ``label``, ``s2``, ``s2_day_offsets``, ``valid``; webdataset's ``map`` adds
back ``__key__``), decoded by the same code as the package's own loader, so both see identical arrays.
The package's loader stays the one training uses: it resumes mid-epoch exactly, splits an epoch across
ranks and workers without overlap, checks the shards' sha256 and reads them zero-copy
(benchmarks/bench_loader.py compares the two).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from damformer.loading.augment import training_sample
from damformer.shards.format import decode_sample
from damformer.shards.manifest import load_manifest


def shard_urls(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Tar paths or URLs of ``sources``: shard-set folders (their manifest's shards, in order) or tars."""
    items = [sources] if isinstance(sources, str | os.PathLike) else list(sources)
    urls: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            urls += [str(path / shard["name"]) for shard in load_manifest(path)["shards"]]
        else:
            urls.append(str(item))  # a tar path, or any URL webdataset opens (pipe:, http://)
    return urls


def _decoder(with_masks: bool) -> Any:
    def decode(sample: dict[str, Any]) -> dict[str, Any]:
        files = {name: data for name, data in sample.items() if not name.startswith("__")}
        shard = Path(str(sample.get("__url__", "?"))).name
        return training_sample(decode_sample(files, key=sample["__key__"], shard=shard, masks=with_masks))

    return decode


def webdataset_pipeline(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    shuffle: int = 0,
    shard_shuffle: bool = False,
    seed: int = 0,
    with_masks: bool = False,
) -> Any:
    """A ``webdataset.WebDataset`` over shard sets or tars that yields the package's sample dicts.

    Args:
        sources: shard-set folders (``damformer shard --out``), tar paths, or webdataset URLs.
        shuffle: sample shuffle buffer (0: file order).
        shard_shuffle: shuffle the order of the shards each epoch.
        seed: seed of both shuffles.
        with_masks: also decode the Sentinel-2 cloud/snow masks (training does not use them).

    Returns:
        The pipeline; add stages as usual (``.batched(n, collation_fn=collate_samples)``, ``.map``).
        Malformed samples raise :class:`~damformer.shards.format.ShardFormatError` naming the shard.
    """
    import webdataset as wds  # optional for training: imported only by this pipeline

    urls = shard_urls(sources)
    shards = len(urls) if shard_shuffle else False  # webdataset: an int is the shard shuffle buffer
    dataset = wds.WebDataset(urls, shardshuffle=shards, seed=seed, empty_check=False)
    if shuffle:
        dataset = dataset.shuffle(shuffle, initial=shuffle, seed=seed)
    return dataset.map(_decoder(with_masks))
