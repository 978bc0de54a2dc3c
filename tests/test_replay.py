"""Replay: recency law 0.9998**age, no overlap, episode flags, uniform contexts, O(batch) sampling."""

import numpy as np
import pytest
import torch

from matwm_fast.replay import ReplayBuffer


def filled(n_agents=2, size=3000, capacity=4000, episode=25, obs_dim=3, seed=0):
    rb = ReplayBuffer(n_agents, obs_dim, capacity, seed=seed)
    for t in range(size):
        obs = np.full((n_agents, obs_dim), t, np.float32)  # obs encodes the global step
        rb.add(obs, np.arange(n_agents) + t % 3, np.zeros(n_agents), np.ones(n_agents), first=(t % episode == 0))
    return rb


def test_recency_law_matches_geometric_weights():
    rb = filled(n_agents=1, size=3000)
    decay, length = 0.999, 4  # a stronger decay than the paper's makes the test sharp with few draws
    ages = rb.sample_recent_ages(200_000, length, decay)
    valid = np.arange(length - 1, rb.size)
    assert ages.min() >= length - 1 and ages.max() <= rb.size - 1
    # bin ages in 10 equal-probability... use 15 contiguous bins and a chi-square test
    edges = np.linspace(length - 1, rb.size, 16).astype(int)
    w = decay ** valid.astype(float)
    expected = np.array([w[(valid >= a) & (valid < b)].sum() for a, b in zip(edges[:-1], edges[1:])])
    expected = expected / expected.sum() * ages.size
    observed = np.histogram(ages, bins=edges)[0]
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 40, chi2  # 14 dof: p ≈ 3e-4; a uniform sampler scores in the thousands
    uniform = np.histogram(np.random.default_rng(0).integers(length - 1, rb.size, ages.size), bins=edges)[0]
    assert ((uniform - expected) ** 2 / expected).sum() > 1000


def test_paper_decay_mean_age():
    rb = filled(n_agents=1, size=3000)
    ages = rb.sample_recent_ages(100_000, 64, 0.9998)
    j = np.arange(rb.size - 63)
    w = 0.9998 ** (j + 63)
    assert ages.mean() == pytest.approx(((j + 63) * w).sum() / w.sum(), rel=0.01)


def test_sequences_never_overlap_and_are_contiguous():
    rb = filled(n_agents=3, size=600, capacity=700)
    for _ in range(50):
        b = rb.sample_sequences(per_agent=4, length=64, decay=0.9998)
        steps = b.obs[..., 0].long()  # (R, T) the global step of each row's entries
        assert (steps[:, 1:] - steps[:, :-1] == 1).all()  # contiguous in time, newest-first ring handled
        for a in range(3):
            rows = steps[b.agent == a]
            assert rows.unique().numel() == rows.numel()  # no transition twice within an agent's batch
        assert torch.equal(b.agent, torch.arange(3).repeat_interleave(4))


def test_episode_boundaries_are_flagged():
    rb = filled(n_agents=1, size=500, episode=25)
    b = rb.sample_sequences(per_agent=4, length=64, decay=0.9998)
    steps = b.obs[..., 0].long()
    assert torch.equal(b.first, steps % 25 == 0)  # every episode start inside a window is marked


def test_ring_buffer_wraps_and_keeps_newest():
    rb = filled(n_agents=1, size=1000, capacity=300)
    assert len(rb) == 300
    b = rb.sample_sequences(per_agent=2, length=64, decay=1.0)
    assert b.obs[..., 0].min() >= 700  # only the 300 newest steps remain


def test_contexts_uniform_and_team_actions():
    rb = filled(n_agents=3, size=1000, capacity=2000)
    c = rb.sample_contexts(per_agent=5000, length=8)
    last = c.obs[:, -1, 0].long()  # (R,) step of the context's last entry
    assert last.min() >= 7 and last.max() <= 999
    hist = np.histogram(last.numpy(), bins=10, range=(7, 1000))[0]
    assert hist.min() > 0.8 * hist.mean()  # roughly flat
    # teammate actions are the other agents' actions at the same step
    steps = c.obs[..., 0].long()
    own = c.act
    assert torch.equal(own, c.agent[:, None] + steps % 3)
    for i in range(3):
        rows = c.agent == i
        others = [j for j in range(3) if j != i]
        expect = torch.stack([j + steps[rows] % 3 for j in others], -1)
        assert torch.equal(c.team_act[rows], expect)


def test_too_small_buffer_errors():
    rb = filled(n_agents=1, size=100)
    with pytest.raises(ValueError, match="disjoint"):
        rb.sample_sequences(per_agent=2, length=64, decay=0.9998)
