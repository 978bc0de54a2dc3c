"""Acting in the real environment (SPEC §6): decentralised, each agent from its own history.

Each agent keeps a queue of its last ``act_context`` (observation, action) pairs, cleared at an
episode start.  To act at step t: z_t is the posterior sample of the current observation, h_t
the sequence model's output at the last queued step (the same h that imagination pairs with z_t),
p_t the teammate predictor over z_{≤t}; the actor samples (or, greedy, takes the argmax) from
[z_t, h_t, p_t].  All agents are rows of one batch; no agent sees another's observations.

The queue is always processed whole, its ``count`` valid steps picked out by masks, so every
call has the same shapes: compiled once, it serves every queue length (a graph per length
would recompile 17 times).  A token attends to valid earlier tokens and to itself; padding
tokens only ever see themselves, so they stay finite and nothing valid reads them.

**CHOICE**: at an episode's first step the queue is empty and h_t is the zero vector.
"""

from __future__ import annotations

import torch

from .actor_critic import ActorCritic, agent_state
from .world_model import WorldModel

Tensor = torch.Tensor


class ContextQueues:
    """Per-agent rolling (observation, action) history, preallocated: (N, L, *obs_shape), (N, L); the
    valid steps are the first ``count`` (kept on the host, and mirrored in a 0-dim device tensor).
    Observations keep the env's dtype: float32 vectors (N, L, O) or uint8 frames (N, L, C, H, W)."""

    def __init__(self, n_agents: int, obs_shape: int | tuple[int, ...], length: int, device,
                 obs_dtype: torch.dtype | str = torch.float32):
        shape = (obs_shape,) if isinstance(obs_shape, int) else tuple(obs_shape)
        dtype = getattr(torch, obs_dtype) if isinstance(obs_dtype, str) else obs_dtype
        self.obs = torch.zeros(n_agents, length, *shape, dtype=dtype, device=device)  # (N, L, *obs_shape)
        self.act = torch.zeros(n_agents, length, dtype=torch.long, device=device)  # (N, L)
        self.length, self.count = length, 0
        self.count_t = torch.zeros((), dtype=torch.long, device=device)  # ()

    def reset(self) -> None:
        self.count = 0
        self.count_t.fill_(0)

    def push(self, obs: Tensor, act: Tensor) -> None:
        """Append one step (obs (N, *obs_shape), act (N,)), dropping the oldest when full."""
        if self.count == self.length:
            # rolled into the same storage: the acting graph reads the queue at a fixed address
            self.obs.copy_(self.obs.roll(-1, dims=1))
            self.act.copy_(self.act.roll(-1, dims=1))
            self.count -= 1
        self.obs[:, self.count] = obs
        self.act[:, self.count] = act
        self.count += 1
        self.count_t.fill_(self.count)

    def state_dict(self) -> dict:
        return {"obs": self.obs.cpu(), "act": self.act.cpu(), "count": self.count}

    def load_state_dict(self, sd: dict) -> None:
        self.obs.copy_(sd["obs"])
        self.act.copy_(sd["act"])
        self.count = int(sd["count"])
        self.count_t.fill_(self.count)

    def view(self) -> tuple[Tensor, Tensor]:
        """The valid steps only: (N, count, *obs_shape), (N, count)."""
        return self.obs[:, : self.count], self.act[:, : self.count]


def history_mask(valid: Tensor) -> Tensor:
    """valid (T,) bool → (1, T, T): query i sees key j iff j ≤ i and j is valid, or j = i."""
    t = valid.shape[0]
    idx = torch.arange(t, device=valid.device)  # (T,)
    causal = idx[:, None] >= idx[None, :]  # (T, T)
    return (causal & valid[None, :] | torch.eye(t, dtype=torch.bool, device=valid.device))[None]


@torch.no_grad()
def policy_step(wm: WorldModel, ac: ActorCritic, past_obs: Tensor, past_act: Tensor, count: Tensor, obs: Tensor,
                greedy: bool = False) -> Tensor:
    """past_obs (N, L, *obs_shape), past_act (N, L) the queue of which the first ``count`` (0-dim)
    steps are this episode's; obs (N, *obs_shape) now (float32 vectors or uint8 frames, as the
    world model takes them) → actions (N,)."""
    n, length = past_act.shape
    agent = torch.arange(n, device=obs.device)  # (N,)
    z, _ = wm.posterior(torch.cat([past_obs, obs[:, None]], dim=1))  # (N, L+1, K·C): queue, then now
    slots = torch.arange(length + 1, device=obs.device)  # (L+1,)
    valid = slots < count  # (L+1,) the queued steps of this episode
    # the sequence model over the queue; h_t is its output at the last valid step (zero if none)
    pos = slots[:length].expand(n, length)  # (N, L)
    out = wm.seq(wm.mix(z[:, :length], agent, past_act), pos, history_mask(valid[:length]).expand(n, -1, -1))  # (N, L, D)
    last = (count - 1).clamp(min=0).view(1, 1, 1).expand(n, 1, out.shape[-1])  # (N, 1, D)
    h = torch.where(count > 0, out.gather(1, last).squeeze(1), 0.0)  # (N, D)
    # the teammate predictor over z_{≤t}: the valid queue, then z_t at position `count`
    team_pos = torch.where(slots == length, count, slots).expand(n, length + 1)  # (N, L+1)
    team_mask = history_mask(valid | (slots == length)).expand(n, -1, -1)  # (N, L+1, L+1)
    team = wm.teammates(z, team_pos, team_mask, agent)[:, -1]  # (N, N-1, A)
    s = agent_state(z[:, -1], h, team, h.dtype)  # (N, S)
    return ac.act(s[:, None], greedy=greedy)[:, 0]  # (N,)
