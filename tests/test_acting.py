"""Acting: the whole-queue, masked policy step equals acting on exactly this episode's steps (the
plain variable-length formulation), for every queue length; compiled, it never recompiles."""

import pytest
import torch

from matwm_fast import acting
from matwm_fast.acting import ContextQueues, policy_step
from matwm_fast.actor_critic import agent_state
from matwm_fast.config import preset
from matwm_fast.env import EnvSpec
from matwm_fast.policy import build_networks
from matwm_fast.transformer import segment_mask

SPEC = EnvSpec(agents=("a_0", "a_1", "b_0"), obs_sizes=(5, 7, 6), action_counts=(5, 3, 4))


def models():
    torch.manual_seed(0)
    cfg = preset("smoke")
    wm, ac = (m.double() for m in build_networks(cfg, SPEC))
    # deterministic latents (the mode): both formulations then see the same z
    wm.sample = lambda logits, noise: (lambda p: (torch.nn.functional.one_hot(p.argmax(-1), wm.C).to(p.dtype).flatten(-2),
                                                  p))(torch.softmax(logits, -1))
    return cfg, wm, ac


def plain_state(wm, ac, past_obs, past_act, obs):
    """The definition: encode this episode's l queued steps and now, run the sequence model over the
    l steps (h = 0 when l = 0), the teammate predictor over z_{≤t} → s."""
    n, l = past_act.shape
    agent = torch.arange(n)
    z_now, _ = wm.posterior(obs)  # (N, K·C)
    if l > 0:
        z_past, _ = wm.posterior(past_obs)  # (N, l, K·C)
        mask, pos = segment_mask(torch.zeros(n, l, dtype=torch.bool))
        h = wm.seq(wm.mix(z_past, agent, past_act), pos, mask)[:, -1]  # (N, D)
        z_hist = torch.cat([z_past, z_now[:, None]], 1)  # (N, l+1, K·C)
    else:
        h = torch.zeros(n, wm.cfg.width, dtype=obs.dtype)
        z_hist = z_now[:, None]
    mask, pos = segment_mask(torch.zeros(n, l + 1, dtype=torch.bool))
    team = wm.teammates(z_hist, pos, mask, agent)[:, -1]
    return agent_state(z_now, h, team, obs.dtype)


def test_masked_whole_queue_equals_the_plain_definition(monkeypatch):
    cfg, wm, ac = models()
    length = cfg.train.act_context
    g = torch.Generator().manual_seed(1)
    q = ContextQueues(SPEC.n_agents, SPEC.obs_dim, length, "cpu")
    q.obs = q.obs.double()
    seen = []
    monkeypatch.setattr(acting, "agent_state", lambda *a, **k: seen.append(agent_state(*a, **k)) or seen[-1])
    for step in range(length + 3):  # past a full queue: the oldest steps roll out
        obs = torch.randn(SPEC.n_agents, SPEC.obs_dim, generator=g, dtype=torch.float64)
        with torch.no_grad():
            policy_step(wm, ac, q.obs, q.act, q.count_t, obs, greedy=True)
            want = plain_state(wm, ac, *q.view(), obs)
        torch.testing.assert_close(seen[-1], want, rtol=1e-10, atol=1e-10, msg=f"queue length {q.count}")
        q.push(obs, torch.randint(0, 3, (SPEC.n_agents,), generator=g))


def test_padding_stays_finite_and_unread():
    """Garbage in the unfilled part of the queue changes nothing."""
    cfg, wm, ac = models()
    q = ContextQueues(SPEC.n_agents, SPEC.obs_dim, cfg.train.act_context, "cpu")
    q.obs = q.obs.double()
    obs = torch.randn(SPEC.n_agents, SPEC.obs_dim, dtype=torch.float64)
    q.push(obs, torch.zeros(SPEC.n_agents, dtype=torch.long))
    with torch.no_grad():
        a = policy_step(wm, ac, q.obs, q.act, q.count_t, obs, greedy=True)
        q.obs[:, 1:] = 1e6
        q.act[:, 1:] = 2
        b = policy_step(wm, ac, q.obs, q.act, q.count_t, obs, greedy=True)
    assert torch.equal(a, b)


@pytest.mark.usefixtures("one_thread")
def test_compiled_acting_serves_every_queue_length_without_recompiling():
    from matwm_fast.trainer import build

    tr = build(preset("smoke"), device="cpu", backend="compile")
    while not tr.warm:
        tr.env_step()
    tr.choose_actions()  # compiles once
    torch._dynamo.config.error_on_recompile = True
    try:
        for _ in range(30):  # crosses an episode end: queue lengths 0 … act_context
            tr.env_step()
    finally:
        torch._dynamo.config.error_on_recompile = False
