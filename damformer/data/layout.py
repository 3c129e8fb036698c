"""Where FLAIR-2 keeps its files, and the discovery of patches in that layout.

Standard layout (flair2-format.md)::

    ROOT/flair_aerial_train/D004_2021/Z1_NN/img/IMG_000001.tif
    ROOT/flair_labels_train/D004_2021/Z1_NN/msk/MSK_000001.tif
    ROOT/flair_sen_train/D004_2021/Z1_NN/sen/SEN2_sp_D004_2021-Z1_NN_{data.npy,masks.npy,products.txt}
    ROOT/flair-2_centroids_sp_to_patch.json
    ROOT/flair_aerial_metadata.json

The test split uses ``flair_2_{aerial,labels,sen}_test``. The toy release nests the same tree under
``flair_2_toy_dataset/flair_2_toy_*``; the model-hub release keeps the JSON files under ``aux-data/``.
Each folder and JSON file can also be given explicitly.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from damformer.data.domains import DOMAIN_PATTERN, select_domains
from damformer.errors import DataFormatError, DataLayoutError

log = logging.getLogger(__name__)

Split = Literal["train", "test"]

ZONE_PATTERN = re.compile(r"^Z\d+_[A-Za-z0-9]+$")
# IMG_000001.tif; copies made on some systems say .TIF or .tiff: the same patch, never skipped.
AERIAL_PATTERN = re.compile(r"^IMG_(\d+)\.tiff?$", re.IGNORECASE)
_TIFF_SUFFIXES = (".tif", ".TIF", ".tiff", ".TIFF")

_FOLDER_CANDIDATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("aerial", "train"): ("flair_aerial_train", "flair_2_aerial_train", "flair_2_toy_aerial_train"),
    ("labels", "train"): ("flair_labels_train", "flair_2_labels_train", "flair_2_toy_labels_train"),
    ("sen", "train"): ("flair_sen_train", "flair_2_sen_train", "flair_2_toy_sen_train"),
    ("aerial", "test"): ("flair_2_aerial_test", "flair_aerial_test", "flair_2_toy_aerial_test"),
    ("labels", "test"): ("flair_2_labels_test", "flair_labels_test", "flair_2_toy_labels_test"),
    ("sen", "test"): ("flair_2_sen_test", "flair_sen_test", "flair_2_toy_sen_test"),
}
CENTROIDS_NAMES = ("flair-2_centroids_sp_to_patch.json",)
METADATA_NAMES = ("flair_aerial_metadata.json", "metadata_aerial.json", "flair-2_aerial_metadata.json")
_JSON_SUBFOLDERS = ("", "aux-data", "flair_2_toy_dataset")
_MAX_LISTED = 5


@dataclass(frozen=True)
class PatchRef:
    """One aerial patch found on disk, with the paths of its companions (nothing is read yet).

    Attributes:
        patch_id: file stem, e.g. ``IMG_000001`` (the key of the metadata JSON).
        number: the patch number as an integer (patches sort by it, not by the string).
        domain: ``D{ddd}_{yyyy}``; zone: ``Z{n}_{code}``.
        aerial_path, label_path: the GeoTIFFs (label_path None when labels are not read).
        sen_zone_dir: the zone's Sentinel-2 folder (None when Sentinel-2 is not read).
    """

    patch_id: str
    number: int
    domain: str
    zone: str
    aerial_path: Path
    label_path: Path | None
    sen_zone_dir: Path | None

    @property
    def zone_key(self) -> str:
        """``D004_2021-Z1_NN``: the zone's unique name (as in the Sentinel-2 file names)."""
        return f"{self.domain}-{self.zone}"

    @property
    def centroid_key(self) -> str:
        """Key of this patch in the centroid JSON (file name with ``.tif``)."""
        return f"{self.patch_id}.tif"


@dataclass(frozen=True)
class ZoneS2Files:
    """The three Sentinel-2 files of one zone."""

    data: Path
    masks: Path
    products: Path


def _label_file(msk_dir: Path, digits: str) -> Path:
    """``MSK_<digits>.tif`` in ``msk_dir``, with any case of the extension (the .tif name when absent)."""
    for suffix in _TIFF_SUFFIXES:
        for prefix in ("MSK_", "msk_"):
            candidate = msk_dir / f"{prefix}{digits}{suffix}"
            if candidate.is_file():
                return candidate
    return msk_dir / f"MSK_{digits}.tif"


def _list_missing(paths: Sequence[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:_MAX_LISTED])
    more = f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
    return shown + more


