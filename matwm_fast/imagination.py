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

Under bf16 the rollout runs on bf16 twins of the world model and the actors
(:class:`ImagWeights`), refreshed from the trained float32 weights at its start, with autocast
off: no weight is cast per call, and no op is sent to float32 and back by autocast's policy
(on CUDA it runs LayerNorm, softmax and sums in float32, two conversions each).  What the
rollout shares across its steps — positional embeddings, the action mixer's columns, the
teammate mask, the attended cache range — is made once, in :func:`prefill` (:class:`Plan`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import torch

from .actor_critic import ActorCritic, agent_state
from .losses import twohot_decode
from .nn import LowPrecisionCopy
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
class ImagWeights:
    """Low-precision twins of the world model and the actors, for imagination only (no grad).

    :meth:`refresh` copies the float32 weights in — every parameter of both, one
    ``torch._foreach_copy_`` — and :func:`imagine` calls it at the start of each rollout, so a
    rollout always reads the weights of the latest optimiser steps, whatever replaced them in
    between (Adam, ``load_state_dict``), and the trainer makes no call of its own."""

    wm: WorldModel  # bf16 twin (its buffers — bins, masks — stay as they are)
    ac: ActorCritic  # bf16 twin of the actors; critic and slow critic left out (None)
    sources: tuple[WorldModel, ActorCritic]
    copies: tuple[LowPrecisionCopy, LowPrecisionCopy]

    @staticmethod
    def make(wm: WorldModel, ac: ActorCritic, dtype: torch.dtype) -> "ImagWeights":
        copies = (LowPrecisionCopy(wm, dtype), LowPrecisionCopy(ac, dtype, leave_out=("critic", "slow_critic")))
        return ImagWeights(copies[0].module, copies[1].module, (wm, ac), copies)

    def refresh(self, wm: WorldModel, ac: ActorCritic) -> tuple[WorldModel, ActorCritic]:
        """Copy ``wm``'s and ``ac``'s weights in; returns the twins."""
        if wm is not self.sources[0] or ac is not self.sources[1]:
            raise ValueError("these imagination caches hold weight copies of other modules than the rollout's")
        with torch.no_grad():
            torch._foreach_copy_([*self.copies[0].dst, *self.copies[1].dst],
                                 [*self.copies[0].src, *self.copies[1].src])
        return self.wm, self.ac


@dataclass
class ImagCaches:
    """What a rollout of (rows, L, H) writes or reads at fixed addresses, allocated once and
    reused: the two key/value caches, per-step constants, and (under bf16) the weight twins."""

    seq: KVCache  # sequence model: L + H tokens
    team: KVCache  # teammate predictor: L + H + 1 latents
    slots: Tensor  # (H+1,) long: imagined step t writes cache slot L + t
    steps: Tensor  # (H+1,) long: t, the index a compiled step graph receives
    kv_len: Tensor  # (H+1,) long: step t attends slots < L + t + 1
    ahead: Tensor  # (H+1,) long: 1 + t, step t's position after the last context step's
    offsets: Tensor  # (H+2,) int64: Philox offsets of the Triton sampler's latent draws (context, z_0 … z_H)
    act_offsets: Tensor  # (H+1,) int64: Philox offsets of the Triton sampler's action draws a_0 … a_{H-1}
    context: int  # L
    weights: ImagWeights | None = None

    @staticmethod
    def allocate(wm: WorldModel, rows: int, context: int, horizon: int, device, dtype=torch.float32,
                 ac: ActorCritic | None = None) -> "ImagCaches":
        """``dtype``: the caches' and the rollout's compute dtype; when it is narrower than the
        weights and ``ac`` is given, the rollout runs on twins of ``wm`` and ``ac`` in it."""
        steps = torch.arange(horizon + 1, device=device)  # (H+1,)
        k = wm.K
        # one counter per latent variable: the context's R·L·K draws, then R·K per prior draw
        offsets = torch.cat([steps.new_zeros(1), rows * context * k + rows * k * steps])  # (H+2,)
        act_offsets = rows * wm.A * steps  # (H+1,): one counter per (row, action), from another seed
        weights = None
        if ac is not None and dtype != wm.param_dtype and dtype in (torch.bfloat16, torch.float16):
            weights = ImagWeights.make(wm, ac, dtype)
        caches = ImagCaches(wm.seq.allocate_cache(rows, context + horizon, device, dtype),
                            wm.teammates.tf.allocate_cache(rows, context + horizon + 1, device, dtype),
                            context + steps, steps, context + 1 + steps, 1 + steps, offsets, act_offsets, context,
                            weights)
        # the rollout writes these in place; a static address lets a CUDA graph capture the
        # writes instead of treating the caches as fresh inputs (or refusing to graph at all)
        for t in caches.seq.tensors() + caches.team.tensors() + (caches.slots, caches.steps, caches.kv_len,
                                                                 caches.ahead, caches.offsets, caches.act_offsets):
            torch._dynamo.mark_static_address(t)
        return caches

    def at(self, t: int | Tensor) -> tuple[int | Tensor, int | None]:
        """Step t's cache slot and the host bound on the slots it reads: (L + t, L + t + 1) for a
        host t (an unrolled rollout: each step reads only its live slots), (the device slot,
        None) for a device t (one compiled step graph for every t: the whole cache, masked)."""
        if isinstance(t, int):
            return self.context + t, self.context + t + 1
        return pick(self.slots, t), None


def pick(x: Tensor, t: int | Tensor) -> Tensor:
    """x[t]: a view for a host t; a gather for a device t (a 0-dim index would be read on the host:
    a compiled graph cannot take it as data)."""
    return x[t] if isinstance(t, int) else x[t.view(1)].squeeze(0)


class Plan(NamedTuple):
    """What every imagined step of one rollout shares, made once by :func:`prefill`."""

    kv_start: Tensor  # (R,) first attended cache slot: keys before the last context episode's start are dead
    seq_pe: Tensor  # (H+1, R, D) the sequence model's positional embedding of imagined step t
    team_bias: Tensor | None  # (H+1, R, Dtp) the teammate predictor's input bias of step t (None: predictor off)
    team_invalid: Tensor  # (R, N-1, A) bool: each row's unavailable teammate actions
    mix: Tensor  # (N, A, D) the action mixer's first layer per scaled action, bias included
    seeds: Tensor | None  # (2,) int64: the Triton samplers' seeds of this rollout (latents, actions); None: reference


# ----------------------------------------------------------------------------- the pieces
# A rollout is a prefill, H decode steps and the last state.  :func:`imagine` strings them
# together; compiling the pieces (one graph per piece, the decode graph run H times) instead of
# the whole unrolled rollout keeps compilation independent of H (steps.compile_steps).
def _rng(seeds: Tensor | None, caches: ImagCaches, draw: int | Tensor) -> tuple[Tensor, Tensor] | None:
    """(seed, offset) of the latent draw number ``draw`` (0: the context, 1 + t: z_t)."""
    return None if seeds is None else (seeds[0], pick(caches.offsets, draw))


def prefill(wm: WorldModel, obs: Tensor, act: Tensor, first: Tensor, agent: Tensor, caches: ImagCaches,
            u_ctx: Tensor | None, u_z0: Tensor | None) -> tuple[Tensor, Tensor, Plan]:
    """One causal pass over the contexts fills both caches (Algorithm 1, line 2) and draws z_0
    from the last context step, as STORM: (z_0 (R, K·C), h_0 (R, D), the rollout's :class:`Plan`)."""
    own_draws = u_ctx is None and wm.kernels == "triton"  # the reference draws from torch's generator
    seeds = torch.randint(0, 2**62, (2,), dtype=torch.int64, device=obs.device) if own_draws else None  # (2,)
    z_ctx, _ = wm.posterior(obs, u_ctx, _rng(seeds, caches, 0))  # (R, L, K·C)
    mask, pos = segment_mask(first)  # (R, L, L), (R, L)
    h = wm.seq(wm.mix(z_ctx, agent, act), pos, mask, caches.seq)[:, -1]  # (R, D) h_0
    wm.teammates(z_ctx, pos, mask, agent, caches.team)
    z, _ = wm.prior(h, u_z0, _rng(seeds, caches, 1))  # (R, K·C)
    # keys before the last context step's episode start are never attended (no leak across resets)
    kv_start = (act.shape[1] - 1) - pos[:, -1]  # (R,)
    step_pos = pos[:, -1] + caches.ahead[:, None]  # (H+1, R): imagined step t sits at position last + 1 + t
    team_bias, team_invalid = wm.teammates.step_inputs(agent, step_pos)
    return z, h, Plan(kv_start, wm.seq.pos(step_pos), team_bias, team_invalid, wm.mix_table(), seeds)


def state(wm: WorldModel, z: Tensor, h: Tensor, agent: Tensor, plan: Plan, t: int | Tensor,
          caches: ImagCaches) -> Tensor:
    """s_t = [z_t, h_t, teammate probabilities] of imagined step t (a host int when unrolled, a
    0-dim device tensor in a compiled step graph): (R, S)."""
    slot, live = caches.at(t)
    bias = None if plan.team_bias is None else pick(plan.team_bias, t)  # (R, Dtp)
    team = wm.teammates.decode_step(z, bias, plan.team_invalid, agent, caches.team, slot, plan.kv_start,
                                    pick(caches.kv_len, t), live)  # (R, N-1, A)
    return agent_state(z, h, team, caches.seq.dtype)  # (R, S) in the rollout's compute dtype


def step(wm: WorldModel, ac: ActorCritic, z: Tensor, h: Tensor, agent: Tensor, plan: Plan, t: int | Tensor,
         caches: ImagCaches, n: int, idx: Tensor | None, u_act: Tensor | None,
         u_z: Tensor | None) -> tuple[Tensor, ...]:
    """One imagined step t (Algorithm 1, lines 4–7): s_t, each agent's own action a_t, then
    h_{t+1} and z_{t+1}.  Returns (s_t, a_t, z_{t+1}, h_{t+1}); r_t and c_t, which nothing in
    the rollout reads, come from h_{t+1} after the last step (:func:`outcomes`)."""
    r = z.shape[0]
    s = state(wm, z, h, agent, plan, t, caches)  # (R, S)
    rng = None if plan.seeds is None else (plan.seeds[1], pick(caches.act_offsets, t))
    a = ac.act(s.view(n, r // n, -1), None if u_act is None else u_act.view(n, r // n, -1), idx=idx,
               rng=rng).view(r)  # (R,)
    slot, live = caches.at(t)
    x = wm.mix_step(z, plan.mix, agent, a) + pick(plan.seq_pe, t)  # (R, D) token e_t with its position
    h = wm.seq.decode_embedded(x, caches.seq, slot, plan.kv_start, pick(caches.kv_len, t), live)  # (R, D)
    z, _ = wm.prior(h, u_z, _rng(plan.seeds, caches, t + 2))  # (R, K·C)
    return s, a, z, h


def outcomes(wm: WorldModel, h: Tensor) -> tuple[Tensor, Tensor]:
    """r_t and c_t of every imagined step from h_{t+1}, (R, H, D) → (R, H) each: the reward and
    continuation heads once over the whole rollout rather than once per step (row-wise maps:
    the same numbers, H times fewer launches).  c_t is the Bernoulli mode, 1 where p > 0.5."""
    rew_logits, con_logit = wm.heads(h)  # (R, H, NB), (R, H)
    return twohot_decode(rew_logits, wm.bins), (con_logit > 0).float()


@dataclass(frozen=True)
class Pieces:
    """What :func:`imagine` calls: the functions above, or their compiled graphs.  ``unrolled``:
    they take each step's index as a host int (eager, or one compiled graph of the whole
    rollout); a graph compiled once for every step takes it as a device tensor."""

    prefill: Callable = prefill
    step: Callable = step
    state: Callable = state
    unrolled: bool = False


EAGER = Pieces(unrolled=True)


def imagine(wm: WorldModel, ac: ActorCritic, obs: Tensor, act: Tensor, first: Tensor, agents: Tensor,
            horizon: int, caches: ImagCaches, noise: ImagNoise | None = None, pieces: Pieces = EAGER) -> Rollout:
    """Prefill 8-step contexts, then ``horizon`` decode steps with the agents' own actors.

    obs (R, L, O), act (R, L), first (R, L): R = n·B context rows, agent-major; agents (n,) which
    agent each block of B rows belongs to (all N agents must come in order).  Call under ``torch.no_grad()``.
    With weight twins in ``caches`` the rollout runs on them, with autocast off (their dtype is
    the compute dtype).
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
    precision = contextlib.nullcontext()
    if caches.weights is not None:
        wm, ac = caches.weights.refresh(wm, ac)
        precision = torch.autocast(obs.device.type, enabled=False)

    with precision:
        z, h, plan = pieces.prefill(wm, obs, act, first, agent, caches, noise.ctx if draws else None,
                                    noise.latent[:, 0] if draws else None)
        states, actions, hs = [], [], []
        for t in range(horizon):
            at = t if pieces.unrolled else caches.steps[t]
            s, a, z, h = pieces.step(wm, ac, z, h, agent, plan, at, caches, n, idx,
                                     noise.action[:, t] if draws else None, noise.latent[:, t + 1] if draws else None)
            states.append(s)
            actions.append(a)
            hs.append(h)
        states.append(pieces.state(wm, z, h, agent, plan, horizon if pieces.unrolled else caches.steps[horizon],
                                   caches))  # (R, S) s_H
        rewards, conts = outcomes(wm, torch.stack(hs, dim=1))  # (R, H) each

    def stack(xs: list[Tensor]) -> Tensor:
        y = torch.stack(xs, dim=1)  # (R, T, ...)
        return y.view(n, b, *y.shape[1:])  # (n, B, T, ...)

    return Rollout(stack(states), stack(actions), rewards.view(n, b, horizon), conts.view(n, b, horizon))
