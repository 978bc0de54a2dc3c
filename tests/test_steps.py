"""The step functions: compiled equals eager, nothing recompiles or graph-breaks in steady state,
and how they run (device, backend, kernels, precision) is resolved once, by rule."""

import pytest
import torch

from matwm_fast import kernels, steps
from matwm_fast.config import RunConfig, preset
from matwm_fast.imagination import ImagNoise
from matwm_fast.runtime import resolve_runtime
from matwm_fast.trainer import build


def trainer(backend: str, **run):
    tr = build(preset("smoke"), device="cpu", backend=backend, **run)
    while not tr.warm:
        tr.env_step()
    return tr


@pytest.fixture(scope="module")
def pair():
    torch._dynamo.reset()
    # on the CPU the compiled steps draw their random numbers from eager's generator
    # (compile_options: fallback_random), so both backends see the same samples for one seed
    eager, comp = trainer("eager"), trainer("compile")
    for a, b in zip(eager.wm.state_dict().values(), comp.wm.state_dict().values()):
        assert torch.equal(a, b)  # same seed, same init
    return eager, comp


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def noise_for(tr):
    c = tr.cfg
    return ImagNoise.draw(tr.n * c.ac.imag_batch, c.ac.context_len, c.ac.horizon, tr.wm.K, tr.wm.A, "cpu")


def test_world_model_update_matches(pair):
    eager, comp = pair
    batch = eager.replay.sample_sequences(eager.cfg.wm.batch_per_agent, eager.cfg.wm.seq_len, 0.9998)
    metrics = {}
    for name, tr in (("eager", eager), ("compile", comp)):
        torch.manual_seed(123)  # same posterior-sampling draws in both
        metrics[name] = tr.wm_update(batch)
    for k in metrics["eager"]:
        close(metrics["eager"][k], metrics["compile"][k])
    for p, q in zip(eager.wm.parameters(), comp.wm.parameters()):
        close(p.grad, q.grad, 1e-3)
        close(p, q)


def seeded(tr, ctx, seed: int = 7):
    """A rollout drawing its own random numbers, as training does, from a seeded generator: on the
    CPU the compiled samplers draw from eager's generator in eager's order (fallback_random), so
    one seed gives both backends the same draws — and the graph compiled here is training's."""
    torch.manual_seed(seed)
    return tr.imagine(ctx)


def test_imagination_matches_under_same_draws(pair):
    eager, comp = pair
    ctx = eager.replay.sample_contexts(eager.cfg.ac.imag_batch, eager.cfg.ac.context_len)
    a, b = seeded(eager, ctx), seeded(comp, ctx)
    assert torch.equal(a.actions, b.actions)
    assert torch.equal(a.continues, b.continues)
    close(a.states, b.states)
    close(a.rewards, b.rewards)


def test_the_step_rollout_graph_equals_eager_and_does_not_recompile(pair):
    """``rollout_graph=step`` (CUDA's default): the prefill, one decode step run H times and the
    last state as three graphs.  Same rollout as eager under the same draws, and its H decode
    calls (a different cache slot each) reuse one graph."""
    eager = pair[0]
    step = trainer("compile", rollout_graph="step")
    assert step.rt.rollout_graph == "step" and pair[1].rt.rollout_graph == "whole"  # the CPU's auto
    step.wm.load_state_dict(eager.wm.state_dict())
    step.ac.load_state_dict(eager.ac.state_dict())
    ctx = eager.replay.sample_contexts(eager.cfg.ac.imag_batch, eager.cfg.ac.context_len)
    a, b = seeded(eager, ctx), seeded(step, ctx)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.continues, b.continues)
    close(a.states, b.states)
    close(a.rewards, b.rewards)
    torch._dynamo.config.error_on_recompile = True
    try:
        for _ in range(2):
            step.imagine(ctx)  # fresh draws, other cache slots: no recompile
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_actor_critic_update_matches(pair):
    eager, comp = pair
    ctx = eager.replay.sample_contexts(eager.cfg.ac.imag_batch, eager.cfg.ac.context_len)
    roll = seeded(eager, ctx)
    ma, mb = eager.ac_update(roll), comp.ac_update(roll)
    for k in ma:
        close(ma[k], mb[k])
    for p, q in zip(eager.ac.parameters(), comp.ac.parameters()):
        close(p, q)
    close(eager.ac.return_scale, comp.ac.return_scale)
    for p, q in zip(eager.ac.slow_critic.parameters(), comp.ac.slow_critic.parameters()):
        close(p, q)


def test_no_recompile_across_env_steps(pair):
    _, comp = pair
    from torch._dynamo.utils import counters

    comp.train_step()  # warm every piece (the tests above may not have run first)
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    torch._dynamo.config.error_on_recompile = True
    try:
        for _ in range(3):
            comp.train_step()
    finally:
        torch._dynamo.config.error_on_recompile = False
    comp.check_finite()
    # steady state traces nothing new: no new graphs, no new graph breaks
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(counters["graph_break"].values()) == breaks


def _grad_buffers(tr) -> dict[int, int]:
    return {id(p): p.grad.data_ptr() for g in (*tr.wm_opt.param_groups, *tr.ac_opt.param_groups)
            for p in g["params"]}


