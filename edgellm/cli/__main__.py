"""`python -m edgellm.cli`: the same entry point as the `edgellm` script."""
from .main import main

raise SystemExit(main())
