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

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import rasterio
import rasterio.enums
import rasterio.windows
from affine import Affine
from rasterio.enums import Resampling

from damformer.atomic import atomic_path, atomic_write_bytes
from damformer.data.classes import LandCoverClass
from damformer.errors import OutputExistsError

log = logging.getLogger(__name__)


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


CLASS_NODATA = 255  # class maps: pixels whose input was nodata (probabilities: NaN)


class MapWriter:
    """Write a class map (and optionally its probabilities) block by block, atomically.

    Files are created under hidden temporary names with their final size, georeference, colour table
    and nodata; :meth:`write` fills any rectangle; leaving the ``with`` block without an error renames
    them into place (and writes the QGIS style), an error removes them. Blocks of whole tiles keep
    DEFLATE's output compact; GDAL's block cache is capped so memory stays bounded.

    Args:
        path: the class map (``NAME.tif``); probabilities go to ``probabilities_path``.
        height, width, crs, transform: the input raster's grid.
        classes: the classes (names, colours) of the map's values.
        nodata: mark pixels without input data (``CLASS_NODATA`` in the map, NaN in probabilities).
    """

    def __init__(
        self,
        path: Path,
        *,
        height: int,
        width: int,
        crs: str | None,
        transform: Affine,
        classes: Sequence[LandCoverClass],
        probabilities_path: Path | None = None,
        nodata: bool = False,
    ) -> None:
        self.path, self.probabilities_path = path, probabilities_path
        self.classes = classes
        self.shape = (height, width)
        self.crs, self.transform, self.nodata = crs, transform, nodata
        self._files: list[rasterio.io.DatasetWriter] = []
        self._stack = contextlib.ExitStack()  # the GDAL settings and each file's atomic_path

    def __enter__(self) -> MapWriter:
        self._stack.enter_context(rasterio.Env(GDAL_CACHEMAX=64))  # MB: finished tiles go to disk, not RAM
        height, width = self.shape
        try:
            profile = _profile(width, height, 1, "uint8", self.crs, self.transform)
            profile.update(photometric="palette")  # at creation: GDAL cannot change it while writing
            if self.nodata:
                profile["nodata"] = CLASS_NODATA
            classes_file = self._open(self.path, profile)
            classes_file.write_colormap(1, {cls.index: (*cls.rgb, 255) for cls in self.classes})
            classes_file.set_band_description(1, "land cover class (FLAIR 13 classes)")
            classes_file.update_tags(1, **{f"CLASS_{cls.index}": cls.name for cls in self.classes})
            classes_file.update_tags(CLASS_NAMES=",".join(cls.name for cls in self.classes))
            if self.probabilities_path is not None:
                profile = _profile(width, height, len(self.classes), "float32", self.crs, self.transform)
                profile.update(
                    nbits=16, predictor=3
                )  # half floats; the floating-point predictor helps DEFLATE
                if self.nodata:
                    profile["nodata"] = float("nan")
                probabilities_file = self._open(self.probabilities_path, profile)
                for band, cls in enumerate(self.classes, start=1):
                    probabilities_file.set_band_description(band, f"P({cls.name})")
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _open(self, path: Path, profile: dict) -> rasterio.io.DatasetWriter:
        tmp = self._stack.enter_context(atomic_path(path))  # renamed into place when the stack closes
        dataset = rasterio.open(tmp, "w", **profile)
        self._files.append(dataset)
        return dataset

    def write(
        self, row: int, col: int, probabilities: np.ndarray, valid: np.ndarray | None = None
    ) -> np.ndarray:
        """Write (K, h, w) probabilities at (row, col); ``valid`` (h, w) bool marks pixels with data.

        Returns the block's class map (``CLASS_NODATA`` where not valid).
        """
        height, width = probabilities.shape[1:]
        window = rasterio.windows.Window(col, row, width, height)
        prediction = probabilities.argmax(axis=0).astype(np.uint8)
        if valid is not None:
            prediction[~valid] = CLASS_NODATA
        self._files[0].write(prediction, 1, window=window)
        if self.probabilities_path is not None:
            values = probabilities.astype(np.float32, copy=True)
            if valid is not None:
                values[:, ~valid] = np.nan
            self._files[1].write(values, window=window)
        return prediction

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, trace: object) -> None:
        if kind is None:  # overviews: QGIS zooms out on a large map without reading every pixel
            factors = overview_factors(*self.shape)
            if factors:
                self._files[0].build_overviews(factors, Resampling.mode)  # a class per pixel, never a mean
                for dataset in self._files[1:]:
                    dataset.build_overviews(factors, Resampling.average)
        for dataset in self._files:  # closed before the rename (or the removal, after an error)
            dataset.close()
        self._files.clear()
        self._stack.__exit__(kind, value, trace)  # success: rename into place; error: remove
        if kind is None:
            atomic_write_bytes(self.path.with_suffix(".qml"), qml_style(self.classes).encode())


