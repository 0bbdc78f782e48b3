"""``python -m injflow_ext`` runs the ``injflow`` command line."""

import sys

from .cli import main

sys.exit(main())
