"""``python -m igc_convert`` works like the ``igc-convert`` command."""

import sys

from .cli import main

sys.exit(main())
