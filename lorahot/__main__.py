"""``python -m lorahot inspect PATH_OR_REPO`` (the same as the ``lorahot`` console script)."""

from lorahot.cli import main

raise SystemExit(main())
