"""``python -m continual.cli``: the same as the ``continual`` command."""

from __future__ import annotations

import sys

from continual.cli import main

sys.exit(main())
