"""``python -m matwm_fast.gpucheck``: the command's name; the tool lives in :mod:`matwm_fast.tools.gpucheck`."""

import sys

from .tools.gpucheck import main

if __name__ == "__main__":
    sys.exit(main())
