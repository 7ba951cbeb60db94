"""``python -m service.cli`` is the ``dare`` command."""
from service.cli.main import main

raise SystemExit(main())
