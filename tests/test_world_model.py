"""World model: action scaling, shapes, causal/episode masking, decode == forward, loss masking."""

import copy
from dataclasses import replace

import pytest
import torch

from matwm_fast.config import preset
from matwm_fast.env import EnvSpec
from matwm_fast.losses import world_model_loss
from matwm_fast.transformer import CausalTransformer, segment_mask
from matwm_fast.world_model import WorldModel

SPEC = EnvSpec(agents=("adversary_0", "adversary_1", "adversary_2", "agent_0"), obs_sizes=(16, 16, 16, 14),
               action_counts=(5, 5, 5, 5))


@pytest.fixture
def wm():
    torch.manual_seed(0)
    return WorldModel(preset("smoke").wm, SPEC).double()


def loss_cfg(wm, **changes):
    """The world model's config section with the paper's KL weights, as the loss reads them."""
    return replace(wm.cfg, dyn_weight=0.5, rep_weight=0.1, **changes)


def batch(r=4, t=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(r, t, SPEC.obs_dim, generator=g, dtype=torch.float64)
    act = torch.randint(0, 5, (r, t), generator=g)
    first = torch.zeros(r, t, dtype=torch.bool)
    agent = torch.arange(r) % SPEC.n_agents
    return obs, act, first, agent


def test_action_scaling(wm):
    idx = wm.scaled_action(torch.tensor([0, 2, 3]), torch.tensor([4, 0, 3]))
    assert idx.tolist() == [4, 10, 18]  # k·A + a


def test_mix_equals_the_mixer_on_the_concatenated_one_hot(wm):
    """The column lookup is the first layer applied to [z, onehot(k·A + a)] (float64, exact up to
    summation order), for time-major inputs too."""
    wm64 = copy.deepcopy(wm).double()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 3, wm.K * wm.C, generator=g, dtype=torch.float64)  # (R, T, K·C)
    agent = torch.tensor([0, 2, 3, 1, 0])  # (R,)
    act = torch.randint(0, SPEC.n_actions, (5, 3), generator=g)  # (R, T)
    onehot = torch.nn.functional.one_hot(agent[:, None] * wm.A + act, wm.N * wm.A).double()  # (R, T, N·A)
    torch.testing.assert_close(wm64.mix(z, agent, act), wm64.mixer(torch.cat([z, onehot], -1)), rtol=1e-12, atol=1e-12)


def test_observe_shapes(wm):
    obs, act, first, agent = batch()
    out = wm.observe(obs, act, first, agent)
    k, c = wm.K, wm.C
    assert out.post_probs.shape == (4, 8, k, c) and out.prior_probs.shape == (4, 8, k, c)
    assert out.recon.shape == obs.shape
    assert out.reward_logits.shape == (4, 8, wm.cfg.reward_bins) and out.cont_logits.shape == (4, 8)
    assert out.team_logits.shape == (4, 8, SPEC.n_agents - 1, SPEC.n_actions)
    torch.testing.assert_close(out.post_probs.sum(-1), torch.ones(4, 8, k, dtype=torch.float64))
    assert out.post_probs.min() >= wm.cfg.unimix / c - 1e-12  # unimix floor


def test_segment_mask_and_positions():
    first = torch.tensor([[False, False, True, False, False, True]])
    mask, pos = segment_mask(first)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0]]
    assert mask[0, 3].tolist() == [False, False, True, True, False, False]
    assert mask[0, 1].tolist() == [True, True, False, False, False, False]


