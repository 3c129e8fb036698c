"""damformer predict: the checkpoint's model, where maps go, and maps of FLAIR-2 patches.

Two kinds of input:

- a FLAIR-2 folder (the real layout, here): every patch of the selected split and domains, with its
  own Sentinel-2 series for +T models (cropped around the patch centroid with the size the model's
  footprint implies, cloud-filtered and month-averaged as for training). Labels, when present, are
  scored: the printed mIoU is the one ``damformer evaluate`` gives on shards of the same patches.
- aerial GeoTIFFs of any size: :mod:`damformer.predict.mosaic` (streamed sliding windows).

Every check (checkpoint, bands, CRS, existing outputs) runs before any compute. Under torchrun the
inputs are split across the ranks and each rank writes its own maps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from damformer.data.classes import FLAIR_CLASSES, LandCoverClass
from damformer.eval.metrics import ConfusionMatrix, SegmentationScores, scores
from damformer.models.damformer import BAND_SETS
from damformer.models.factory import ModelConfig
from damformer.predict.geotiff import MapWriter, check_writable, write_quicklook_from
from damformer.predict.mosaic import PredictInputError, s2_crop_size
from damformer.predict.sliding import PatchPredictor
from damformer.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outputs:
    """Which files to write per input, and whether existing ones may be replaced."""

    folder: Path
    probabilities: bool = False
    quicklook: bool = False
    overwrite: bool = False

    def paths(self, stem: str) -> list[Path]:
        """The files written for one input (``stem``: its name, or its FLAIR-2 sub-path).

        Sidecars included: none of them is replaced without ``overwrite``.
        """
        paths = [self.folder / f"{stem}.tif", self.folder / f"{stem}.qml"]  # .qml: the QGIS style
        if self.probabilities:
            paths.append(self.folder / f"{stem}_proba.tif")
        if self.quicklook:
            paths.append(self.folder / f"{stem}.png")
        return paths

    def classes(self, num_classes: int) -> tuple[LandCoverClass, ...]:
        """The classes (names, colours) of a model's outputs."""
        return FLAIR_CLASSES[:num_classes]

    def write(self, stem: str, probabilities: np.ndarray, *, crs: Any, transform: Any) -> np.ndarray:
        """Write the maps of one patch from its (K, H, W) probabilities; returns the class map."""
        classes = self.classes(probabilities.shape[0])
        writer = MapWriter(
            self.folder / f"{stem}.tif",
            height=probabilities.shape[1],
            width=probabilities.shape[2],
            crs=crs,
            transform=transform,
            classes=classes,
            probabilities_path=self.folder / f"{stem}_proba.tif" if self.probabilities else None,
        )
        with writer:
            prediction = writer.write(0, 0, probabilities)
        if self.quicklook:
            write_quicklook_from(self.folder / f"{stem}.tif", self.folder / f"{stem}.png", classes)
        return prediction


# -- FLAIR-2 patches ------------------------------------------------------------------------------


def predict_flair2(
    root: Path,
    model: torch.nn.Module,
    model_config: ModelConfig,
    outputs: Outputs,
    *,
    predictor: PatchPredictor,
    split: str = "test",
    domains: Sequence[str] | None = None,
    batch_size: int = 4,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SegmentationScores | None:
    """Predict every patch of a FLAIR-2 folder into ``OUT/DOMAIN/ZONE/PRED_xxx.tif``; scores if labelled."""
    from damformer.data.flair2 import Flair2Dataset
    from damformer.data.layout import Flair2Layout
    from damformer.data.sentinel import SentinelOptions
    from damformer.loading.augment import training_sample
    from damformer.loading.collate import collate_samples

    labelled = Flair2Layout(root, split=split).labels_dir is not None
    probe = Flair2Dataset(root, split=split, domains=domains, with_labels=False, with_s2=False)
    if not probe.patches:
        raise PredictInputError(f"{root}: no {split} patches in domains {domains or 'all'}")
    first = probe[0]
    _check_bands(first.aerial.shape[0], model_config, where=str(probe.patches[0].aerial_path))
    sentinel = None
    if model_config.temporal:
        crop = s2_crop_size(model_config, first.aerial.shape[-1], abs(first.transform.a))
        sentinel = SentinelOptions(crop_size=crop)
    dataset = Flair2Dataset(
        root,
        split=split,
        domains=domains,
        sentinel=sentinel,
        with_labels=labelled,
        with_s2=model_config.temporal,
    )
    mine = list(range(rank, len(dataset), world_size))
    stems = {i: _patch_stem(dataset.patches[i]) for i in mine}
    check_writable([p for i in mine for p in outputs.paths(stems[i])], overwrite=outputs.overwrite)
    matrix = ConfusionMatrix(model_config.num_classes) if labelled else None
    chunks = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    bar = progress(chunks, desc="predict", unit="batch", total=len(chunks)) if rank == 0 else chunks
    for chunk in bar:
        samples = [dataset[i] for i in chunk]
        batch = collate_samples([training_sample(sample) for sample in samples])
        probabilities = predictor(batch).numpy()
        for index, sample, probs in zip(chunk, samples, probabilities, strict=True):
            prediction = outputs.write(stems[index], probs, crs=sample.crs, transform=sample.transform)
            if matrix is not None and sample.label is not None:
                matrix.update(torch.from_numpy(prediction)[None], torch.from_numpy(sample.label)[None])
    if matrix is None:
        return None
    total = matrix.matrix if reduce is None else reduce(matrix.matrix)
    return scores(total)


def _patch_stem(patch: Any) -> str:
    """``D004_2021/Z1_NN/PRED_000123``: the FLAIR-2 folder structure, PRED_ for IMG_."""
    name = patch.patch_id.replace("IMG_", "PRED_", 1)
    return f"{patch.domain}/{patch.zone}/{name}"


def _check_bands(found: int, model: ModelConfig, *, where: str) -> None:
    needed = max(BAND_SETS[model.bands]) + 1
    if found < needed:
        raise PredictInputError(
            f"{where}: {found} band(s), but the model ({model.name}) reads {needed} "
            f"({'R, G, B' if needed == 3 else 'R, G, B, NIR, elevation'})"
        )
