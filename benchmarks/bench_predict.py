"""damformer predict on large rasters: peak memory must not grow with the raster (streamed windows).

    python benchmarks/bench_predict.py                     # 4608 and 9216 px mosaics, CPU
    python benchmarks/bench_predict.py --sizes 2048 4096   # quicker

Each size is a 5-band uint8 GeoTIFF (tiled, DEFLATE) predicted by the real ``damformer predict`` in its
own process, whose peak resident set size (``ru_maxrss`` of that child alone, from ``wait4``) is
reported. The model is an aerial-only U-Net (T) MiT-b0 with random weights: memory, not accuracy.
Target: the largest raster's peak within 1.2x of the smallest's (4x the pixels for 4608 -> 9216).
Before streaming, a 4608 px mosaic peaked at 3.2 GB (about 150 bytes per pixel).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, verdict

from damformer.config import RunConfig
from damformer.models.factory import ModelConfig, build_model
from damformer.runtime.artifacts import save_checkpoint


def write_mosaic(path: Path, size: int) -> None:
    """A size x size 5-band mosaic, written in 1024-row strips (the benchmark itself stays small)."""
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 5, "dtype": "uint8",
               "crs": "EPSG:2154", "transform": from_origin(700000, 6600000, 0.2, 0.2), "tiled": True,
               "blockxsize": 256, "blockysize": 256, "compress": "deflate"}  # fmt: skip
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dataset:
        for row in range(0, size, 1024):
            rows = min(1024, size - row)
            block = rng.integers(0, 256, (5, rows, size), dtype=np.uint8)
            dataset.write(block, window=rasterio.windows.Window(0, row, size, rows))


def write_checkpoint(path: Path) -> None:
    """A checkpoint of an aerial-only model, as `damformer predict` reads it."""
    config = RunConfig(model=ModelConfig(arch="unet_t", bands="rgbne", temporal=False, backbone="mit_b0"))
    config.model.pretrained = "none"
    model = build_model(config.model)
    state = {f"student.{key}": value for key, value in model.state_dict().items()}
    save_checkpoint(
        path, {"iteration": 0, "config": config.to_dict(), "model_name": config.model.name, "uda": state}
    )


def peak_rss_of(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a child process alone."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed with exit {process.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4608, 9216], help="mosaic sides (px)")
    parser.add_argument("--window", type=int, default=512, help="sliding window (px)")
    parser.add_argument("--stride", type=int, default=512, help="step between windows (px)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        write_checkpoint(base / "checkpoint.pt")
        for size in args.sizes:
            mosaic = base / f"mosaic_{size}.tif"
            write_mosaic(mosaic, size)
            command = [sys.executable, "-m", "damformer", "-q", "predict", "--device", "cpu",
                       "--checkpoint", str(base / "checkpoint.pt"), "--src", str(mosaic),
                       "--out", str(base / f"maps_{size}"), "--window", str(args.window),
                       "--stride", str(args.stride)]  # fmt: skip
            peak, seconds = peak_rss_of(command)
            results[size] = {"peak_rss_mib": peak, "seconds": seconds, "megapixels": size * size / 1e6}
            rows.append([f"{size} x {size} px", f"{size * size / 1e6:.0f}", f"{peak:.0f}", f"{seconds:.0f}"])
            mosaic.unlink()
    print_table(
        "damformer predict, streamed: peak RSS per raster size", ["raster", "Mpx", "peak RSS MiB", "s"], rows
    )
    smallest, largest = results[min(args.sizes)], results[max(args.sizes)]
    ratio = largest["peak_rss_mib"] / smallest["peak_rss_mib"]
    sizes = f"{max(args.sizes)} / {min(args.sizes)} px"
    print(f"\npeak RSS {sizes}: {ratio:.2f}x (target <= 1.2x): {verdict(ratio, 1.2)}")
    if args.json:
        args.json.write_text(json.dumps({"sizes": results, "peak_ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
