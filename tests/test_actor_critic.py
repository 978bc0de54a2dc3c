"""Stacked per-agent networks, per-agent clipping, and the actor-critic loss."""

import torch

from matwm_fast.actor_critic import ActorCritic
from matwm_fast.config import preset
from matwm_fast.env import EnvSpec
from matwm_fast.losses import actor_critic_loss
from matwm_fast.steps import ac_loss
from matwm_fast.nn import StackedMLP, ema_update, mlp, per_agent_grad_clip

SPEC = EnvSpec(agents=("a_0", "a_1", "b_0"), obs_sizes=(4, 4, 4), action_counts=(5, 3, 5))


def test_stacked_mlp_equals_separate_mlps():
    torch.manual_seed(0)
    st = StackedMLP(3, 6, 8, 2, 4)
    x = torch.randn(3, 5, 6)
    y = st(x)
    for i in range(3):
        ref = mlp(6, 8, 2, 4)
        # copy agent i's weights into a plain MLP (nn.Linear stores W transposed)
        plain = [m for m in ref if not isinstance(m, torch.nn.SiLU)]
        stacked = [m for m in st.net if not isinstance(m, torch.nn.SiLU)]
        with torch.no_grad():
            for p, s in zip(plain, stacked):
                p.weight.copy_(s.weight[i].T if p.weight.dim() == 2 else s.weight[i, 0])
                if p.bias is not None:
                    p.bias.copy_(s.bias[i, 0])
        torch.testing.assert_close(ref(x[i]), y[i])
        torch.testing.assert_close(st(x[i:i + 1], torch.tensor([i]))[0], y[i])


def test_per_agent_clip_leaves_other_agents_alone():
    w = torch.nn.Parameter(torch.zeros(3, 4, 2))
    w.grad = torch.ones(3, 4, 2)
    w.grad[0] *= 1e6  # agent 0 explodes
    norms = per_agent_grad_clip([w], max_norm=100.0)
    assert torch.allclose(w.grad[1], torch.ones(4, 2)) and torch.allclose(w.grad[2], torch.ones(4, 2))
    assert abs(w.grad[0].norm().item() - 100.0) < 1e-3
    assert torch.allclose(norms[1:], torch.full((2,), 8.0 ** 0.5))


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    ema_update(a, b, 0.98)
    torch.testing.assert_close(a.weight.detach(), 0.98 * wa + 0.02 * wb)


def make_ac():
    torch.manual_seed(0)
    cfg = preset("smoke").ac
    bins = torch.linspace(-20, 20, 31)
    return cfg, ActorCritic(cfg, SPEC, 10, bins)


def loss_of(ac, states, actions, rewards, conts, cfg):
    """The trainer's own actor-critic step function (its reshape of N × B × (H+1) states included):
    (loss, the updated return scale, metrics)."""
    return ac_loss(ac, states, actions, rewards, conts, cfg, None, "ref")


def test_agent_loss_touches_only_its_own_weights():
    cfg, ac = make_ac()
    n, b, h = 3, 8, 4
    states = torch.randn(n, b, h + 1, 10)
    actions = torch.randint(0, 3, (n, b, h))
    rewards, conts = torch.randn(n, b, h), torch.ones(n, b, h)
    loss, _, m = loss_of(ac, states, actions, rewards, conts, cfg)
    assert m["actor_loss"].shape == (3,) and m["critic_loss"].shape == (3,)
    ac.zero_grad()
    torch.testing.assert_close(loss.detach(), (m["actor_loss"] + m["critic_loss"]).sum())
    # the gradient of the summed loss on agent 1's rows equals that of agent 1's data alone
    loss.backward()
    g_all = [p.grad[1].clone() for p in ac.actor.parameters()]
    ac.zero_grad()
    states2 = states.clone()
    states2[0] += 10.0  # change only agent 0's data
    loss2, _, _ = loss_of(ac, states2, actions, rewards, conts, cfg)
    loss2.backward()
    for g, p in zip(g_all, ac.actor.parameters()):
        torch.testing.assert_close(p.grad[1], g)


