"""Tooling around the algorithm: ``diagnose``, ``sweep``, ``profile``, ``plot``, ``gpucheck`` and the
warm-trainer harness they and the benchmarks share.  Nothing in the algorithm core imports these."""
