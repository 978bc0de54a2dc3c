"""The ``graphs`` backend: its phases are capture-ready (traced on the CPU, tests/capture.py),
its CPU pass-through trains exactly as eager, and on a GPU a replay equals the eager call."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from matwm_fast import acting, losses
from matwm_fast.config import preset
from matwm_fast.graphs import Graph, Staged
from matwm_fast.trainer import Trainer, build

from capture import CaptureCheck


def config(scenario: str = "simple_tag", **train):
    """Smoke sizes with 5-step episodes and a 3-step context queue: the traced steps cross
    episode ends and push into a full queue; ``agent_every`` 2 gives world-model-only steps."""
    c = preset("smoke", scenario)
    return replace(c, env=replace(c.env, max_cycles=5),
                   train=replace(c.train, act_context=3, agent_every=2, **train))


def warm(backend="graphs", **run) -> Trainer:
    tr = build(config(), device="cpu", backend=backend, **run)
    while not tr.warm:
        tr.env_step()
    return tr


def traced(tr: Trainer, steps: int) -> CaptureCheck:
    with CaptureCheck(tr) as check:
        for _ in range(steps):
            tr.train_step()
    return check


@pytest.mark.parametrize("kernels, amp", [("ref", "fp32"), ("triton", "fp32"), ("ref", "bf16"), ("triton", "bf16")])
def test_every_phase_is_capture_ready(kernels, amp, one_thread):
    """Ten steps: episode ends, a full (rolling) context queue, world-model-only steps; every
    phase replays the ops of its capture, with no sync, no host data and no moved tensor.  Under
    bf16 imagination runs on the weights' bf16 twins, refreshed inside the phase."""
    tr = warm(kernels=kernels, amp=amp)
    assert (tr.caches.weights is not None) == (amp == "bf16")
    ended = len(tr.episodes.finished)
    check = traced(tr, 10)
    assert len(tr.episodes.finished) - ended == 2  # two episode ends,
    assert tr.cfg.env.max_cycles >= tr.cfg.train.act_context + 2  # each after pushes into a full queue
    check.assert_ready()
    assert check.calls["wm_update"] == 2 * check.calls["imagine"]  # half the steps update the world model only


def test_capture_ready_after_resume(one_thread):
    """A resumed trainer's optimiser state is new: its graphs capture anew, and are ready."""
    tr = warm()
    for _ in range(3):
        tr.train_step()
    again = build(config(), device="cpu", backend="graphs")
    again.load_state_dict(tr.state_dict())
    assert all(not g.captured and g._eager_calls == 0 for g in again.graphs.values())
    traced(again, 8).assert_ready()


