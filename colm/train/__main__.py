"""``python -m colm.train --config FILE.yaml [section.field=value ...]``; works under torchrun."""

from __future__ import annotations

import sys

from colm.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
