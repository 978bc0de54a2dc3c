"""``python -m matwm_fast.diagnose``: the command's name; the tool lives in :mod:`matwm_fast.tools.diagnose`."""

import sys

from .tools.diagnose import main

if __name__ == "__main__":
    sys.exit(main())
