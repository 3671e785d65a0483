"""``python -m granet ...`` is ``granet ...``."""

import sys

from granet.cli import main

sys.exit(main())
