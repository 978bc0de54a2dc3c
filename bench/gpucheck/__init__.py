"""The GPU check: one prepared command for a lent GPU, rehearsed on the CPU by CI.

Tooling of this checkout, not of the installed library: nothing in ``matwm_fast`` imports it.  Run
it from the checkout (``python -m bench.gpucheck``, with the checkout on ``PYTHONPATH``; on a lent
GPU through ``bash bench/gpu.sh``); bench/README.md has the device call and what comes back.

``check`` the runner and CLI, ``stages`` what each stage runs and how it judges it, ``first`` the
first stage's processes, ``probes`` what they measure inside a step, ``summary`` summary.md,
``compile_cache`` the caches carried from one lent GPU to the next of its kind.
"""
