"""``python -m matwm_fast.plot``: the command's name; the tool lives in :mod:`matwm_fast.tools.plot`."""

import sys

from .tools.plot import main

if __name__ == "__main__":
    sys.exit(main())