def test_no_leak_across_episode_start(wm):
    obs, act, first, agent = batch()
    first[:, 5] = True
    torch.manual_seed(1)
    a = wm.observe(obs, act, first, agent)
    obs2, act2 = obs.clone(), act.clone()
    obs2[:, :5] += 3.0  # change everything before the episode start
    act2[:, :5] = (act2[:, :5] + 1) % 5
    torch.manual_seed(1)  # same sampling noise
    b = wm.observe(obs2, act2, first, agent)
    torch.testing.assert_close(a.prior_probs[:, 5:], b.prior_probs[:, 5:])
    torch.testing.assert_close(a.team_logits[:, 5:], b.team_logits[:, 5:])
    torch.testing.assert_close(a.reward_logits[:, 5:], b.reward_logits[:, 5:])
    assert not torch.allclose(a.prior_probs[:, :5], b.prior_probs[:, :5])  # the change did matter before


def test_causal(wm):
    obs, act, first, agent = batch()
    torch.manual_seed(1)
    a = wm.observe(obs, act, first, agent)
    obs2 = obs.clone()
    obs2[:, 6:] -= 2.0
    torch.manual_seed(1)
    b = wm.observe(obs2, act, first, agent)
    torch.testing.assert_close(a.prior_probs[:, :6], b.prior_probs[:, :6])


@pytest.mark.parametrize("start", [0, 3])
def test_decode_equals_forward(start):
    torch.manual_seed(0)
    tf = CausalTransformer(width=32, layers=2, heads=4, ffn_mult=2, max_len=16).double().eval()
    r, t, ctx = 5, 10, 6
    x = torch.randn(r, t, 32, dtype=torch.float64)
    first = torch.zeros(r, t, dtype=torch.bool)
    first[:, start] = True  # the context crosses an episode start at `start`
    mask, pos = segment_mask(first)
    full = tf(x, pos, mask)
    cache = tf.allocate_cache(r, t, "cpu", torch.float64)
    pre = tf(x[:, :ctx], pos[:, :ctx], mask[:, :ctx, :ctx], cache)
    torch.testing.assert_close(pre, full[:, :ctx])
    kv_start = (ctx - 1) - pos[:, ctx - 1]
    for i in range(ctx, t):
        h = tf.decode(x[:, i], pos[:, i], cache, torch.tensor(i), kv_start)
        torch.testing.assert_close(h, full[:, i])


def test_loss_ignores_pairs_across_episode_start(wm):
    obs, act, first, agent = batch()
    first[:, 4] = True
    out = wm.observe(obs, act, first, agent)
    args = (obs, torch.zeros(4, 8, dtype=torch.float64), torch.ones(4, 8, dtype=torch.float64),
            torch.zeros(4, 8, 3, dtype=torch.long), wm.obs_mask[agent].double(), wm.bins.double(), loss_cfg(wm, free_bits=0.0))
    base, m = world_model_loss(out, *args)
    assert set(m) >= {"total", "rec", "rew", "con", "team", "dyn", "rep"}
    # the posterior at the episode start is a reset, not a prediction target of step 3
    out.post_probs = out.post_probs.clone()
    out.post_probs[:, 4] = torch.softmax(torch.randn_like(out.post_probs[:, 4]), -1)
    again, m2 = world_model_loss(out, *args)
    torch.testing.assert_close(m2["dyn"], m["dyn"])
    out.post_probs[:, 5] = torch.softmax(torch.randn_like(out.post_probs[:, 5]), -1)
    third, m3 = world_model_loss(out, *args)
    assert not torch.allclose(m3["dyn"], m["dyn"])  # a pair inside the episode does count
    expected = m["rec"] + m["rew"] + m["con"] + m["team"] + 0.5 * m["dyn"] + 0.1 * m["rep"]
    torch.testing.assert_close(base.detach(), expected)


def test_reward_weight_scales_the_reward_term_only(wm):
    """wm.reward_weight (outside the paper; 1 is Eq. 3) multiplies the reward term and nothing else."""
    obs, act, first, agent = batch()
    out = wm.observe(obs, act, first, agent)
    args = (obs, torch.randn(4, 8, dtype=torch.float64), torch.ones(4, 8, dtype=torch.float64),
            torch.zeros(4, 8, 3, dtype=torch.long), wm.obs_mask[agent].double(), wm.bins.double())
    one, m1 = world_model_loss(out, *args, loss_cfg(wm, free_bits=0.0))
    ten, m10 = world_model_loss(out, *args, replace(loss_cfg(wm, free_bits=0.0), reward_weight=10.0))
    assert {k: v for k, v in m1.items() if k != "total"} == {k: v for k, v in m10.items() if k != "total"}
    torch.testing.assert_close(ten - one, 9 * m1["rew"])


