"""Byte format of one FLAIR-2 sample inside a WebDataset tar shard (encode and decode, no pickle).

A sample is a group of consecutive tar members sharing the key (the patch id), WebDataset-style::

    IMG_000001.aerial.npy        (5, H, W) uint8, uncompressed: the bulk of the bytes, decoded at memcpy speed
    IMG_000001.label.npy.gz      (H, W) uint8 0..12, gzip: labels are piecewise constant and shrink ~10-30x
    IMG_000001.s2.npy            (T, 10, S, S) stored int16/uint16 when the values are integers (single
                                 dates), float32 otherwise (monthly means); always decoded to float32
    IMG_000001.s2_masks.npy.gz   (T, 2, S, S) uint8 snow/cloud probabilities, gzip (mostly smooth)
    IMG_000001.meta.json         ids, CRS, transform, dates, day offsets, counts, metadata

Decoding uses ``np.load(allow_pickle=False)`` and JSON only, so a crafted shard cannot execute code, and
member names are validated (no paths, no ``..``, known extensions only).
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import re
from collections.abc import Mapping

import numpy as np
from affine import Affine

from damformer.data.flair2 import Flair2Sample
from damformer.errors import DamformerError

FORMAT_VERSION = 1
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")
EXTENSIONS = ("aerial.npy", "label.npy.gz", "s2.npy", "s2_masks.npy.gz", "meta.json")
REQUIRED = ("aerial.npy", "meta.json")


class ShardFormatError(DamformerError):
    """A shard or one of its samples does not follow the damformer shard format."""


def split_member_name(name: str, *, shard: str) -> tuple[str, str]:
    """Split ``KEY.EXT`` into (key, ext), refusing paths, unknown extensions and odd keys."""
    if "/" in name or "\\" in name or name.startswith(".") or ".." in name:
        raise ShardFormatError(f"{shard}: member {name!r}: expected a plain KEY.EXT name, found a path")
    key, _, ext = name.partition(".")
    if not KEY_PATTERN.match(key) or ext not in EXTENSIONS:
        raise ShardFormatError(
            f"{shard}: member {name!r}: expected KEY.EXT with EXT one of {', '.join(EXTENSIONS)}"
        )
    return key, ext


def _npy_bytes(array: np.ndarray, *, compress: bool) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    raw = buffer.getvalue()
    # mtime=0: identical samples give identical bytes, so re-sharding reproduces the checksums.
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw


def compact_s2(s2: np.ndarray) -> np.ndarray:
    """Store reflectances as int16/uint16 when that is lossless, else keep float32."""
    if s2.size and np.array_equal(s2, np.rint(s2)):
        low, high = float(s2.min()), float(s2.max())
        if low >= np.iinfo(np.int16).min and high <= np.iinfo(np.int16).max:
            return s2.astype(np.int16)
        if low >= 0 and high <= np.iinfo(np.uint16).max:
            return s2.astype(np.uint16)
    return s2.astype(np.float32)


def encode_sample(sample: Flair2Sample) -> dict[str, bytes]:
    """Encode a reader sample into {extension: bytes} (the key is ``sample.patch_id``)."""
    files = {"aerial.npy": _npy_bytes(sample.aerial, compress=False)}
    if sample.label is not None:
        files["label.npy.gz"] = _npy_bytes(sample.label, compress=True)
    if sample.s2 is not None:
        files["s2.npy"] = _npy_bytes(compact_s2(sample.s2), compress=False)
        files["s2_masks.npy.gz"] = _npy_bytes(sample.s2_masks, compress=True)
    meta = {
        "format": FORMAT_VERSION,
        "patch_id": sample.patch_id,
        "domain": sample.domain,
        "zone": sample.zone,
        "crs": sample.crs,
        "transform": list(sample.transform)[:6],
        "centroid": list(sample.centroid) if sample.centroid is not None else None,
        "s2_dates": [d.isoformat() for d in sample.s2_dates],
        "s2_day_offsets": sample.s2_day_offsets.tolist() if sample.s2_day_offsets is not None else None,
        "s2_num_acquisitions": sample.s2_num_acquisitions,
        "s2_num_clear": sample.s2_num_clear,
        "metadata": dict(sample.metadata),
    }
    files["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return files


_NPY_MAGIC = b"\x93NUMPY"
_HEADER_CACHE: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def _parse_npy_header(raw: bytes | memoryview) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, data offset) of npy bytes; headers repeat, so parses are cached."""
    if bytes(raw[:6]) != _NPY_MAGIC or len(raw) < 10:
        raise ValueError("not npy data (bad magic)")
    major = raw[6]
    if major == 1:
        length, start = int.from_bytes(raw[8:10], "little"), 10
    elif major == 2:
        length, start = int.from_bytes(raw[8:12], "little"), 12
    else:
        raise ValueError(f"npy version {major} is not supported")
    header = bytes(raw[start : start + length])  # bytes: a view would keep the shard's mmap alive
    parsed = _HEADER_CACHE.get(header)
    if parsed is None:
        # numpy's own header parser (safe literal evaluation, refuses object dtypes below)
        stream = io.BytesIO(raw[6 + 2 : start + length])
        read_header = (
            np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(stream)
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed (they would need pickle)")
        parsed = (dtype, tuple(shape), bool(fortran))
        if len(_HEADER_CACHE) < 1024:
            _HEADER_CACHE[header] = parsed
    return (*parsed, start + length)


def _load_npy(data: bytes | memoryview, *, compressed: bool, where: str) -> np.ndarray:
    """Decode npy bytes without copying them (the array is a read-only view of ``data``)."""
    try:
        raw = gzip.decompress(data) if compressed else data
        dtype, shape, fortran, offset = _parse_npy_header(raw)
        count = int(np.prod(shape, dtype=np.int64))
        array = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
        return array.reshape(shape, order="F" if fortran else "C")
    except (OSError, ValueError, EOFError) as exc:
        raise ShardFormatError(f"{where}: cannot decode the array: {exc}") from None


def decode_sample(files: Mapping[str, bytes], *, key: str, shard: str, masks: bool = True) -> Flair2Sample:
    """Decode {extension: bytes} back into the reader's :class:`Flair2Sample` (exactly equal arrays).

    Arrays are read-only views of the bytes (copy them before writing in place). ``masks=False`` leaves
    ``s2_masks`` None: training does not use them, and skipping them saves a decompression per sample.
    """
    where = f"{shard}: sample {key}"
    missing = [ext for ext in REQUIRED if ext not in files]
    if missing:
        raise ShardFormatError(
            f"{where}: missing {', '.join(missing)} (has {', '.join(sorted(files)) or 'nothing'})"
        )
    try:
        meta = json.loads(bytes(files["meta.json"]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardFormatError(f"{where}: meta.json is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ShardFormatError(f"{where}: meta.json format: expected {FORMAT_VERSION}, found {found}")
    if "s2.npy" in files and "s2_masks.npy.gz" not in files:
        raise ShardFormatError(f"{where}: has s2.npy but no s2_masks.npy.gz")
    aerial = _load_npy(files["aerial.npy"], compressed=False, where=f"{where} aerial.npy")
    label = None
    if "label.npy.gz" in files:
        label = _load_npy(files["label.npy.gz"], compressed=True, where=f"{where} label.npy.gz")
    s2 = s2_masks = offsets = None
    if "s2.npy" in files:
        s2 = _load_npy(files["s2.npy"], compressed=False, where=f"{where} s2.npy")
        s2 = s2.astype(np.float32, copy=False)  # integers stored when lossless (single dates)
        steps = {s2.shape[0], len(meta["s2_dates"])}
        if masks:
            s2_masks = _load_npy(files["s2_masks.npy.gz"], compressed=True, where=f"{where} s2_masks.npy.gz")
            steps.add(s2_masks.shape[0])
        offsets = np.asarray(meta["s2_day_offsets"], dtype=np.int32)
        steps.add(offsets.shape[0])
        if len(steps) != 1:
            raise ShardFormatError(f"{where}: time steps differ between s2, s2_masks and meta.json dates")
    try:
        return Flair2Sample(
            patch_id=meta["patch_id"],
            domain=meta["domain"],
            zone=meta["zone"],
            aerial=aerial,
            label=label,
            crs=meta["crs"],
            transform=Affine(*meta["transform"]),
            s2=s2,
            s2_masks=s2_masks,
            s2_dates=tuple(dt.date.fromisoformat(d) for d in meta["s2_dates"]),
            s2_day_offsets=offsets,
            s2_num_acquisitions=int(meta["s2_num_acquisitions"]),
            s2_num_clear=int(meta["s2_num_clear"]),
            centroid=tuple(meta["centroid"]) if meta["centroid"] is not None else None,
            metadata=meta["metadata"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ShardFormatError(f"{where}: meta.json lacks or mangles a field: {exc!r}") from None
