"""``python -m bettertransformer``: the command line, as the ``bettertransformer`` script runs it."""

from .cli import main

raise SystemExit(main())
