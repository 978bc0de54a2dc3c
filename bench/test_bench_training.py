"""Benchmarks of the training step's pieces, per backend (sizes and knobs: bench/conftest.py).

    pytest bench/ --benchmark-only                       # smoke sizes on the CPU, paper on CUDA
    MATWM_BENCH_PRESET=paper pytest bench/test_bench_training.py --benchmark-only

* ``imagine``   one imagination rollout of all agents (N × B trajectories × H steps, no grad);
* ``wm_update`` one shared world-model update on the combined batch (loss, backward, Adam);
* ``ac_update`` one actor-critic update of every agent on a fixed rollout;
* ``train_step`` one whole env step of Algorithm 2 after warm-up (act, env, replay, all updates).

Inputs are sampled once per trainer (``matwm_fast.tools.harness.SteadyTrainer.fixed_inputs``,
the harness ``profile`` uses too) so rounds differ only by the state the updates themselves change.
Under ``graphs`` a piece is its phase's graph (:func:`piece`), replayed on the inputs the last
training step staged, its replay-buffer gather included.
``backend`` is parametrised by bench/conftest.py.  ``extra_info`` carries the throughput computed
from the mean and the trainer's resolved runtime (device, backend, kernels, amp).
"""

from __future__ import annotations

import torch


def piece(tr, phase: str, eager):
    """What one call of a piece runs: the phase's captured graph under ``graphs`` (fixed staged
    inputs, as captured), else the trainer's method on the benchmark's fixed inputs."""
    return tr.graphs[phase] if tr.rt.backend == "graphs" else eager


def test_bench_imagine(benchmark, bench, bench_trainer, bench_cfg, backend):
    w = bench_trainer(backend)
    tr = w.tr

    run = piece(tr, "imagine", lambda: tr.imagine(w.ctx))

    def fn():
        roll = run()  # fresh noise every call, as in training
        bench.sync()
        return roll

    info = bench.info(backend, bench_cfg, tr) | w.info() | {
        "rows": tr.n * tr.cfg.ac.imag_batch, "horizon": tr.cfg.ac.horizon, "imagined_per_call": tr.imagined_per_update}
    roll = bench.measure(benchmark, fn, info, {"imagined_steps_per_s": tr.imagined_per_update})
    # what was timed: the whole budget of imagined steps, finite
    assert roll.actions.numel() == tr.imagined_per_update and torch.isfinite(roll.states).all()


def test_bench_wm_update(benchmark, bench, bench_trainer, bench_cfg, backend):
    w = bench_trainer(backend)
    tr = w.tr
    samples = w.batch.act.numel()  # R × T sequence steps trained on

    run = piece(tr, "wm_update", lambda: tr.wm_update(w.batch))

    def fn():
        m = run()
        bench.sync()
        return m

    info = bench.info(backend, bench_cfg, tr) | {"sequences": w.batch.act.shape[0], "seq_len": w.batch.act.shape[1]}
    m = bench.measure(benchmark, fn, info, {"wm_updates_per_s": 1, "wm_samples_per_s": samples})
    assert all(torch.isfinite(v).all() for v in m.values()) and m["grad_norm"] > 0  # an update happened


def test_bench_ac_update(benchmark, bench, bench_trainer, bench_cfg, backend):
    w = bench_trainer(backend)
    tr = w.tr

    run = piece(tr, "ac_update", lambda: tr.ac_update(w.roll))

    def fn():
        m = run()
        bench.sync()
        return m

    info = bench.info(backend, bench_cfg, tr) | {"agents": tr.n, "imag_batch": tr.cfg.ac.imag_batch,
                                                 "horizon": tr.cfg.ac.horizon}
    m = bench.measure(benchmark, fn, info, {"ac_updates_per_s": 1, "imagined_steps_per_s": tr.imagined_per_update})
    assert all(torch.isfinite(v).all() for v in m.values()) and (m["critic_grad_norm"] > 0).all()


def test_bench_train_step(benchmark, bench, bench_trainer, bench_cfg, backend):
    w = bench_trainer(backend)
    tr = w.tr

    def fn():
        m = tr.train_step()
        bench.sync()
        return m

    info = bench.info(backend, bench_cfg, tr) | {"imagined_per_step": tr.imagined_per_update,
                                             "wm_batch": bench_cfg.wm.batch_size, "wm_seq_len": bench_cfg.wm.seq_len}
    m = bench.measure(benchmark, fn, info, {"env_steps_per_s": 1, "imagined_steps_per_s": tr.imagined_per_update})
    tr.check_finite()  # a benchmark of a diverged model would time NaN arithmetic
    # a whole env step of Algorithm 2 was timed: both updates ran, on the budget SPEC §1 sets
    assert int(m["imagined_steps"]) == tr.imagined_per_update and int(m["wm_sequences"]) == bench_cfg.wm.batch_size
