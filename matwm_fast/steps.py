"""The five pure step functions of a training step, and the one place that compiles them.

One env step of Algorithm 2 after warm-up is, in order (the trainer calls them; nothing here
holds state):

1. :func:`wm_loss` — the shared world model on real sequences and paper Eq. 3;
2. :func:`wm_opt_step` — its global-norm clip and Adam step (after autograd's backward);
3. :func:`rollout` — Algorithm 1 for every agent at once (prefill, then H decode steps);
4. :func:`ac_loss` — every agent's actor and critic on its own imagined batch, Eqs. 10–13, and
   the return scale updated on it;
5. :func:`ac_opt_step` — per-agent clip, Adam, slow-critic EMA, and the new return scale stored.

Each is a function of explicit arguments (modules, optimisers, tensors, config sections), so
:func:`compile_steps` can hand them to ``torch.compile`` as they are, the way gpt-fast rebinds
its ``decode_one_token``; the backward between a loss and its optimiser step is autograd's
(AOTAutograd's compiled backward under a compiled backend).

How they run — device, backend, kernels, precision — is resolved once per entry point by
:func:`matwm_fast.runtime.resolve_runtime`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from .acting import policy_step
from .actor_critic import ActorCritic
from .config import ActorCriticConfig
from . import imagination as imag
from .imagination import EAGER, ImagCaches, ImagNoise, Pieces, Rollout
from .losses import actor_critic_loss, world_model_loss
from .nn import ema_update, per_agent_grad_clip
from .runtime import Runtime, autocast, eager_ops
from .world_model import WorldModel

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- the five pieces
def wm_loss(wm: WorldModel, obs: Tensor, act: Tensor, rew: Tensor, cont: Tensor, first: Tensor, team_act: Tensor,
            agent: Tensor, amp: torch.dtype | None, kernels: str) -> tuple[Tensor, dict[str, Tensor]]:
    """Paper Eq. 3 on the combined batch of all agents: R = N·(B/N) rows of T steps."""
    with autocast(obs.device, amp):
        out = wm.observe(obs, act, first, agent)
    return world_model_loss(out, obs, rew, cont, team_act, wm.obs_mask[agent], wm.bins, wm.cfg, kernels)


def optimizer_step(opt: torch.optim.Optimizer) -> None:
    """``opt.step()`` minus torch.optim's two deliberate graph breaks around it (pytorch#104053).

    They exist to trace the update as a no-grad graph; the optimiser pieces below run under
    ``torch.no_grad()`` themselves, so the undecorated step traces into the same graph as the clip
    before it and the EMA after it: one compiled region and one guard check per piece, not three
    or four (each check ~0.2 ms at the ``cpu`` preset).  The step is torch's own code, unwrapped."""
    inspect.unwrap(type(opt).step)(opt)


def wm_opt_step(wm: WorldModel, opt: torch.optim.Optimizer, grad_clip: float) -> Tensor:
    with torch.no_grad():
        norm = torch.nn.utils.clip_grad_norm_(wm.parameters(), grad_clip)
        optimizer_step(opt)
    return norm


def rollout(wm: WorldModel, ac: ActorCritic, obs: Tensor, act: Tensor, first: Tensor, agents: Tensor, horizon: int,
            caches: ImagCaches, noise: ImagNoise | None, amp: torch.dtype | None, pieces: Pieces = EAGER) -> Rollout:
    with torch.no_grad(), autocast(obs.device, amp):
        return imag.imagine(wm, ac, obs, act, first, agents, horizon, caches, noise, pieces)


# imagination's pieces, each under no_grad and autocast of its own: what the ``step`` rollout
# graph compiles (one function, one code object and one Dynamo cache each)
def rollout_prefill(*args, device: torch.device, amp: torch.dtype | None):
    with torch.no_grad(), autocast(device, amp):
        return imag.prefill(*args)


def rollout_step(*args, device: torch.device, amp: torch.dtype | None):
    with torch.no_grad(), autocast(device, amp):
        return imag.step(*args)


def rollout_state(*args, device: torch.device, amp: torch.dtype | None):
    with torch.no_grad(), autocast(device, amp):
        return imag.state(*args)


def rollout_pieces(rt: Runtime, compile_fn: Callable) -> Pieces:
    """The ``step`` rollout graph: :func:`rollout` strings together the compiled pieces."""
    return Pieces(*(partial(compile_fn(f), device=rt.device, amp=rt.amp)
                    for f in (rollout_prefill, rollout_step, rollout_state)))