def test_gradients_live_in_buffers_allocated_once_under_inductor(pair):
    """Under Inductor's backends backward accumulates into one buffer per parameter, made with
    the trainer, never into the tensor autograd would hand over: under Inductor's CUDA-graph
    trees that is the backward graph's own output, which its next replay overwrites (the first
    GPU run, 2026-11-27, failed so at its second update).  Under the eager functions (eager,
    graphs) each update sets the gradients to None instead: backward allocates them, inside the
    captured graph's pool under ``graphs``, where that graph's clip and Adam consume them."""
    comp = pair[1]
    before = _grad_buffers(comp)
    assert len(before) == sum(len(g["params"]) for g in comp.wm_opt.param_groups + comp.ac_opt.param_groups)
    for _ in range(2):
        comp.train_step()
    assert _grad_buffers(comp) == before
    assert any(p.grad.abs().sum() > 0 for p in comp.wm.parameters())  # the buffers are the ones written
    fresh = trainer("eager")
    assert all(p.grad is None for g in fresh.wm_opt.param_groups for p in g["params"])
    fresh.train_step()
    assert all(p.grad is not None for p in fresh.wm.parameters())


def test_optimizer_step_is_torchs_step():
    """The unwrapped step (no graph breaks) updates parameters and state exactly as ``opt.step()``."""
    torch.manual_seed(0)
    nets = [torch.nn.Linear(5, 3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.Adam(n.parameters(), lr=1e-2, eps=1e-5) for n in nets]
    for _ in range(3):
        x = torch.randn(4, 5)
        for n, o in zip(nets, opts):
            o.zero_grad()
            n(x).square().sum().backward()
        opts[0].step()
        with torch.no_grad():
            steps.optimizer_step(opts[1])
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.equal(a, b)
    for sa, sb in zip(opts[0].state.values(), opts[1].state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_compile_steps_wraps_every_piece_only_when_asked():
    eager = steps.compile_steps(resolve_runtime(RunConfig(device="cpu", backend="eager")))
    assert (eager.wm_loss, eager.rollout, eager.ac_loss) == (steps.wm_loss, steps.rollout, steps.ac_loss)
    rt = resolve_runtime(RunConfig(device="cpu", backend="compile"))
    comp = steps.compile_steps(rt)
    # the C++ wrapper for the model's graphs, not the optimisers' (3× the compile time, no faster)
    assert steps.compile_options(rt)["cpp_wrapper"] and not steps.compile_options(rt, optimizer=True)["cpp_wrapper"]
    assert all(getattr(comp, f) is not getattr(steps, f) for f in ("wm_loss", "wm_opt_step", "rollout", "ac_loss",
                                                                  "ac_opt_step"))


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_kernel_choice_reaches_every_module(impl):
    """One choice, made at construction: every module that calls a kernel holds it."""
    if impl == "triton" and not kernels.triton_runs_on("cpu"):
        pytest.skip(kernels.why_triton_cannot_run("cpu"))
    tr = build(preset("smoke"), device="cpu", kernels=impl)
    holders = [m for m in (*tr.wm.modules(), tr.ac) if hasattr(m, "kernels")]
    assert len(holders) >= 4  # world model, its two transformers' blocks, the actor-critic
    assert {m.kernels for m in holders} == {impl} and tr.rt.kernels == impl


def test_bf16_on_the_cpu_stays_close_to_fp32():
    """The same weights and batch under bf16 autocast and in float32: every world-model and
    actor-critic loss term within 3 % (bf16 keeps ~3 significant digits; the loss reductions
    run in float32), and the rollout finite with the same shapes, stored in bf16."""
    from dataclasses import replace

    base = preset("smoke")
    cfg = replace(base, wm=replace(base.wm, width=64, mlp_width=64, latent_vars=8, latent_classes=8),
                  ac=replace(base.ac, mlp_width=64, imag_batch=32))
    trs = {amp: build(cfg, device="cpu", amp=amp) for amp in ("fp32", "bf16")}
    fp32, bf16 = trs["fp32"], trs["bf16"]
    bf16.wm.load_state_dict(fp32.wm.state_dict())
    bf16.ac.load_state_dict(fp32.ac.state_dict())
    torch.nn.init.normal_(fp32.ac.critic.net[-1].weight, std=0.05)  # a value head that is not all zero
    bf16.ac.load_state_dict(fp32.ac.state_dict())
    while not fp32.warm:
        fp32.env_step()
    c = fp32.cfg
    batch = fp32.replay.sample_sequences(c.wm.batch_per_agent, c.wm.seq_len, c.replay.priority_decay)
    args = (batch.obs, batch.act, batch.rew, batch.cont, batch.first, batch.team_act, batch.agent)
    m = {}
    for amp, tr in trs.items():
        torch.manual_seed(0)  # the same posterior draws
        _, m[amp] = steps.wm_loss(tr.wm, *args, tr.rt.amp, tr.rt.kernels)
    for k in ("total", "rec", "rew", "con", "team", "kl"):
        torch.testing.assert_close(m["bf16"][k], m["fp32"][k], rtol=0.03, atol=1e-3, msg=k)
    ctx = fp32.replay.sample_contexts(c.ac.imag_batch, c.ac.context_len)
    noise = noise_for(fp32)
    rolls = {amp: tr.imagine(ctx, noise) for amp, tr in trs.items()}
    assert rolls["bf16"].states.dtype is torch.bfloat16 and torch.isfinite(rolls["bf16"].states.float()).all()
    assert rolls["bf16"].states.shape == rolls["fp32"].states.shape
    roll = rolls["fp32"]  # the same imagined data for both losses
    loss = {amp: steps.ac_loss(tr.ac, roll.states, roll.actions, roll.rewards, roll.continues, c.ac, tr.rt.amp,
                               tr.rt.kernels)[2] for amp, tr in trs.items()}
    for k in ("critic_loss", "entropy", "value", "return"):
        torch.testing.assert_close(loss["bf16"][k], loss["fp32"][k], rtol=0.03, atol=1e-3, msg=k)
