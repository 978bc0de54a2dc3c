"""Per-agent actors and critics (SPEC §5) as stacked weights: agents are the leading batch axis.

Agent i's actor sees the semi-centralised state ``s = [z, h, teammate prediction]`` and outputs
logits over its own actions (padded actions masked); its critic outputs a 255-bin symlog two-hot
value; its slow critic is an EMA of the critic.  One module holds all N of each, so acting and
training all agents is one batched call; the loss of agent i touches only row i of each weight.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .config import ActorCriticConfig
from .env import EnvSpec
from .kernels import sample_action
from .losses import fp32
from .nn import StackedMLP

Tensor = torch.Tensor


def state_dim(k: int, c: int, d: int, n_agents: int, n_actions: int) -> int:
    """|s| = K·C (z) + D (h) + (N−1)·A (teammate prediction): the layout of :func:`agent_state`."""
    return k * c + d + max(n_agents - 1, 1) * n_actions


def agent_state(z: Tensor, h: Tensor, team_logits: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """s = [z (K·C), h (D), teammate action probabilities ((N−1)·A)] → (..., S) in ``dtype``.

    Imagination stores its states in its compute dtype: under bf16 the actor and critic read them
    in bf16 anyway, so bf16 storage halves the rollout and saves a conversion per network (z's
    0/1 are exact in bf16).  The softmax reads the logits in their own dtype: its kernels (CPU
    and CUDA) compute in float32 whatever they read, so bf16 logits give the float32 softmax
    rounded once to bf16 — what the state stores — with no conversion kernels either side.

    **CHOICE**: the teammate part is the softmax of the predictor's logits rather than raw logits:
    bounded, and padded actions are exactly 0.
    """
    team = torch.softmax(team_logits, -1).flatten(-2)  # (..., (N-1)·A)
    return torch.cat([z.to(dtype), h.to(dtype), team.to(dtype)], dim=-1)  # (..., S)


class ActorCritic(nn.Module):
    """``kernels`` ('ref' or 'triton') is the implementation its loss's fused two-hot
    cross-entropy runs with, the same choice as the world model's."""

    def __init__(self, cfg: ActorCriticConfig, spec: EnvSpec, s_dim: int, bins: Tensor, kernels: str = "ref"):
        super().__init__()
        n, a = spec.n_agents, spec.n_actions
        self.cfg, self.kernels = cfg, kernels
        self.actor = StackedMLP(n, s_dim, cfg.mlp_width, cfg.mlp_layers, a, kernels)
        self.critic = StackedMLP(n, s_dim, cfg.mlp_width, cfg.mlp_layers, bins.shape[0], kernels)
        # zero-initialised value output: V ≡ 0 at the start instead of a random offset (DreamerV3)
        nn.init.zeros_(self.critic.net[-1].weight)
        nn.init.zeros_(self.critic.net[-1].bias)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.register_buffer("bins", bins.clone(), persistent=False)
        self.register_buffer("action_mask", torch.from_numpy(spec.action_mask()), persistent=False)  # (N, A)
        # its complement, kept rather than negated at every call (a kernel per policy evaluation)
        self.register_buffer("action_invalid", ~self.action_mask, persistent=False)  # (N, A)
        # EMA of the return range S, per agent, from 0 (advantages are divided by max(1, S))
        self.register_buffer("return_scale", torch.zeros(n))  # (N,)

    def policy_logits(self, s: Tensor, idx: Tensor | None = None) -> Tensor:
        """s (n, B, S) → logits (n, B, A) with each agent's padded actions at −∞-ish."""
        invalid = self.action_invalid if idx is None else self.action_invalid[idx]  # (n, A)
        logits = fp32(self.actor(s, idx))  # (n, B, A)
        return logits.masked_fill(invalid[:, None], -1e9)

    def act(self, s: Tensor, noise: Tensor | None = None, idx: Tensor | None = None, greedy: bool = False,
            rng: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Sample (Gumbel-max on uniform ``noise`` (n, B, A), one fused op of ``kernels``) or take
        the argmax: → actions (n, B).  ``rng``: (seed, offset) device tensors for the Triton
        sampler's own generator when no noise is given (the reference draws from torch's)."""
        if greedy:
            return self.policy_logits(s, idx).argmax(-1)
        invalid = self.action_invalid if idx is None else self.action_invalid[idx]  # (n, A)
        seed, offset = rng if rng is not None else (None, None)
        return sample_action(self.actor(s, idx), invalid, noise, seed, offset, impl=self.kernels)

    def actor_params(self) -> list[nn.Parameter]:
        return list(self.actor.parameters())

    def critic_params(self) -> list[nn.Parameter]:
        return list(self.critic.parameters())
