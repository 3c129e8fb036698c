"""A shard set: the shard-set folders of one role (source, target, test), their manifests and shards.

:class:`ShardSet` opens one or more folders written by ``damformer shard``, keeps the shards of the
chosen domains (:class:`ShardInfo`: path, keys, size, sha256) and checks that a model can use them.
Reading the samples is the loaders' job (:mod:`damformer.loading`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from damformer.data.domains import select_domains
from damformer.data.flair2 import Flair2Sample
from damformer.errors import ConfigError, DamformerError
from damformer.shards.format import ShardFormatError, decode_sample
from damformer.shards.manifest import load_manifest
from damformer.shards.tario import iter_tar_samples, sha256_file


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a set: where it is, which sample keys it holds (in order), its size and sha256."""

    path: Path
    domain: str
    keys: tuple[str, ...]
    size: int | None = None
    sha256: str | None = None

    def verify(self) -> None:
        """Check the shard's size and sha256 against its manifest (a flipped byte is caught here).

        Raises:
            ShardFormatError: naming the shard, what the manifest says and what was found.
        """
        found = self.path.stat().st_size if self.path.is_file() else None
        if found is None:
            raise ShardFormatError(f"{self.path}: shard listed in the manifest is missing")
        if self.size is not None and found != self.size:
            raise ShardFormatError(f"{self.path}: size: expected {self.size} bytes (manifest), found {found}")
        if self.sha256 is not None and (digest := sha256_file(self.path)) != self.sha256:
            raise ShardFormatError(
                f"{self.path}: sha256 mismatch: expected {self.sha256} (manifest), found {digest}: the shard "
                "changed after it was written; re-run damformer shard (it rewrites what fails), or set "
                "data.on_error=skip to train without it"
            )


class ShardSet:
    """The shards of one or more shard-set folders, optionally restricted to some domains.

    Args:
        dirs: shard-set folders (each with a manifest.json).
        domains: ids, prefixes or presets to keep (see :func:`select_domains`); None keeps all.
    """

    def __init__(
        self, dirs: Path | str | Sequence[Path | str], *, domains: Sequence[str] | None = None
    ) -> None:
        folders = [Path(dirs)] if isinstance(dirs, str | Path) else [Path(d) for d in dirs]
        self.manifests = [load_manifest(folder) for folder in folders]
        available = sorted({d for m in self.manifests for d in m["domains"]})
        chosen = set(select_domains(available, domains))
        self.shards = [
            ShardInfo(
                folder / shard["name"],
                shard["domain"],
                tuple(shard["keys"]),
                shard.get("bytes"),
                shard.get("sha256"),
            )
            for folder, manifest in zip(folders, self.manifests, strict=True)
            for shard in manifest["shards"]
            if shard["domain"] in chosen
        ]
        if not self.shards:
            raise DamformerError(
                f"{', '.join(map(str, folders))}: no shard left for domains {sorted(chosen)}"
            )
        self.domains = sorted(chosen)

    @property
    def num_samples(self) -> int:
        """Number of samples over all selected shards."""
        return sum(len(s.keys) for s in self.shards)

    def check_fits(self, model: Any, *, role: str, labels: bool, folders: Sequence[Path | str]) -> None:
        """Refuse (before any compute) a shard set whose classes, labels or Sentinel-2 a model cannot use.

        Args:
            model: the :class:`damformer.models.factory.ModelConfig`.
            role: how the caller names this set in messages (``data.source``, ``--shards``).
            labels: whether the set must be labelled (training sources, evaluation).
            folders: the set's folders, in the order of its manifests.

        Raises:
            ConfigError: naming the folder, what the model needs and what the shards hold.
        """
        for folder, manifest in zip(folders, self.manifests, strict=True):
            params = manifest["params"]
            classes = len(manifest["class_pixels"]) or None
            if classes is not None and classes != model.num_classes:
                raise ConfigError(
                    f"{role}: {folder} holds {classes} classes, model.num_classes is {model.num_classes}"
                )
            if labels and not params["with_labels"]:
                raise ConfigError(
                    f"{role}: {folder} was sharded without labels (--no-labels): this needs a labelled set"
                )
            if model.temporal and not params["with_s2"]:
                raise ConfigError(
                    f"{role}: {folder} has no Sentinel-2 (--no-s2) but the model is +T (model.temporal)"
                )

    def sample(self, key: str) -> Flair2Sample:
        """Decode the sample ``key`` (a patch id) from the shard that holds it."""
        for shard in self.shards:
            if key not in shard.keys:
                continue
            for found, files in iter_tar_samples(shard.path, shard=shard.path.name):
                if found == key:
                    return decode_sample(files, key=key, shard=shard.path.name, masks=False)
        raise DamformerError(
            f"{key}: no such sample in {', '.join(sorted({str(s.path.parent) for s in self.shards}))}"
        )

    def class_pixels(self) -> dict[str, list[int]]:
        """Per-sample class pixel counts from the manifests (labelled sets), by patch id."""
        counts = {}
        for manifest in self.manifests:
            for key, info in manifest["samples"].items():
                if info.get("class_pixels") is not None and info["domain"] in self.domains:
                    counts[key] = info["class_pixels"]
        return counts

    def first_sample(self) -> Flair2Sample:
        """Decode the first sample of the first shard (shapes and georeferencing, before training)."""
        shard = self.shards[0]
        for key, files in iter_tar_samples(shard.path, shard=shard.path.name):
            return decode_sample(files, key=key, shard=shard.path.name, masks=False)
        raise ShardFormatError(f"{shard.path}: holds no sample")