@pytest.mark.parametrize("scenario", ["simple_tag", "cooperative_pong"])
def test_graphs_pass_through_trains_exactly_as_eager(scenario, one_thread):
    """The CPU runs the phases the GPU captures: same weights, optimiser state and metrics bit
    for bit over the smoke run (warm-up, then updates with world-model-only steps), on vectors
    and on uint8 frames."""
    if scenario == "cooperative_pong":
        pytest.importorskip("pymunk", reason="needs pip install 'matwm_fast[butterfly]'")
    runs, rows = {}, {}
    for b in ("eager", "graphs"):  # one after the other: both draw from torch's global generator
        tr = runs[b] = build(config(scenario), device="cpu", backend=b)
        rows[b] = [{k: v.clone() for k, v in (tr.train_step() or {}).items()} for _ in range(60)]
    eager, graphs = runs["eager"], runs["graphs"]
    assert graphs.step == eager.step == 60 and eager.warm
    for a, b in zip(rows["eager"], rows["graphs"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip((eager.wm, eager.ac), (graphs.wm, graphs.ac)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    for o, p in ((eager.wm_opt, graphs.wm_opt), (eager.ac_opt, graphs.ac_opt)):
        for s, t in zip(o.state.values(), p.state.values()):
            assert all(torch.equal(s[k], t[k]) for k in s)


# ----------------------------------------------------------------------------- the check can fail
def old_push(self, obs, act):
    """The context queue as it was: a new tensor per roll once full."""
    if self.count == self.length:
        self.obs = self.obs.roll(-1, dims=1)
        self.act = self.act.roll(-1, dims=1)
        self.count -= 1
    self.obs[:, self.count] = obs
    self.act[:, self.count] = act
    self.count += 1
    self.count_t.fill_(self.count)


def old_flag(self, losses_, offset):
    """The non-finite record as it was: the env step as a Python number."""
    bad = ~torch.isfinite(losses_.detach().float())
    new = bad.any() & (self.bad_step < 0)
    self.bad_step.copy_(torch.where(new, self.step, self.bad_step))


def old_range(returns, low, high):
    """The return range as it was: the quantiles as a tensor made from host numbers."""
    q = torch.quantile(returns.flatten(1).float(), torch.tensor([low, high], device=returns.device), dim=1)
    return q[1] - q[0]


def foreach_adam(tr):
    tr.wm_opt = torch.optim.Adam(tr.wm.parameters(), lr=1e-3)  # host step counters, bias corrections as floats


@pytest.mark.parametrize("blocker, patch, expect", [
    ("queue", (acting.ContextQueues, "push", old_push),
     "[act] a replay dispatches a persistent tensor at another address at op 2: aten.cat.default at matwm_fast/acting.py"),
    ("flag", (Trainer, "_flag_nonfinite", old_flag),
     "[wm_update] a replay dispatches other scalar arguments, shapes or strides at op"),  # at _wm_phase's flag
    ("quantile", (losses, "return_range", old_range),
     "[ac_update] host data becomes a tensor (aten.lift_fresh.default) at matwm_fast/losses.py"),
    ("adam", None, "[wm_update] host sync aten._local_scalar_dense.default at matwm_fast/steps.py"),
])
def test_check_names_the_blockers_it_was_built_for(blocker, patch, expect, monkeypatch, one_thread):
    """Each capture blocker found in earlier code, put back, is reported with
    its call site: a queue rolled into new storage, a Python step number baked into the
    non-finite record, a quantile tensor made from host data, and a non-fused Adam's ``.item()``."""
    if patch:
        monkeypatch.setattr(*patch)
    tr = warm()
    if blocker == "adam":
        foreach_adam(tr)
    problems = traced(tr, 8).problems
    assert any(p.startswith(expect) for p in problems), problems
    if blocker == "flag":  # the Python number enters through torch.where's scalar_tensor, in the phase
        assert any("aten.scalar_tensor.default at matwm_fast/trainer.py" in p and "(_wm_phase)" in p
                   for p in problems), problems


def test_check_names_syncs_foreign_tensors_and_mask_indexing(one_thread):
    tr = warm()
    body = tr.graphs["imagine"].fn
    host = torch.ones(3)

    def bad():
        roll = body()
        roll.rewards.sum().item()  # a sync
        _ = roll.rewards[roll.rewards > 0]  # a data-dependent shape
        _ = roll.rewards.flatten()[:3] + host  # a tensor the trainer does not own
        return roll

    tr.graphs["imagine"].fn = bad
    report = "\n".join(traced(tr, 8).problems)
    assert "host sync aten._local_scalar_dense" in report and "test_graphs.py" not in report
    assert "boolean-mask indexing" in report
    assert "a tensor from outside the trainer's state enters aten.add.Tensor" in report


# ----------------------------------------------------------------------------- the mechanism
def test_graph_is_a_plain_call_on_the_cpu_and_staged_inputs_keep_their_address():
    calls = []
    g = Graph(lambda: calls.append(1) or len(calls), torch.device("cpu"), warmup=2)
    assert [g() for _ in range(4)] == [1, 2, 3, 4] and not g.captured and g.capture_s is None
    s = Staged((2, 3), torch.long, torch.device("cpu"))
    buf = s.device
    assert s.put(np.arange(6).reshape(2, 3)) is buf and buf.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert s.put(7) is buf and buf.unique().tolist() == [7]


@pytest.mark.gpu
def test_a_replay_equals_the_eager_call_and_two_replays_draw_anew():
    from matwm_fast.imagination import ImagNoise

    tr = build(preset("smoke"), device="cuda", backend="graphs", amp="fp32")
    while not tr.warm:
        tr.env_step()
    c = tr.cfg
    ctx = tr.replay.sample_contexts(c.ac.imag_batch, c.ac.context_len)
    noise = ImagNoise.draw(tr.n * c.ac.imag_batch, c.ac.context_len, c.ac.horizon, tr.wm.K, tr.wm.A, "cuda")
    fixed = Graph(lambda: tr.imagine(ctx, noise), tr.device)
    free = Graph(lambda: tr.imagine(ctx), tr.device)
    for _ in range(3):
        fixed(), free()
    assert fixed.captured and free.captured
    want = tr.imagine(ctx, noise)
    got = fixed()
    assert torch.equal(got.actions, want.actions)
    torch.testing.assert_close(got.states, want.states)
    first = free().states.clone()
    assert not torch.equal(first, free().states)  # the generator advanced between replays
    for _ in range(5):
        tr.train_step()
    assert all(g.captured for g in tr.graphs.values())
    tr.check_finite()