def ac_loss(ac: ActorCritic, states: Tensor, actions: Tensor, rewards: Tensor, continues: Tensor,
            cfg: ActorCriticConfig, amp: torch.dtype | None, kernels: str) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Eqs. 10–13 for every agent at once, each on its own imagined batch: states (N, B, H+1, S).
    Returns ``(loss, scale, metrics)``, scale the return scale updated on this batch, (N,), which
    :func:`ac_opt_step` stores in ``ac.return_scale``.

    The networks run under ``amp`` (their matmuls are most of the update's FLOPs); the loss
    itself — softmaxes, λ-returns, percentiles, cross-entropies — is computed in float32."""
    n, b, h1, s = states.shape
    flat = states.reshape(n, b * h1, s)  # (N, B·(H+1), S): each agent's actor sees only its rows
    with autocast(states.device, amp):
        logits = ac.policy_logits(flat).view(n, b, h1, -1)[:, :, :-1]  # (N, B, H, A)
        critic_logits = ac.critic(flat).view(n, b, h1, -1)  # (N, B, H+1, NB)
        with torch.no_grad():
            slow_logits = ac.slow_critic(flat).view(n, b, h1, -1)  # (N, B, H+1, NB)
    return actor_critic_loss(logits, actions, critic_logits, slow_logits, rewards, continues, ac.bins,
                             ac.return_scale, cfg, kernels)


def ac_opt_step(ac: ActorCritic, opt: torch.optim.Optimizer, new_scale: Tensor,
                cfg: ActorCriticConfig) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        actor_norm = per_agent_grad_clip(ac.actor_params(), cfg.grad_clip)  # (N,)
        critic_norm = per_agent_grad_clip(ac.critic_params(), cfg.grad_clip)  # (N,)
        optimizer_step(opt)
        ema_update(ac.slow_critic, ac.critic, cfg.slow_critic_decay)
        ac.return_scale.copy_(new_scale)
    return actor_norm, critic_norm


# ----------------------------------------------------------------------------- compiling
@dataclass(frozen=True)
class Steps:
    """The five pieces, and acting, as one backend runs them."""

    wm_loss: Callable
    wm_opt_step: Callable
    rollout: Callable
    ac_loss: Callable
    ac_opt_step: Callable
    act: Callable  # acting.policy_step: static shapes, so one graph serves every queue length


def compile_options(rt: Runtime, optimizer: bool = False) -> dict:
    """Inductor's options for every compiled step function (and the tests that compile one);
    ``optimizer``: for the clip-Adam-EMA pieces."""
    return {
        # Inductor guards every indirect load (embeddings, gathers, cache slots) with a bounds
        # check; ours are in range by construction (positions < max_len by validation, actions
        # and slots by shape), and the eager reference still checks them all
        "assert_indirect_indexing": False,
        "triton.cudagraphs": rt.backend == "cudagraphs",
        # on the CPU the graph's wrapper in C++ rather than Python: a rollout launches hundreds of
        # small kernels and the Python calls between them add up.  Not for the optimiser steps,
        # whose C++ wrapper compiles far longer and runs no faster (bench/results/cpu-rollout-graph.md)
        "cpp_wrapper": rt.device.type == "cpu" and not optimizer,
        # Inductor's own random numbers are graph-safe Philox draws, one scalar call per element:
        # cheap on a GPU, but on the CPU the rollout's uniforms then cost more than the sampling they
        # feed (docs/performance.md); aten's generator fills them at memory speed, as in eager
        "fallback_random": rt.device.type == "cpu",
    }


def compile_steps(rt: Runtime) -> Steps:
    """``eager``: the functions above.  ``compile``: each loss as one graph, the rollout as one or
    as one per piece (``run.rollout_graph``; ``fullgraph``: a graph break is an error), static
    shapes (positions and cache slots are device tensors), so nothing recompiles between env steps.
    ``cudagraphs``: the same through Inductor's CUDA-graph trees (captured once, replayed; Adam
    ``capturable`` with tensor learning rates; random numbers from Inductor's graph-safe Philox,
    fresh on every replay).  The optimiser pieces are whole graphs too: clip, Adam and EMA in one
    (:func:`optimizer_step`)."""
    if eager_ops(rt):
        return Steps(wm_loss, wm_opt_step, rollout, ac_loss, ac_opt_step, policy_step)
    c = partial(torch.compile, fullgraph=True, dynamic=False, options=compile_options(rt))
    c_opt = partial(torch.compile, fullgraph=True, dynamic=False, options=compile_options(rt, optimizer=True))
    whole = c(rollout) if rt.rollout_graph == "whole" else partial(rollout, pieces=rollout_pieces(rt, c))
    return Steps(wm_loss=c(wm_loss), wm_opt_step=c_opt(wm_opt_step), rollout=whole, ac_loss=c(ac_loss),
                 ac_opt_step=c_opt(ac_opt_step), act=c(policy_step))
