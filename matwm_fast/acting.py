"""Acting in the real environment (SPEC §6): decentralised, each agent from its own history.

Each agent keeps a queue of its last ``act_context`` (observation, action) pairs, cleared at an
episode start.  To act at step t: z_t is the posterior sample of the current observation, h_t
the sequence model's output at the last queued step (the same h that imagination pairs with z_t),
p_t the teammate predictor over z_{≤t}; the actor samples (or, greedy, takes the argmax) from
[z_t, h_t, p_t].  All agents are rows of one batch; no agent sees another's observations.

**CHOICE**: at an episode's first step the queue is empty and h_t is the zero vector.
"""

from __future__ import annotations

import torch

from .actor_critic import ActorCritic, agent_state
from .transformer import segment_mask
from .world_model import WorldModel

Tensor = torch.Tensor


class ContextQueues:
    """Per-agent rolling (observation, action) history, preallocated: (N, L, O), (N, L)."""

    def __init__(self, n_agents: int, obs_dim: int, length: int, device):
        self.obs = torch.zeros(n_agents, length, obs_dim, device=device)  # (N, L, O)
        self.act = torch.zeros(n_agents, length, dtype=torch.long, device=device)  # (N, L)
        self.length, self.count = length, 0

    def reset(self) -> None:
        self.count = 0

    def push(self, obs: Tensor, act: Tensor) -> None:
        """Append one step (obs (N, O), act (N,)), dropping the oldest when full."""
        if self.count == self.length:
            self.obs = self.obs.roll(-1, dims=1)
            self.act = self.act.roll(-1, dims=1)
            self.count -= 1
        self.obs[:, self.count] = obs
        self.act[:, self.count] = act
        self.count += 1

    def view(self) -> tuple[Tensor, Tensor]:
        return self.obs[:, : self.count], self.act[:, : self.count]


@torch.no_grad()
def policy_step(wm: WorldModel, ac: ActorCritic, past_obs: Tensor, past_act: Tensor, obs: Tensor,
                greedy: bool = False) -> Tensor:
    """past_obs (N, l, O), past_act (N, l) this episode's queue; obs (N, O) now → actions (N,)."""
    n, l = past_act.shape
    agent = torch.arange(n, device=obs.device)  # (N,)
    z_now, _ = wm.posterior(obs)  # (N, K·C)
    if l > 0:
        z_past, _ = wm.posterior(past_obs)  # (N, l, K·C)
        mask, pos = segment_mask(torch.zeros(n, l, dtype=torch.bool, device=obs.device))
        h = wm.seq(wm.mix(z_past, agent, past_act), pos, mask)[:, -1]  # (N, D)
        z_hist = torch.cat([z_past, z_now[:, None]], dim=1)  # (N, l+1, K·C)
    else:
        h = torch.zeros(n, wm.cfg.width, device=obs.device)  # (N, D)
        z_hist = z_now[:, None]  # (N, 1, K·C)
    mask, pos = segment_mask(torch.zeros(n, l + 1, dtype=torch.bool, device=obs.device))
    team = wm.teammates(z_hist, pos, mask, agent)[:, -1]  # (N, N-1, A)
    s = agent_state(z_now, h, team)  # (N, S)
    return ac.act(s[:, None], greedy=greedy)[:, 0]  # (N,)
