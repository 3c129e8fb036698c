"""Shard loader vs raw-tree reader at full FLAIR-2 size (512 x 512 aerial + Sentinel-2), side by side.

Writes a full-size miniature FLAIR-2 (512 px patches, 14-26 Sentinel-2 dates per zone), shards it, then
times, in alternating rounds within one process (one core: ``num_workers=0``):

* raw:        ``RawTreeDataset`` (rasterio GeoTIFF reads, superpatch crop, cloud filter, monthly means)
* shard:      ``ShardLoader`` over the shards (memory-mapped tar, zero-copy members, decode, collate)
* webdataset: ``damformer.data.webdataset_pipeline`` over the same shards (webdataset's tar reader,
              the same decode and collate)

all producing the same batches, and prints samples/s and the ratios (target: shard >= 5x raw per
core). The shard loader's sha256 check of each shard (once per training process, before its first
epoch) is timed on its own line: the rounds read with ``verify="never"``, as every later epoch does.
It also prints the sharding throughput and, per field, the size and decode time of the candidate
encodings that justify the shard format.

    python benchmarks/bench_loader.py                 # about 1 minute on 2 CPU cores
    python benchmarks/bench_loader.py --patches 64 --rounds 5
"""

from __future__ import annotations

import argparse
import gzip
import io
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json

from damformer.data import Flair2Dataset
from damformer.loading.collate import collate_samples
from damformer.loading.loader import LoaderOptions, ShardLoader
from damformer.loading.rawtree import RawTreeDataset
from damformer.loading.wds import webdataset_pipeline
from damformer.miniature.synth import SynthOptions, generate
from damformer.progress import set_quiet
from damformer.shards.format import compact_s2
from damformer.shards.shardset import ShardSet
from damformer.shards.writer import ShardWriteOptions, write_shards

BATCH = 4


def _time_raw(root: Path, augment: bool) -> tuple[float, int]:
    dataset = RawTreeDataset(Flair2Dataset(root), augment=augment)
    loader = DataLoader(dataset, batch_size=BATCH, collate_fn=collate_samples, num_workers=0)
    start = time.perf_counter()
    count = sum(len(batch["keys"]) for batch in loader)
    return time.perf_counter() - start, count


def _time_shards(shards: Path, augment: bool, verify: str = "never") -> tuple[float, int]:
    options = LoaderOptions(batch_size=BATCH, augment=augment, pad=False, shuffle_buffer=16, verify=verify)
    loader = ShardLoader(ShardSet(shards), options, num_workers=0)
    start = time.perf_counter()
    count = sum(len(batch["keys"]) for batch in loader)
    return time.perf_counter() - start, count


