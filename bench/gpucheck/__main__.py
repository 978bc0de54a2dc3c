"""``python -m bench.gpucheck``: the runner of :mod:`bench.gpucheck.check`."""

import sys

from .check import main

if __name__ == "__main__":
    sys.exit(main())
