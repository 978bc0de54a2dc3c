"""Tooling around the algorithm: ``sweep``, ``profile``, ``plot`` and the warm-trainer
harness they, the benchmarks and the GPU check (``bench/``) share.  Nothing in the algorithm core
imports these."""
