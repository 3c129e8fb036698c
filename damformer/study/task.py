"""The arguments of one Slurm array task of a study, NUL-separated on stdout (for slurm/train.sh).

    python -m damformer.study.task OUTPUT/slurm/tasks-....json "$SLURM_ARRAY_TASK_ID"

NUL separation keeps every argument intact (paths and values with spaces), with no shell parsing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from damformer.errors import DamformerError
from damformer.study.runner import task_arguments


def main(argv: list[str] | None = None) -> int:
    """Print the task's arguments; exit 2 with one line on a bad file or index."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m damformer.study.task TASK_FILE INDEX", file=sys.stderr)
        return 2
    try:
        arguments = task_arguments(Path(args[0]), int(args[1]))
    except DamformerError as exc:
        print(f"damformer study task: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write("\0".join(arguments) + "\0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