class Flair2Layout:
    """Resolves the folders and JSON files of a FLAIR-2 copy and discovers its patches.

    Args:
        root: the dataset folder.
        split: ``train`` (train + val domains) or ``test``.
        aerial_dir, labels_dir, sen_dir: explicit folders (absolute, or relative to ``root``).
        centroids_json, metadata_json: explicit JSON paths (absolute, or relative to ``root``).

    Raises:
        DataLayoutError: ``root`` or the aerial folder does not exist.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        split: Split = "train",
        aerial_dir: Path | str | None = None,
        labels_dir: Path | str | None = None,
        sen_dir: Path | str | None = None,
        centroids_json: Path | str | None = None,
        metadata_json: Path | str | None = None,
    ) -> None:
        self.root = Path(root)
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', found {split!r}")
        self.split: Split = split
        if not self.root.is_dir():
            raise DataLayoutError(f"{self.root}: dataset folder does not exist")
        self.aerial_dir = self._folder("aerial", aerial_dir)
        if self.aerial_dir is None:
            raise DataLayoutError(self._missing_folder_message("aerial", "--aerial-dir"))
        self.labels_dir = self._folder("labels", labels_dir)
        self.sen_dir = self._folder("sen", sen_dir)
        self._explicit_centroids = centroids_json is not None
        self._explicit_metadata = metadata_json is not None
        self.centroids_json = self._json_file(CENTROIDS_NAMES, centroids_json)
        self.metadata_json = self._json_file(METADATA_NAMES, metadata_json)

    # ------------------------------------------------------------------ paths
    def _resolve(self, path: Path | str) -> Path:
        path = Path(path)
        return path if path.is_absolute() else self.root / path

    def _candidates(self, kind: str) -> list[Path]:
        names = _FOLDER_CANDIDATES[(kind, self.split)]
        return [self.root / name for name in names] + [self.root / "flair_2_toy_dataset" / n for n in names]

    def _folder(self, kind: str, explicit: Path | str | None) -> Path | None:
        if explicit is not None:
            path = self._resolve(explicit)
            if not path.is_dir():
                raise DataLayoutError(f"{path}: {kind} folder given explicitly does not exist")
            return path
        return next((p for p in self._candidates(kind) if p.is_dir()), None)

    def _missing_folder_message(self, kind: str, option: str) -> str:
        tried = ", ".join(p.name for p in self._candidates(kind)[:3])
        return (
            f"{self.root}: no {kind} folder for split '{self.split}': expected one of {tried} "
            f"(or the flair_2_toy_dataset/ equivalents); pass {option} if yours is named otherwise"
        )

    def _json_file(self, names: Sequence[str], explicit: Path | str | None) -> Path | None:
        if explicit is not None:
            path = self._resolve(explicit)
            if not path.is_file():
                raise DataLayoutError(f"{path}: JSON file given explicitly does not exist")
            return path
        for sub in _JSON_SUBFOLDERS:
            for name in names:
                path = self.root / sub / name
                if path.is_file():
                    return path
        return None

    def require_labels_dir(self) -> Path:
        """Return the labels folder or raise a clear error naming what was looked for."""
        if self.labels_dir is None:
            raise DataLayoutError(self._missing_folder_message("labels", "--labels-dir"))
        return self.labels_dir

    def require_sen_dir(self) -> Path:
        """Return the Sentinel-2 folder or raise a clear error naming what was looked for."""
        if self.sen_dir is None:
            raise DataLayoutError(self._missing_folder_message("sen", "--sen-dir"))
        return self.sen_dir

    # ------------------------------------------------------------- discovery
    def domains(self) -> list[str]:
        """Domain folders (``D{ddd}_{yyyy}``) present in the aerial folder, sorted."""
        found = []
        for child in sorted(self.aerial_dir.iterdir()):
            if child.is_dir() and DOMAIN_PATTERN.match(child.name):
                found.append(child.name)
            elif child.is_dir():
                log.debug("ignoring folder %s: not a domain name D{ddd}_{yyyy}", child)
        return found

    def discover(
        self, domains: Sequence[str] | None = None, *, with_labels: bool = True, with_s2: bool = True
    ) -> list[PatchRef]:
        """Find the patches of the selected domains and check that their companion files exist.

        Args:
            domains: ids, prefixes or presets (see :func:`select_domains`); None = all.
            with_labels: require a label GeoTIFF for every patch.
            with_s2: require the zone's Sentinel-2 data/masks/products for every patch.

        Returns:
            Patches sorted by domain, zone and patch number.

        Raises:
            DomainSelectionError: unknown domain ids.
            DataLayoutError: no patch found, or companion files missing (all of them are listed).
        """
        selected = select_domains(self.domains(), domains)
        labels_dir = self.require_labels_dir() if with_labels else None
        sen_dir = self.require_sen_dir() if with_s2 else None
        patches: list[PatchRef] = []
        missing_labels: list[Path] = []
        for domain in selected:
            domain_patches = 0
            for zone_dir in sorted(p for p in (self.aerial_dir / domain).iterdir() if p.is_dir()):
                if not ZONE_PATTERN.match(zone_dir.name):
                    log.debug("ignoring folder %s: not a zone name Z{n}_{code}", zone_dir)
                    continue
                zone = zone_dir.name
                img_dir = zone_dir / "img"
                if not img_dir.is_dir():
                    raise DataLayoutError(
                        f"{zone_dir}: zone folder has no img/ subfolder with IMG_*.tif patches"
                    )
                found = []
                for path in img_dir.iterdir():
                    match = AERIAL_PATTERN.match(path.name)
                    if match:
                        found.append((int(match.group(1)), match.group(1), path))
                for number, digits, path in sorted(found):
                    label_path = None
                    if labels_dir is not None:
                        label_path = _label_file(labels_dir / domain / zone / "msk", digits)
                        if not label_path.is_file():
                            missing_labels.append(label_path)
                    sen_zone_dir = sen_dir / domain / zone / "sen" if sen_dir is not None else None
                    patch_id = f"IMG_{digits}"  # the key of the JSON files, whatever the file name's case
                    patches.append(PatchRef(patch_id, number, domain, zone, path, label_path, sen_zone_dir))
                    domain_patches += 1
            if domain_patches == 0:
                log.warning("domain %s has no IMG_*.tif patch under %s", domain, self.aerial_dir / domain)
        if missing_labels:
            raise DataLayoutError(
                f"{len(missing_labels)} label file(s) missing for aerial patches: "
                f"{_list_missing(missing_labels)}"
            )
        if not patches:
            raise DataLayoutError(
                f"{self.aerial_dir}: no aerial patch found (expected DOMAIN/ZONE/img/IMG_<n>.tif) "
                f"in domains {', '.join(selected)}"
            )
        duplicates = _duplicate_ids(patches)
        if duplicates:
            raise DataLayoutError(
                f"{self.aerial_dir}: patch ids present in several zones: {', '.join(duplicates)}"
            )
        return patches

    def zone_s2_files(self, patch: PatchRef) -> ZoneS2Files:
        """Locate the Sentinel-2 data, masks and products files of a patch's zone.

        The exact FLAIR-2 names (``SEN2_sp_{domain}-{zone}_*``, hyphen between domain and zone) are tried
        first, then a glob on ``*data.npy`` etc. as the baseline does.

        Raises:
            DataLayoutError: a file is missing, or the glob is ambiguous.
        """
        if patch.sen_zone_dir is None:
            raise DataLayoutError(f"{patch.aerial_path}: Sentinel-2 was not requested for this dataset")
        folder = patch.sen_zone_dir
        stem = f"SEN2_sp_{patch.zone_key}"
        located = {}
        for suffix in ("data.npy", "masks.npy", "products.txt"):
            exact = folder / f"{stem}_{suffix}"
            if exact.is_file():
                located[suffix] = exact
                continue
            matches = sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []
            if len(matches) == 1:
                located[suffix] = matches[0]
            elif not matches:
                raise DataLayoutError(
                    f"{exact}: Sentinel-2 {suffix} file missing for zone {patch.zone_key} "
                    f"(needed by {patch.patch_id}; no *{suffix} in {folder})"
                )
            else:
                raise DataLayoutError(
                    f"{folder}: several *{suffix} files ({', '.join(m.name for m in matches)}); "
                    f"expected exactly {stem}_{suffix}"
                )
        return ZoneS2Files(located["data.npy"], located["masks.npy"], located["products.txt"])

    # ----------------------------------------------------------------- JSON
    def load_centroids(self) -> dict[str, Any]:
        """Load the centroid JSON (patch file name -> [row, col] in the zone's superpatch)."""
        if self.centroids_json is None:
            raise DataLayoutError(
                f"{self.root}: centroid JSON not found (looked for {CENTROIDS_NAMES[0]} in the root, "
                "aux-data/ "
                "and flair_2_toy_dataset/); pass --centroids-json"
            )
        return _load_json_object(self.centroids_json)

    def load_metadata(self) -> dict[str, Any]:
        """Load the per-patch metadata JSON, or an empty dict (with a warning) when there is none."""
        if self.metadata_json is None:
            log.warning(
                "%s: no aerial metadata JSON (%s); samples carry no metadata", self.root, METADATA_NAMES[0]
            )
            return {}
        return _load_json_object(self.metadata_json)


def _load_json_object(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{path}: cannot parse JSON: {exc}") from None
    if not isinstance(content, dict):
        raise DataFormatError(f"{path}: expected a JSON object at top level, found {type(content).__name__}")
    return content


def _duplicate_ids(patches: Sequence[PatchRef]) -> list[str]:
    seen: set[str] = set()
    duplicates = []
    for patch in patches:
        if patch.patch_id in seen:
            duplicates.append(patch.patch_id)
        seen.add(patch.patch_id)
    return duplicates[:_MAX_LISTED]
