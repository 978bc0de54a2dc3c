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
from .losses import fp32, two_hot_decode
from .nn import StackedMLP

Tensor = torch.Tensor


def state_dim(k: int, c: int, d: int, n_agents: int, n_actions: int) -> int:
    """|s| = K·C (z) + D (h) + (N−1)·A (teammate prediction)."""
    return k * c + d + max(n_agents - 1, 1) * n_actions


class ActorCritic(nn.Module):
    def __init__(self, cfg: ActorCriticConfig, spec: EnvSpec, s_dim: int, bins: Tensor):
        super().__init__()
        n, a = spec.n_agents, spec.n_actions
        self.cfg = cfg
        self.actor = StackedMLP(n, s_dim, cfg.mlp_width, cfg.mlp_layers, a)
        self.critic = StackedMLP(n, s_dim, cfg.mlp_width, cfg.mlp_layers, bins.shape[0])
        # zero-initialised value output: V ≡ 0 at the start instead of a random offset (DreamerV3)
        nn.init.zeros_(self.critic.net[-1].weight)
        nn.init.zeros_(self.critic.net[-1].bias)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.register_buffer("bins", bins.clone(), persistent=False)
        self.register_buffer("action_mask", torch.from_numpy(spec.action_mask()), persistent=False)  # (N, A)
        # EMA of the return range S, per agent, from 0 (advantages are divided by max(1, S))
        self.register_buffer("return_scale", torch.zeros(n))  # (N,)

    def policy_logits(self, s: Tensor, idx: Tensor | None = None) -> Tensor:
        """s (n, B, S) → logits (n, B, A) with each agent's padded actions at −∞-ish."""
        mask = self.action_mask if idx is None else self.action_mask[idx]  # (n, A)
        logits = fp32(self.actor(s, idx))  # (n, B, A)
        return logits.masked_fill(~mask[:, None], -1e9)

    def act(self, s: Tensor, noise: Tensor | None = None, idx: Tensor | None = None, greedy: bool = False) -> Tensor:
        """Sample (Gumbel-max on uniform ``noise`` (n, B, A)) or take argmax: → actions (n, B)."""
        logits = self.policy_logits(s, idx)  # (n, B, A)
        if greedy:
            return logits.argmax(-1)
        if noise is None:
            noise = torch.rand_like(logits)
        tiny = torch.finfo(noise.dtype).tiny
        gumbel = -torch.log(-torch.log(noise.clamp(tiny, 1.0 - 1e-7)))  # (n, B, A)
        return (logits + gumbel).argmax(-1)

    def value(self, s: Tensor, slow: bool = False) -> Tensor:
        """s (N, B, S) → V(s) (N, B) in real space."""
        return two_hot_decode((self.slow_critic if slow else self.critic)(s), self.bins)

    def actor_params(self) -> list[nn.Parameter]:
        return list(self.actor.parameters())

    def critic_params(self) -> list[nn.Parameter]:
        return list(self.critic.parameters())
