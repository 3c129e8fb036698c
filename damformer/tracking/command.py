"""``damformer compare`` and ``damformer ui``."""

from __future__ import annotations

import argparse
from pathlib import Path

from damformer.errors import OptionError


def compare_command(args: argparse.Namespace) -> int:
    """One table of runs (folders, or an MLflow store's experiment), IoU per class."""
    from damformer.tracking.compare import format_table, rows_from_folders, rows_from_mlflow

    if bool(args.runs) == bool(args.tracking_uri):
        raise OptionError("give run folders, or --tracking-uri (with --experiment), not both")
    if args.tracking_uri:
        rows = rows_from_mlflow(args.tracking_uri, args.experiment)
    else:
        rows = rows_from_folders(args.runs)
    print(format_table(rows))
    return 0


def ui_command(args: argparse.Namespace) -> int:
    """The MLflow UI of a runs folder's store, until Ctrl-C."""
    from damformer.tracking.ui import serve

    if not 1 <= args.port <= 65535:
        raise OptionError(
            f"--port {args.port}: expected 1..65535 (0, 'any free port', would leave this command unable to "
            "print the address it serves), e.g. --port 5001"
        )
    return serve(args.paths or [Path("runs/demo")], host=args.host, port=args.port)