def test_loss_backward_reaches_every_parameter(wm):
    obs, act, first, agent = batch()
    out = wm.observe(obs, act, first, agent)
    team = torch.randint(0, 5, (4, 8, 3))
    loss, _ = world_model_loss(out, obs, torch.randn(4, 8, dtype=torch.float64), torch.ones(4, 8, dtype=torch.float64),
                               team, wm.obs_mask[agent].double(), wm.bins.double(), loss_cfg(wm, free_bits=1.0))
    loss.backward()
    missing = [n for n, p in wm.named_parameters() if p.grad is None]
    assert missing == []


def allocated_bytes(fn) -> int:
    """Bytes allocated (frees not subtracted) while ``fn`` runs, from the profiler's memory events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())  # each op's own allocations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_does_no_cache_sized_work(dtype):
    """One decode step (every layer: projections, cache write, attention, FFN) allocates O(rows ×
    width) plus scores and masks of O(rows × heads × length): never a tensor of the cache's size
    (rows × heads × length × head_dim) — neither a masked copy of the values nor a dtype
    conversion of the cache (the old reference did both: 2.3× one layer's keys here).  Measured
    as the growth of the bytes allocated from a short to a long cache."""
    from matwm_fast.transformer import CausalTransformer

    torch.manual_seed(0)
    rows, width, heads, layers = 64, 128, 2, 2  # head_dim 64, as in the paper's model
    tf = CausalTransformer(width, layers, heads, 2, 256)
    x = torch.randn(rows, width)  # (B, D)
    pos = torch.zeros(rows, dtype=torch.long)  # (B,)
    start = torch.zeros(rows, dtype=torch.long)  # (B,)
    sizes = {}
    for length in (16, 256):
        cache = tf.allocate_cache(rows, length, "cpu", dtype)
        index = torch.tensor(length // 2)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
            tf.decode(x, pos, cache, index, start)  # warm-up (lazy inits)
            sizes[length] = allocated_bytes(lambda: tf.decode(x, pos, cache, index, start))
    key_growth = rows * width * (256 - 16) * torch.finfo(dtype).bits // 8  # one layer's keys, long − short
    assert sizes[256] - sizes[16] < 0.5 * key_growth, (sizes, key_growth)
    assert sizes[16] < 40 * rows * width * 4  # the rest: activations of a few (B, D)-sized tensors per layer


def test_compiled_decode_allocates_no_cache_sized_buffer():
    """The same rule for what Inductor compiles: two decode steps (a write, then reads of what was
    written) allocate no buffer of one layer's cache size.  A write through a view of a stacked
    (layers, …) cache is functionalised into a copy of the whole stack per step (``select_scatter``:
    2× the stack here, 4× one layer's keys); per-layer tensors keep it an in-place ``index_put_``.
    Read from the generated code: the profiler does not see a compiled graph's own buffers."""
    import math
    import re

    from torch._inductor.utils import run_and_get_code

    from matwm_fast.runtime import Runtime
    from matwm_fast.steps import compile_options

    torch.manual_seed(0)
    rows, width, heads, layers, length = 64, 128, 2, 2, 256
    tf = CausalTransformer(width, layers, heads, 2, length)
    x = torch.randn(rows, width)  # (B, D)
    pos = torch.zeros(rows, dtype=torch.long)  # (B,)
    start = torch.zeros(rows, dtype=torch.long)  # (B,)

    def two_steps(cache, index):
        h = tf.decode(x, pos, cache, index, start)  # (B, D)
        return tf.decode(h, pos + 1, cache, index + 1, start)

    rt = Runtime(torch.device("cpu"), "compile", "ref", torch.bfloat16)
    options = {**compile_options(rt), "cpp_wrapper": False}  # a Python wrapper: its allocations are readable
    compiled = torch.compile(two_steps, fullgraph=True, dynamic=False, options=options)
    cache = tf.allocate_cache(rows, length, "cpu", torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, codes = run_and_get_code(compiled, cache, torch.tensor(length // 2))
        torch.testing.assert_close(out, two_steps(tf.allocate_cache(rows, length, "cpu", torch.bfloat16),
                                                  torch.tensor(length // 2)), atol=0.05, rtol=0.05)
    shapes = [tuple(int(d) for d in m.split(",") if d.strip())
              for code in codes for m in re.findall(r"empty_strided_cpu\(\(([\d, ]*)\)", code)]
    assert shapes, "no buffers found: the wrapper's allocation call changed name"
    layer_cache = rows * heads * length * (width // heads)
    assert max(math.prod(s) for s in shapes) < layer_cache // 4, sorted(shapes, key=math.prod)[-3:]


def ablated(**changes):
    torch.manual_seed(0)
    cfg = preset("smoke")
    return WorldModel(replace(cfg.wm, **changes), SPEC).double()


def test_teammate_predictor_off_is_a_constant_and_costs_no_loss():
    """The paper's ablation: no teammate loss, no gradient into the predictor, and a constant (the
    uniform guess over each teammate's real actions) where its prediction would enter the state."""
    wm = ablated(teammates=False)
    obs, act, first, agent = batch()
    out = wm.observe(obs, act, first, agent)
    assert out.team_logits is None
    team_act = torch.zeros(*act.shape, SPEC.n_agents - 1, dtype=torch.long)
    loss, m = world_model_loss(out, obs, torch.zeros(act.shape, dtype=torch.float64), torch.ones(act.shape, dtype=torch.float64), team_act,
                               wm.obs_mask[agent], wm.bins, loss_cfg(wm, free_bits=1.0))
    assert m["team"] == 0
    loss.backward()
    assert all(p.grad is None for p in wm.teammates.parameters())
    z = torch.randn(4, 3, wm.K * wm.C, dtype=torch.float64)
    pos = torch.arange(3).expand(4, 3)
    mask, _ = segment_mask(torch.zeros(4, 3, dtype=torch.bool))
    probs = torch.softmax(wm.teammates(z, pos, mask, agent), -1)  # (R, T, N-1, A)
    assert torch.equal(probs, torch.softmax(wm.teammates(z * 5, pos, mask, agent), -1))  # ignores z
    counts = torch.tensor(SPEC.action_counts)
    for r, i in enumerate(agent.tolist()):
        mates = [j for j in range(SPEC.n_agents) if j != i]
        for slot, j in enumerate(mates):
            torch.testing.assert_close(probs[r, 0, slot, : counts[j]], torch.full((int(counts[j]),), 1 / counts[j], dtype=torch.float64))


def test_action_scaling_off_shares_the_action_columns():
    wm = ablated(action_scaling=False)
    z = torch.randn(3, wm.K * wm.C, dtype=torch.float64)
    act = torch.tensor([1, 1, 1])
    e = wm.mix(z[:1].expand(3, -1), torch.tensor([0, 1, 2]), act)  # the same z and action, three agents
    torch.testing.assert_close(e[0], e[1]) and torch.testing.assert_close(e[0], e[2])
    on = ablated()
    e = on.mix(z[:1].expand(3, -1), torch.tensor([0, 1, 2]), act)
    assert not torch.allclose(e[0], e[1])  # scaled: each agent its own columns


def test_dropout_trains_only():
    wm = ablated(dropout=0.5)
    obs, act, first, agent = batch()
    wm.train()
    a, b = (wm.observe(obs, act, first, agent).prior_probs for _ in range(2))  # through h (the reward head starts at 0)
    assert not torch.equal(a, b)
    wm.eval()
    torch.manual_seed(1)
    a = wm.observe(obs, act, first, agent).prior_probs
    torch.manual_seed(1)
    b = wm.observe(obs, act, first, agent).prior_probs
    assert torch.equal(a, b)


def test_symlog_reconstruction_target():
    wm = ablated()
    obs, act, first, agent = batch()
    obs = obs * 10
    out = wm.observe(obs, act, first, agent)
    args = (torch.zeros(act.shape, dtype=torch.float64), torch.ones(act.shape, dtype=torch.float64),
            torch.zeros(*act.shape, SPEC.n_agents - 1, dtype=torch.long),
            wm.obs_mask[agent], wm.bins)
    _, raw = world_model_loss(out, obs, *args, loss_cfg(wm, free_bits=1.0))
    _, sym = world_model_loss(out, obs, *args, loss_cfg(wm, free_bits=1.0, recon_symlog=True))
    from matwm_fast.losses import symlog

    want = ((out.recon - symlog(obs)).pow(2) * wm.obs_mask[agent][:, None]).sum(-1).mean()
    torch.testing.assert_close(sym["rec"], want)
    assert sym["rec"] < raw["rec"]  # observations of magnitude ~10 shrink to ~2.4 in symlog space


def test_segment_mask_ignores_whether_step_0_is_flagged():
    """Step 0 always starts a segment: flagged or not, the same mask and positions."""
    first = torch.tensor([[False, False, True, False], [True, False, False, True]])
    flagged = first.clone()
    flagged[:, 0] = True
    for a, b in zip(segment_mask(first), segment_mask(flagged)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scaling", [True, False])
def test_mix_step_equals_mix(scaling):
    """Imagination's mixer (the first layer's action columns and bias as one table, made once per
    rollout) is :meth:`WorldModel.mix` (float64, up to summation order)."""
    wm = ablated(action_scaling=scaling)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, wm.K * wm.C, generator=g, dtype=torch.float64)  # (R, K·C)
    agent = torch.tensor([0, 1, 2, 3, 1, 0])  # (R,)
    act = torch.randint(0, SPEC.n_actions, (6,), generator=g)  # (R,)
    torch.testing.assert_close(wm.mix_step(z, wm.mix_table(), agent, act), wm.mix(z, agent, act), rtol=1e-12, atol=1e-12)


def _cached_teammates(wm, r, ctx, length, seed=3):
    """A teammate predictor cache prefilled with ``ctx`` latents of r rows, and its inputs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(r, ctx + 1, wm.K * wm.C, generator=g, dtype=torch.float64)  # (R, L+1, K·C)
    agent = torch.arange(r) % SPEC.n_agents  # (R,)
    first = torch.zeros(r, ctx, dtype=torch.bool)
    first[0, 2] = True  # one row's context crosses an episode start
    mask, pos = segment_mask(first)
    cache = wm.teammates.tf.allocate_cache(r, length, "cpu", torch.float64)
    wm.teammates(z[:, :ctx], pos, mask, agent, cache)
    kv_start = (ctx - 1) - pos[:, -1]  # (R,)
    return z[:, ctx], agent, pos[:, -1] + 1, cache, kv_start


def test_teammate_decode_step_equals_decode():
    """The per-rollout input bias (inp's bias + agent and positional embeddings) and mask, a host
    slot and a read of the live slots only: the same logits as :meth:`TeammatePredictor.decode`."""
    wm = ablated()
    r, ctx, length = 5, 4, 9
    z, agent, nxt, cache, kv_start = _cached_teammates(wm, r, ctx, length)
    want = wm.teammates.decode(z, nxt, agent, cache, torch.tensor(ctx), kv_start)
    _, _, _, cache2, _ = _cached_teammates(wm, r, ctx, length)
    bias, invalid = wm.teammates.step_inputs(agent, nxt[None] + torch.arange(2)[:, None])  # (T, R, Dtp), (R, N-1, A)
    got = wm.teammates.decode_step(z, bias[0], invalid, agent, cache2, ctx, kv_start, torch.tensor(ctx + 1), ctx + 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_decode_reads_only_the_live_slots():
    """With a host slot and bound, slots past the bound are never read: NaN there changes
    nothing, and the result equals the device-index decode over the whole (clean) cache."""
    torch.manual_seed(0)
    tf = CausalTransformer(width=16, layers=2, heads=2, ffn_mult=2, max_len=16).double().eval()
    r, ctx, length = 4, 5, 12
    x = torch.randn(r, ctx + 1, 16, dtype=torch.float64)
    mask, pos = segment_mask(torch.zeros(r, ctx, dtype=torch.bool))
    caches = [tf.allocate_cache(r, length, "cpu", torch.float64) for _ in range(2)]
    for c in caches:
        tf(x[:, :ctx], pos, mask, c)
    for t in caches[1].tensors():
        t[:, :, ctx + 1:] = float("nan")  # never-written slots of a rollout
    start = torch.zeros(r, dtype=torch.long)
    want = tf.decode(x[:, ctx], pos[:, -1] + 1, caches[0], torch.tensor(ctx), start)
    emb = x[:, ctx] + tf.pos(pos[:, -1] + 1)
    got = tf.decode_embedded(emb, caches[1], ctx, start, torch.tensor(ctx + 1), ctx + 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_mlp_is_a_sequential_with_the_same_parameters():
    """The fused MLP keeps nn.Sequential's layers and parameter names (checkpoints load as
    before) and, on the reference path, computes exactly what the Sequential did."""
    from matwm_fast.nn import mlp

    torch.manual_seed(0)
    m = mlp(6, 8, 2, 3)
    plain = torch.nn.Sequential(*m)
    assert list(m.state_dict()) == list(plain.state_dict()) == [
        "0.weight", "1.weight", "1.bias", "3.weight", "4.weight", "4.bias", "6.weight", "6.bias"]
    x = torch.randn(5, 6)
    assert torch.equal(m(x), plain(x))
    assert torch.equal(m.run(plain[0](x), start=1), plain[1:](plain[0](x)))  # the mixer's use: from layer 1 on


def test_triton_norms_equal_reference_in_the_world_model():
    """Built with ``kernels="triton"`` every LayerNorm (+ SiLU) is the fused kernel, forward and
    backward: encoder, mixer, both transformers and heads match the reference build (float32)."""
    from matwm_fast import kernels

    if not kernels.triton_runs_on("cpu"):
        pytest.skip(kernels.why_triton_cannot_run("cpu"))
    cfg = preset("smoke").wm
    obs, act, first, agent = batch(r=4, t=6)
    mask, pos = segment_mask(first)
    grads, outs = {}, {}
    for impl in ("ref", "triton"):
        torch.manual_seed(0)
        m = WorldModel(cfg, SPEC, impl)
        z = m.encoder(obs.float())  # (R, T, K·C) logits stand in for latents: differentiable
        h = m.seq(m.mix(z, agent, act), pos, mask)  # (R, T, D)
        team = m.teammates(z, pos, mask, agent)  # (R, T, N-1, A)
        out = torch.cat([h.flatten(1), m.dyn_head(h).flatten(1), team.flatten(1).clamp(-50, 50)], 1)
        out.square().mean().backward()
        outs[impl] = out.detach()
        grads[impl] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    torch.testing.assert_close(outs["triton"], outs["ref"], rtol=1e-4, atol=1e-4)
    assert grads["triton"].keys() == grads["ref"].keys()
    for n in grads["ref"]:
        torch.testing.assert_close(grads["triton"][n], grads["ref"][n], rtol=1e-3, atol=1e-5, msg=n)