def overview_factors(height: int, width: int, smallest: int = 32) -> list[int]:
    """Decimation factors 2, 4, 8 ... while the overview keeps at least ``smallest`` pixels a side."""
    factors, factor = [], 2
    while max(height, width) // factor >= smallest:
        factors.append(factor)
        factor *= 2
    return factors


def write_vrt(maps: Sequence[Path], path: Path) -> Path | None:
    """``path``: one VRT mosaic of class maps of one CRS and pixel size (None when they are not alike).

    QGIS or GDAL open the whole area as one layer, with the maps' colour table; the maps are referenced
    by relative paths, so the folder can move.
    """
    if len(maps) < 2:
        return None
    grids = []
    for map_path in maps:
        with rasterio.open(map_path) as dataset:
            grids.append((map_path, dataset.crs, dataset.transform, dataset.width, dataset.height))
            colours = dataset.colormap(1)
    crs, first = grids[0][1], grids[0][2]
    if any(g[1] != crs or (g[2].a, g[2].e) != (first.a, first.e) for g in grids):
        log.warning("%s: not written: the maps differ in CRS or pixel size", path)
        return None
    west = min(g[2].c for g in grids)
    north = max(g[2].f for g in grids)
    east = max(g[2].c + g[3] * g[2].a for g in grids)
    south = min(g[2].f + g[4] * g[2].e for g in grids)
    width, height = round((east - west) / first.a), round((south - north) / first.e)
    lines = [
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
        f"  <SRS>{escape(crs.to_wkt())}</SRS>",
        f"  <GeoTransform>{west!r}, {first.a!r}, 0, {north!r}, 0, {first.e!r}</GeoTransform>",
        '  <VRTRasterBand dataType="Byte" band="1">',
        f"    <NoDataValue>{CLASS_NODATA}</NoDataValue>",
        "    <ColorInterp>Palette</ColorInterp>",
        "    <ColorTable>",
        *(
            f'      <Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>'
            for _, (r, g, b, a) in sorted(colours.items())
        ),
        "    </ColorTable>",
    ]
    for map_path, _, transform, map_width, map_height in grids:
        col, row = round((transform.c - west) / first.a), round((transform.f - north) / first.e)
        relative = os.path.relpath(map_path, path.parent)
        lines += [
            "    <SimpleSource>",
            f'      <SourceFilename relativeToVRT="1">{escape(relative)}</SourceFilename>',
            "      <SourceBand>1</SourceBand>",
            f'      <SrcRect xOff="0" yOff="0" xSize="{map_width}" ySize="{map_height}"/>',
            f'      <DstRect xOff="{col}" yOff="{row}" xSize="{map_width}" ySize="{map_height}"/>',
            "    </SimpleSource>",
        ]
    lines += ["  </VRTRasterBand>", "</VRTDataset>"]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


QUICKLOOK_SIDE = 2048  # pixels: a quicklook of a large map is read decimated, never whole


def write_quicklook_from(map_path: Path, path: Path, classes: Sequence[LandCoverClass]) -> Path:
    """A PNG of the colourised class map at ``map_path``, at most QUICKLOOK_SIDE pixels a side."""
    from PIL import Image

    from damformer.eval.figures import colourise

    with rasterio.open(map_path) as dataset:
        scale = max(1.0, max(dataset.height, dataset.width) / QUICKLOOK_SIDE)
        shape = (max(1, round(dataset.height / scale)), max(1, round(dataset.width / scale)))
        classes_map = dataset.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
    with atomic_path(path) as tmp:
        Image.fromarray(colourise(classes_map, classes)).save(tmp, format="PNG")
    return path