def test_return_scale_is_an_ema_of_the_percentile_range():
    cfg, ac = make_ac()
    n, b, h = 3, 64, 4
    states = torch.randn(n, b, h + 1, 10)
    actions = torch.zeros(n, b, h, dtype=torch.long)
    rewards = torch.randn(n, b, h) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1)
    _, scale, m = loss_of(ac, states, actions, rewards, torch.ones(n, b, h), cfg)
    assert "return_scale" not in m  # state, returned as such, not a metric
    assert scale[0] < scale[1] < scale[2]  # per agent, not shared
    # with V ≡ 0 at init the returns are the discounted reward sums: S = (1−d)·(q95 − q5)
    from matwm_fast.losses import lambda_returns
    g = lambda_returns(rewards, torch.ones(n, b, h), torch.zeros(n, b, h + 1), cfg.gamma, cfg.lam).flatten(1)
    rng = torch.quantile(g, 0.95, dim=1) - torch.quantile(g, 0.05, dim=1)
    torch.testing.assert_close(scale, (1 - cfg.return_scale_decay) * rng, rtol=1e-4, atol=1e-4)


def test_policy_masks_padded_actions():
    _, ac = make_ac()
    s = torch.randn(3, 2000, 10)
    a = ac.act(s)
    assert a[1].max() < 3 and a[0].max() == 4  # agent 1 has 3 actions; the others use all 5
    g = ac.act(s, greedy=True)
    assert torch.equal(g, ac.policy_logits(s).argmax(-1))


def test_batched_loss_equals_each_agents_own_loss():
    """Agent i's row of the stacked loss is the loss of agent i's networks on agent i's batch alone."""
    cfg, ac = make_ac()
    torch.nn.init.normal_(ac.critic.net[-1].weight, std=0.1)  # a non-constant value head
    n, b, h = 3, 6, 4
    states = torch.randn(n, b, h + 1, 10)
    actions = torch.randint(0, 3, (n, b, h))
    rewards, conts = torch.randn(n, b, h), (torch.rand(n, b, h) > 0.2).float()
    _, scale, m = loss_of(ac, states, actions, rewards, conts, cfg)
    for i in range(n):
        idx = torch.tensor([i])
        flat = states[i].reshape(1, -1, 10)  # (1, B·(H+1), S)
        logits = ac.policy_logits(flat, idx).view(1, b, h + 1, -1)[:, :, :-1]
        crit = ac.critic(flat, idx).view(1, b, h + 1, -1)
        slow = ac.slow_critic(flat, idx).view(1, b, h + 1, -1)
        _, si, mi = actor_critic_loss(logits, actions[i:i + 1], crit, slow, rewards[i:i + 1], conts[i:i + 1], ac.bins,
                                      ac.return_scale[idx], cfg)
        torch.testing.assert_close(scale[i], si[0])
        for k in ("actor_loss", "critic_loss", "entropy"):
            torch.testing.assert_close(m[k][i], mi[k][0])


def test_act_is_gumbel_max_over_the_policy_logits():
    """Sampling (one fused op) is argmax(policy_logits + Gumbel(u)) for given uniforms u, the
    policy's own masked logits: never a padded action."""
    _, ac = make_ac()
    torch.nn.init.normal_(ac.actor.net[-1].weight, std=1.0)
    s = torch.randn(3, 50, 10)
    u = torch.rand(3, 50, 5)
    gumbel = -torch.log(-torch.log(u.clamp(torch.finfo(u.dtype).tiny, 1.0 - 1e-7)))
    a = ac.act(s, u)
    assert torch.equal(a, (ac.policy_logits(s) + gumbel).argmax(-1))
    assert a[1].max() < 3


def test_triton_actor_critic_equals_reference():
    """kernels="triton" (fused per-agent LayerNorm + SiLU, forward and backward; the fused sampler)
    gives the reference build's logits, gradients and actions (float32)."""
    import pytest

    from matwm_fast import kernels

    if not kernels.triton_runs_on("cpu"):
        pytest.skip(kernels.why_triton_cannot_run("cpu"))
    cfg = preset("smoke").ac
    s, u = torch.randn(3, 7, 10), torch.rand(3, 7, 5)
    out = {}
    for impl in ("ref", "triton"):
        torch.manual_seed(0)
        ac = ActorCritic(cfg, SPEC, 10, torch.linspace(-20, 20, 31), impl)
        torch.nn.init.normal_(ac.critic.net[-1].weight, std=0.1)
        logits, values = ac.policy_logits(s), ac.critic(s)
        (logits.clamp(-50, 50).square().mean() + values.square().mean()).backward()
        out[impl] = (logits.detach(), values.detach(), ac.act(s, u), ac.act(s[:2], u[:2], idx=torch.tensor([0, 2])),
                     [p.grad for p in ac.parameters() if p.grad is not None])
    for a, b in zip(out["ref"][:4], out["triton"][:4]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(out["ref"][4], out["triton"][4]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
