"""Write land-cover maps that open correctly in QGIS: class GeoTIFF, probabilities, quicklook.

- Classes: single-band uint8 with the input's CRS and transform, DEFLATE-compressed, tiled, a colour
  table with the 13 FLAIR colours, the class names as band metadata, and a QGIS style sidecar
  (``NAME.qml``, loaded automatically by QGIS) that names each value in the legend.
- Probabilities: one band per class, stored as 16-bit floats (GDAL's ``NBITS=16`` on Float32: rasterio
  1.4 / GDAL 3.10 have no Float16 type), read back as float32.
- Quicklook: a PNG of the colourised map.

Every file is written to a temporary name and renamed, so a crash never leaves a half-written map.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np
import rasterio
from affine import Affine

from damformer.data.classes import LandCoverClass
from damformer.errors import DamformerError


class OutputExistsError(DamformerError):
    """An output file exists and --overwrite was not given."""


def _block(size: int) -> int | None:
    """The largest tile side <= 256 that is a multiple of 16 and fits; None for tiny rasters (strips)."""
    block = min(256, size - size % 16)
    return block if block >= 16 else None


def _profile(width: int, height: int, count: int, dtype: str, crs: str | None, transform: Affine) -> dict:
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": dtype,
        "crs": crs,
        "transform": transform,
        "compress": "deflate",
    }
    blocks = _block(width), _block(height)
    if None not in blocks:
        profile.update(tiled=True, blockxsize=blocks[0], blockysize=blocks[1])
    return profile


def check_writable(paths: Sequence[Path], *, overwrite: bool) -> None:
    """Refuse (before any compute) to replace existing outputs unless ``overwrite``."""
    existing = [path for path in paths if path.exists()]
    if existing and not overwrite:
        shown = ", ".join(str(path) for path in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise OutputExistsError(
            f"{len(existing)} output file(s) exist ({shown}): pass --overwrite to replace them, or choose "
            "another --out"
        )


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def qml_style(classes: Sequence[LandCoverClass]) -> str:
    """A QGIS paletted-raster style naming and colouring each class value."""
    entries = "\n".join(
        f'          <paletteEntry value="{cls.index}" label={quoteattr(cls.name)} '
        f'color="#{cls.rgb[0]:02x}{cls.rgb[1]:02x}{cls.rgb[2]:02x}" alpha="255"/>'
        for cls in classes
    )
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.28" styleCategories="Symbology">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1">
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
  </pipe>
</qgis>
"""


def write_class_map(
    path: Path,
    classes_map: np.ndarray,
    *,
    crs: str | None,
    transform: Affine,
    classes: Sequence[LandCoverClass],
) -> Path:
    """The (H, W) class indices as a georeferenced uint8 GeoTIFF, with colour table and QGIS style."""
    height, width = classes_map.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with rasterio.open(tmp, "w", **_profile(width, height, 1, "uint8", crs, transform)) as dataset:
            dataset.write(classes_map.astype(np.uint8, copy=False), 1)
            dataset.write_colormap(1, {cls.index: (*cls.rgb, 255) for cls in classes})
            dataset.set_band_description(1, "land cover class (FLAIR 13 classes)")
            dataset.update_tags(1, **{f"CLASS_{cls.index}": cls.name for cls in classes})
            dataset.update_tags(CLASS_NAMES=",".join(cls.name for cls in classes))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    style = path.with_suffix(".qml")
    style_tmp = _temporary(style)
    style_tmp.write_text(qml_style(classes))
    style_tmp.replace(style)
    return path


def write_probabilities(
    path: Path,
    probabilities: np.ndarray,
    *,
    crs: str | None,
    transform: Affine,
    classes: Sequence[LandCoverClass],
) -> Path:
    """(K, H, W) class probabilities, one band per class named after it, 16-bit floats on disk."""
    count, height, width = probabilities.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    profile = _profile(width, height, count, "float32", crs, transform)
    profile.update(nbits=16, predictor=3)  # half floats; the floating-point predictor helps DEFLATE
    try:
        with rasterio.open(tmp, "w", **profile) as dataset:
            dataset.write(probabilities.astype(np.float32, copy=False))
            for band, cls in enumerate(classes[:count], start=1):
                dataset.set_band_description(band, f"P({cls.name})")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_quicklook(path: Path, classes_map: np.ndarray, classes: Sequence[LandCoverClass]) -> Path:
    """A PNG of the colourised map (no georeference; for a quick look)."""
    from PIL import Image

    from damformer.tracking.figures import colourise

    tmp = _temporary(path)
    try:
        Image.fromarray(colourise(classes_map, classes)).save(tmp, format="PNG")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
