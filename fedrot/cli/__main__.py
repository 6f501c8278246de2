"""``python -m fedrot.cli``: the same as the ``fedrot`` console script."""

from fedrot.cli import main

raise SystemExit(main())
