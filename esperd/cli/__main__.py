"""`python -m esperd.cli`: the same as the `esperd` console script."""

from __future__ import annotations

import sys

from esperd.cli.main import main

sys.exit(main())
