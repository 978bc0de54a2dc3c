"""``python -m matwm_fast.sweep``: the command's name; the tool lives in :mod:`matwm_fast.tools.sweep`."""

import sys

from .tools.sweep import main

if __name__ == "__main__":
    sys.exit(main())
