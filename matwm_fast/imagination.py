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
from typing import Callable

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
    """The two key/value caches of a rollout, allocated once per (rows, L, H) and reused, and the
    cache slot of every imagined step."""

    seq: KVCache  # sequence model: L + H tokens
    team: KVCache  # teammate predictor: L + H + 1 latents
    slots: Tensor  # (H+1,) long: imagined step t writes cache slot L + t

    @staticmethod
    def allocate(wm: WorldModel, rows: int, context: int, horizon: int, device, dtype=torch.float32) -> "ImagCaches":
        caches = ImagCaches(wm.seq.allocate_cache(rows, context + horizon, device, dtype),
                            wm.teammates.tf.allocate_cache(rows, context + horizon + 1, device, dtype),
                            torch.arange(context, context + horizon + 1, device=device))
        # the rollout writes these in place; a static address lets a CUDA graph capture the
        # writes instead of treating the caches as fresh inputs (or refusing to graph at all)
        for t in caches.seq.tensors() + caches.team.tensors() + (caches.slots,):
            torch._dynamo.mark_static_address(t)
        return caches


# ----------------------------------------------------------------------------- the pieces
# A rollout is a prefill, H decode steps and the last state.  :func:`imagine` strings them
# together; compiling the pieces (one graph per piece, the decode graph run H times) instead of
# the whole unrolled rollout keeps compilation independent of H (steps.compile_steps).
def prefill(wm: WorldModel, obs: Tensor, act: Tensor, first: Tensor, agent: Tensor, caches: ImagCaches,
            u_ctx: Tensor | None, u_z0: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One causal pass over the contexts fills both caches (Algorithm 1, line 2) and draws z_0
    from the last context step, as STORM: (z_0 (R, K·C), h_0 (R, D), kv_start (R,), next_pos (R,))."""
    z_ctx, _ = wm.posterior(obs, u_ctx)  # (R, L, K·C)
    mask, pos = segment_mask(first)  # (R, L, L), (R, L)
    h = wm.seq(wm.mix(z_ctx, agent, act), pos, mask, caches.seq)[:, -1]  # (R, D) h_0
    wm.teammates(z_ctx, pos, mask, agent, caches.team)
    z, _ = wm.prior(h, u_z0)  # (R, K·C)
    # keys before the last context step's episode start are never attended (no leak across resets)
    kv_start = (act.shape[1] - 1) - pos[:, -1]  # (R,)
    return z, h, kv_start, pos[:, -1] + 1


def state(wm: WorldModel, z: Tensor, h: Tensor, agent: Tensor, next_pos: Tensor, slot: Tensor, kv_start: Tensor,
          caches: ImagCaches) -> Tensor:
    """s_t = [z_t, h_t, teammate probabilities] at cache slot ``slot`` = L + t: (R, S)."""
    t = slot - caches.slots[0]  # 0-dim: the imagined step
    team = wm.teammates.decode(z, next_pos + t, agent, caches.team, slot, kv_start)  # (R, N-1, A)
    return agent_state(z, h, team, caches.seq.dtype)  # (R, S) in the rollout's compute dtype


def step(wm: WorldModel, ac: ActorCritic, z: Tensor, h: Tensor, agent: Tensor, next_pos: Tensor, slot: Tensor,
         kv_start: Tensor, caches: ImagCaches, n: int, idx: Tensor | None, u_act: Tensor | None,
         u_z: Tensor | None) -> tuple[Tensor, ...]:
    """One imagined step t (Algorithm 1, lines 4–7): s_t, each agent's own action a_t, then
    h_{t+1}, r_t, c_t and z_{t+1}.  Returns (s_t, a_t, r_t, c_t, z_{t+1}, h_{t+1})."""
    r = z.shape[0]
    s = state(wm, z, h, agent, next_pos, slot, kv_start, caches)  # (R, S)
    a = ac.act(s.view(n, r // n, -1), None if u_act is None else u_act.view(n, r // n, -1), idx=idx).view(r)  # (R,)
    h = wm.seq.decode(wm.mix(z, agent, a), next_pos + (slot - caches.slots[0]), caches.seq, slot, kv_start)  # (R, D)
    rew_logits, con_logit = wm.heads(h)  # (R, NB), (R,)
    z, _ = wm.prior(h, u_z)  # (R, K·C)
    return s, a, two_hot_decode(rew_logits, wm.bins), (con_logit > 0).float(), z, h


@dataclass(frozen=True)
class Pieces:
    """What :func:`imagine` calls: the functions above, or their compiled graphs."""

    prefill: Callable = prefill
    step: Callable = step
    state: Callable = state


EAGER = Pieces()


def imagine(wm: WorldModel, ac: ActorCritic, obs: Tensor, act: Tensor, first: Tensor, agents: Tensor,
            horizon: int, caches: ImagCaches, noise: ImagNoise | None = None, pieces: Pieces = EAGER) -> Rollout:
    """Prefill 8-step contexts, then ``horizon`` decode steps with the agents' own actors.

    obs (R, L, O), act (R, L), first (R, L): R = n·B context rows, agent-major; agents (n,) which
    agent each block of B rows belongs to (all N agents must come in order).  Call under ``torch.no_grad()``.
    """
    r = act.shape[0]
    n = agents.shape[0]
    b = r // n
    draws = noise is not None  # else every sampler draws its own uniforms
    agent = agents.repeat_interleave(b)  # (R,) row → agent
    # all agents in order: use the stacked weights as they are (no per-step gather of weights)
    idx = None if n == ac.action_mask.shape[0] else agents
    if caches.slots.shape[0] != horizon + 1:
        raise ValueError(f"caches hold {caches.slots.shape[0] - 1} imagined steps, the rollout wants {horizon}")

    z, h, kv_start, next_pos = pieces.prefill(wm, obs, act, first, agent, caches, noise.ctx if draws else None,
                                              noise.latent[:, 0] if draws else None)
    out: list[tuple[Tensor, ...]] = []
    for t in range(horizon):
        s, a, rew, con, z, h = pieces.step(wm, ac, z, h, agent, next_pos, caches.slots[t], kv_start, caches, n, idx,
                                           noise.action[:, t] if draws else None,
                                           noise.latent[:, t + 1] if draws else None)
        out.append((s, a, rew, con))
    last = pieces.state(wm, z, h, agent, next_pos, caches.slots[horizon], kv_start, caches)  # (R, S) s_H

    def stack(xs: list[Tensor]) -> Tensor:
        y = torch.stack(xs, dim=1)  # (R, T, ...)
        return y.view(n, b, *y.shape[1:])  # (n, B, T, ...)

    states, actions, rewards, conts = map(list, zip(*out))  # H ≥ 1 (config rule)
    return Rollout(stack(states + [last]), stack(actions), stack(rewards), stack(conts))
