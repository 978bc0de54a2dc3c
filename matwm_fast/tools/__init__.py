"""Tooling around the algorithm: ``sweep``, ``profile``, ``plot`` and the timing harness
(:mod:`.harness`) that ``profile``, the benchmarks and the GPU check (``bench/``) share.  Nothing
in the algorithm core imports these (``tests/test_packaging.py`` checks it)."""
