"""``python -m matwm_fast.profile``: the command's name; the tool lives in :mod:`matwm_fast.tools.profile`."""

import sys

from .tools.profile import main

if __name__ == "__main__":
    sys.exit(main())