def _time_webdataset(shards: Path) -> tuple[float, int]:
    pipeline = webdataset_pipeline(shards, shuffle=16).batched(BATCH, collation_fn=collate_samples)
    loader = DataLoader(pipeline, batch_size=None, num_workers=0)
    start = time.perf_counter()
    count = sum(len(batch["keys"]) for batch in loader)
    return time.perf_counter() - start, count


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _decode_ms(data: bytes, decompress: Callable[[bytes], bytes] | None, repeats: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        raw = decompress(data) if decompress else data
        np.load(io.BytesIO(raw), allow_pickle=False).astype(np.float32, copy=False)
    return (time.perf_counter() - start) / repeats * 1e3


def encoding_table(root: Path) -> list[tuple[str, str, int, float]]:
    """(field, encoding, bytes, decode ms) for the fields of the first sample (single dates for S2)."""
    from damformer.data import SentinelOptions

    sample = Flair2Dataset(root, sentinel=SentinelOptions(monthly_average=False))[0]
    rows = []
    fields = {
        "aerial (5,512,512) u8": sample.aerial,
        "label (512,512) u8": sample.label,
        f"s2 {tuple(sample.s2.shape)} as float32": sample.s2.astype(np.float32),
        f"s2 {tuple(sample.s2.shape)} as int16": compact_s2(sample.s2),
        f"s2 masks {tuple(sample.s2_masks.shape)} u8": sample.s2_masks,
    }
    for name, array in fields.items():
        raw = _npy(array)
        rows.append((name, "npy", len(raw), _decode_ms(raw, None)))
        rows.append(
            (
                name,
                "npy + zlib level 1",
                len(zlib.compress(raw, 1)),
                _decode_ms(zlib.compress(raw, 1), zlib.decompress),
            )
        )
        packed = gzip.compress(raw, 6, mtime=0)
        rows.append((name, "npy + gzip level 6", len(packed), _decode_ms(packed, gzip.decompress)))
    return rows


def raw_bytes_per_sample(root: Path) -> float:
    """Bytes a raw-tree read touches per patch: its two GeoTIFFs plus its share of the zone superpatches."""
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".tif", ".npy")]
    patches = len(list(root.rglob("IMG_*.tif")))
    return sum(p.stat().st_size for p in files) / patches


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patches", type=int, default=32, help="full-size patches (split over 2 domains)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (median reported)")
    parser.add_argument("--workdir", type=Path, help="keep the data here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    set_quiet(True)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        root, shards = work / "flair2", work / "shards"
        per_zone = max(1, args.patches // 2)
        options = SynthOptions(
            patch_size=512,
            domains_per_region=1,
            zones_per_domain=1,
            test_zones_per_domain=0,
            patches_per_zone=per_zone,
        )
        generate(root, options, overwrite=True)
        start = time.perf_counter()
        manifest = write_shards(Flair2Dataset(root), shards, ShardWriteOptions(max_samples=8), overwrite=True)
        shard_seconds = time.perf_counter() - start
        count = manifest["num_samples"]

        results: dict[str, list[float]] = {
            "raw": [], "shard": [], "webdataset": [], "raw+aug": [], "shard+aug": [], "shard+sha256": []
        }  # fmt: skip
        _time_raw(root, False)  # warm the page cache for all: compare decode work, not the disk
        _time_shards(shards, False)
        _time_webdataset(shards)
        for _ in range(args.rounds):
            for name, run in (
                ("raw", lambda: _time_raw(root, False)),
                ("shard", lambda: _time_shards(shards, False)),
                ("webdataset", lambda: _time_webdataset(shards)),
                ("shard+sha256", lambda: _time_shards(shards, False, verify="always")),
                ("raw+aug", lambda: _time_raw(root, True)),
                ("shard+aug", lambda: _time_shards(shards, True)),
            ):
                seconds, seen = run()
                assert seen == count, (name, seen, count)
                results[name].append(count / seconds)

        shard_bytes = sum(s["bytes"] for s in manifest["shards"]) / count
        raw_bytes = raw_bytes_per_sample(root)
        encodings = encoding_table(root)

    rate = {name: statistics.median(values) for name, values in results.items()}
    print(
        f"\n== data loading, one core, {count} patches of 512 x 512 + Sentinel-2, batch {BATCH}, warm cache"
    )
    print(f"{'reader':<12}{'samples/s':>12}   rounds")
    for name, values in results.items():
        print(f"{name:<12}{rate[name]:>12.1f}   {' '.join(f'{v:.1f}' for v in values)}")
    ratio, ratio_aug = rate["shard"] / rate["raw"], rate["shard+aug"] / rate["raw+aug"]
    print(
        f"ratio shard/raw (read + decode + batch): {ratio:.2f}x; "
        f"target >= 5x: {'met' if ratio >= 5 else 'MISSED'}"
    )
    augment_ms = 1e3 * (1 / rate["shard+aug"] - 1 / rate["shard"])
    over_wds = rate["shard"] / rate["webdataset"]
    print(
        f"ratio shard/webdataset pipeline (same decode and collate): {over_wds:.2f}x; "
        f"the first epoch's sha256 check of every shard: {rate['shard+sha256']:.1f} samples/s"
    )
    print(
        f"with flips/rot90 on both paths: {ratio_aug:.2f}x (the augmentation itself costs "
        f"{augment_ms:.2f} ms per sample on either path: uint8 transposes)"
    )
    print(
        f"\n== sharding: {count / shard_seconds:.1f} patches/s with 1 worker; "
        f"{shard_bytes / 1e6:.2f} MB per sample in shards vs {raw_bytes / 1e6:.2f} MB per patch in the "
        "raw tree (superpatches hold every date of the whole zone)"
    )
    write_json(
        args.json,
        {
            "samples_per_s": rate,
            "shard_over_raw": ratio,
            "shard_over_raw_augmented": ratio_aug,
            "shard_over_webdataset": over_wds,
            "sharding_patches_per_s": count / shard_seconds,
            "shard_bytes_per_sample": shard_bytes,
            "raw_bytes_per_sample": raw_bytes,
        },
    )
    print("\n== encodings of one sample's fields (decode = decompress + np.load + cast to float32)")
    print(f"{'field':<34}{'encoding':<22}{'bytes':>12}{'ratio':>8}{'decode ms':>11}")
    baseline = {}
    for name, encoding, size, ms in encodings:
        baseline.setdefault(name, size)
        print(f"{name:<34}{encoding:<22}{size:>12}{baseline[name] / size:>7.1f}x{ms:>11.2f}")


if __name__ == "__main__":
    main()
