"""Print the demo's results table from the runs' scores.json files (used by launch/demo.sh)."""

import json
import sys
from pathlib import Path

ROWS = [
    ("source_only", "U-Net (T) RGB+NIR+E, source only"),
    ("uda", "U-Net (T) RGB+NIR+E, UDA self-training"),
    ("damformer", "DAM-Former RGB+NIR+E+T, UDA + ML + EP"),
]


def main() -> None:
    """Print one line per run: target (north) test mIoU and accuracy."""
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    print(f"\n{'south -> north (target test split)':<42}{'mIoU':>8}{'accuracy':>10}")
    for folder, label in ROWS:
        path = runs / folder / "scores.json"
        if not path.is_file():
            print(f"{label:<42}{'(missing)':>18}")
            continue
        scores = json.loads(path.read_text())
        print(f"{label:<42}{100 * scores['miou']:>8.2f}{100 * scores['accuracy']:>10.2f}")


if __name__ == "__main__":
    main()
