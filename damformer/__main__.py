"""Allow ``python -m damformer`` (and ``torchrun -m damformer``)."""

from damformer.cli import main

raise SystemExit(main())
