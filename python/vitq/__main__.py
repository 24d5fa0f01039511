"""``python -m vitq`` = the ``vitq`` command."""
import sys

from .cli import main

sys.exit(main())
