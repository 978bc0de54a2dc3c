"""matwm_fast: a fast, faithful MATWM (multi-agent transformer world model) for PettingZoo MPE2.

The algorithm core is the modules of this package (env, replay, world model, transformer,
imagination, actor-critic, losses, steps, trainer); ``matwm_fast.tools`` holds the tooling
(sweep, profile, plot) and ``matwm_fast.kernels`` the Triton kernels.  The GPU check and the
research scripts (``diagnose``, the tuning runs) are tooling of the checkout, not of the package
(``bench/gpucheck``, ``bench/experiments``).

The kernels live in the repository's top-level ``kernels/`` folder.  An installed package gets
them as ``matwm_fast.kernels`` through setuptools' ``package-dir`` mapping (so nothing named
plain ``kernels`` lands in site-packages, where PyPI's unrelated package of that name lives).  A
source checkout used without installing (``PYTHONPATH=repo``) has no such mapping, so the same
folder is loaded here under the same name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__version__ = "0.2.0"


def _load_kernels_from_checkout() -> None:
    name = f"{__name__}.kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return  # installed (wheel or editable): the mapping provides it
    src = Path(__file__).resolve().parent.parent / "kernels"
    spec = importlib.util.spec_from_file_location(name, src / "__init__.py", submodule_search_locations=[str(src)])
    if spec is None or spec.loader is None:
        raise ImportError(f"matwm_fast.kernels not found: neither installed nor at {src}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_load_kernels_from_checkout()
