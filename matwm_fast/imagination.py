"""Imagination (paper Algorithm 1, SPEC §4) — the hot path.

All agents' trajectories run as one batch of R = n·B rows through the shared world model
(agent-major rows: rows [i·B, (i+1)·B) belong to agent ``agents[i]``); only the actor differs by
agent, and it is applied as stacked weights in one batched call.  Since every row only ever reads
its own cache rows, its own noise and its own agent's actor, the batch is the same function as n
separate rollouts — :func:`imagine` on one agent's rows gives that agent's slice (tested).

Randomness can come in as uniform noise (:class:`ImagNoise`) so that two implementations
(batched vs per agent, reference vs Triton kernels, eager vs compiled) can be compared under the
same draws.  In training none is given: each sampler draws its own, one step at a time, inside
the step (no host round trip, and no rollout-sized noise buffer: at the paper's sizes that would
be 3,072 × 21 × 32 × 32 Gumbel uniforms, 264 MB, for every env step).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .actor_critic import ActorCritic, agent_state
from .losses import two_hot_decode
from .transformer import KVCache, segment_mask
from .world_model import WorldModel

Tensor = torch.Tensor


@dataclass
class ImagNoise:
    """Uniform(0, 1) draws for one rollout of R rows, context L, horizon H."""

    ctx: Tensor  # (R, L, K) posterior draws of the context observations, one per variable
    latent: Tensor  # (R, H+1, K) prior draws of z_0 … z_H
    action: Tensor  # (R, H, A) Gumbel noise of the actions a_0 … a_{H-1}

    @staticmethod
    def draw(rows: int, context: int, horizon: int, k: int, a: int, device,
             generator: torch.Generator | None = None) -> "ImagNoise":
        def u(*shape):
            return torch.rand(*shape, device=device, generator=generator)

        return ImagNoise(u(rows, context, k), u(rows, horizon + 1, k), u(rows, horizon, a))

    def rows(self, sl: slice) -> "ImagNoise":
        return ImagNoise(*(getattr(self, f.name)[sl] for f in fields(self)))


@dataclass
class Rollout:
    """Imagined data of n agents × B trajectories × H steps, agent-major."""

    states: Tensor  # (n, B, H+1, S) s_0 … s_H = [z, h, teammate probs]
    actions: Tensor  # (n, B, H) long
    rewards: Tensor  # (n, B, H) predicted r_t (real space)
    continues: Tensor  # (n, B, H) predicted c_t ∈ {0, 1}


@dataclass
class ImagCaches:
    """The two key/value caches of a rollout, allocated once per (rows, L, H) and reused."""

    seq: KVCache  # sequence model: L + H tokens
    team: KVCache  # teammate predictor: L + H + 1 latents

    @staticmethod
    def allocate(wm: WorldModel, rows: int, context: int, horizon: int, device, dtype=torch.float32) -> "ImagCaches":
        caches = ImagCaches(wm.seq.allocate_cache(rows, context + horizon, device, dtype),
                            wm.teammates.tf.allocate_cache(rows, context + horizon + 1, device, dtype))
        # the rollout writes these in place; a static address lets a CUDA graph capture the
        # writes instead of treating the caches as fresh inputs (or refusing to graph at all)
        for t in caches.seq.tensors() + caches.team.tensors():
            torch._dynamo.mark_static_address(t)
        return caches


def imagine(wm: WorldModel, ac: ActorCritic, obs: Tensor, act: Tensor, first: Tensor, agents: Tensor,
            horizon: int, caches: ImagCaches, noise: ImagNoise | None = None) -> Rollout:
    """Prefill 8-step contexts, then ``horizon`` decode steps with the agents' own actors.

    obs (R, L, O), act (R, L), first (R, L): R = n·B context rows, agent-major; agents (n,) which
    agent each block of B rows belongs to (all N agents must come in order).  Call under ``torch.no_grad()``.
    """
    r, ctx_len = act.shape
    n = agents.shape[0]
    b = r // n
    draws = noise is not None  # else every sampler draws its own uniforms
    agent = agents.repeat_interleave(b)  # (R,) row → agent
    # all agents in order: use the stacked weights as they are (no per-step gather of weights)
    idx = None if n == ac.action_mask.shape[0] else agents

    # 1. one causal pass over the context fills both caches (Algorithm 1, line 2)
    z_ctx, _ = wm.posterior(obs, noise.ctx if draws else None)  # (R, L, K·C)
    mask, pos = segment_mask(first)  # (R, L, L), (R, L)
    h = wm.seq(wm.mix(z_ctx, agent, act), pos, mask, caches.seq)[:, -1]  # (R, D) h_0
    wm.teammates(z_ctx, pos, mask, agent, caches.team)
    z, _ = wm.prior(h, noise.latent[:, 0] if draws else None)  # (R, K·C) z_0 from the last context step, as STORM
    # keys before the last context step's episode start are never attended (no leak across resets)
    kv_start = (ctx_len - 1) - pos[:, -1]  # (R,)
    next_pos = pos[:, -1] + 1  # (R,)
    slots = torch.arange(ctx_len, ctx_len + horizon + 1, device=obs.device)  # cache slot of step t

    states, actions, rewards, conts = [], [], [], []
    for t in range(horizon + 1):
        team = wm.teammates.decode(z, next_pos + t, agent, caches.team, slots[t], kv_start)  # (R, N-1, A)
        s = agent_state(z, h, team, caches.seq.dtype)  # (R, S) in the rollout's compute dtype
        states.append(s)
        if t == horizon:
            break
        a = ac.act(s.view(n, b, -1), noise.action[:, t].view(n, b, -1) if draws else None, idx=idx).view(r)  # (R,)
        h = wm.seq.decode(wm.mix(z, agent, a), next_pos + t, caches.seq, slots[t], kv_start)  # (R, D)
        rew_logits, con_logit = wm.heads(h)  # (R, NB), (R,)
        rewards.append(two_hot_decode(rew_logits, wm.bins))
        conts.append((con_logit > 0).float())
        actions.append(a)
        z, _ = wm.prior(h, noise.latent[:, t + 1] if draws else None)  # (R, K·C)

    def stack(xs: list[Tensor]) -> Tensor:
        y = torch.stack(xs, dim=1)  # (R, T, ...)
        return y.view(n, b, *y.shape[1:])  # (n, B, T, ...)

    return Rollout(stack(states), stack(actions), stack(rewards), stack(conts))
