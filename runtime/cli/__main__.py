"""``python -m diffrt.cli``: the ``diffrt`` command."""

import sys

from . import main

sys.exit(main())
