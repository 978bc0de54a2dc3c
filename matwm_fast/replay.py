"""One replay buffer per agent, stacked: preallocated ring storage (N, capacity, ...).

The agents act in lockstep, so their buffers share one write position; each agent still samples
its own indices.  Two samplers (SPEC §2):

* world model: sequences of T steps, start weighted by recency ``decay**age`` (age 0 = newest
  transition), no two sequences of one agent overlapping;
* imagination: contexts of L steps, start drawn uniformly.

Start slots are drawn on the host with numpy in O(batch) per call (inverse-CDF of a truncated
geometric law); the rows are gathered on the storage device from them (:meth:`ReplayBuffer.gather`,
which a captured phase runs on staged start slots).  A sequence
may span an episode boundary: ``first`` marks the step that starts an episode, and the world model
turns it into an attention mask, so nothing leaks across (SPEC §2 CHOICE).

Observations are stored as the env hands them out: (N, cap, O) float32 vectors, or (N, cap, C, H, W)
uint8 frames (never floats: 12,288 bytes a 64 × 64 RGB frame; the world model converts on the
device).  The storage lives on the training device, as STORM's does (``ReplayBufferOnGPU``): the
gathers run inside captured phases on fixed storage, and an image run's contexts alone would be
hundreds of MB per step to copy from the host (docs/training.md, *Image scenarios*).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor


@dataclass
class Batch:
    """Sampled rows: ``R`` rows (agent-major) of ``T`` steps each."""

    obs: Tensor  # (R, T, *obs_shape): (R, T, O) float32 or (R, T, C, H, W) uint8
    act: Tensor  # (R, T) int64, the row's own action (unscaled, in [0, A))
    rew: Tensor  # (R, T) float32
    cont: Tensor  # (R, T) float32, 0 at a real termination
    first: Tensor  # (R, T) bool, True where an episode starts
    team_act: Tensor  # (R, T, N-1) int64, the other agents' actions
    agent: Tensor  # (R,) int64, whose buffer the row came from


class ReplayBuffer:
    """Stacked per-agent ring buffers with recency-weighted and uniform samplers."""

    def __init__(self, n_agents: int, obs_shape: int | tuple[int, ...], capacity: int,
                 device: torch.device | str = "cpu", seed: int = 0, obs_dtype: torch.dtype | str = torch.float32):
        """``obs_shape``: one observation's shape, ``(O,)`` (or just O) or ``(C, H, W)``;
        ``obs_dtype``: float32 for vectors, uint8 for frames (torch dtype or its name)."""
        self.obs_shape = (obs_shape,) if isinstance(obs_shape, int) else tuple(obs_shape)
        self.n_agents, self.obs_dim, self.capacity = n_agents, int(np.prod(self.obs_shape)), capacity
        self.device = torch.device(device)
        dtype = getattr(torch, obs_dtype) if isinstance(obs_dtype, str) else obs_dtype
        if dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"replay observations are float32 (vectors) or uint8 (frames), not {dtype}")
        n, c = n_agents, capacity
        self.obs = torch.zeros(n, c, *self.obs_shape, dtype=dtype, device=self.device)  # (N, cap, *obs_shape)
        self.act = torch.zeros(n, c, dtype=torch.long, device=self.device)  # (N, cap)
        self.rew = torch.zeros(n, c, device=self.device)  # (N, cap)
        self.cont = torch.ones(n, c, device=self.device)  # (N, cap)
        self.first = torch.zeros(n, c, dtype=torch.bool, device=self.device)  # (N, cap)
        self.team_act = torch.zeros(n, c, max(n - 1, 1), dtype=torch.long, device=self.device)  # (N, cap, N-1)
        # others[i] = indices of agent i's teammates in agent order (for teammate targets)
        self.others = torch.tensor([[j for j in range(n) if j != i] or [0] for i in range(n)],
                                   dtype=torch.long, device=self.device)  # (N, N-1)
        self._offsets: dict[int, Tensor] = {}  # length → arange(length) on the device, made once
        self.pos = 0  # next slot to write
        self.size = 0  # slots holding data
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    # ------------------------------------------------------------------------------------ writing
    def add(self, obs: np.ndarray | Tensor, act: np.ndarray | Tensor, rew: np.ndarray | Tensor,
            cont: np.ndarray | Tensor, first: bool) -> None:
        """Store one env step for all agents: obs (N, *obs_shape), act (N,), rew (N,), cont (N,)."""
        p = self.pos
        act_t = torch.as_tensor(act, dtype=torch.long).to(self.device)  # (N,)
        obs_t = torch.as_tensor(obs)
        if self.obs.dtype == torch.uint8 and obs_t.dtype != torch.uint8:
            raise TypeError(f"this replay stores uint8 frames; got {obs_t.dtype} observations")
        self.obs[:, p] = obs_t.to(self.device, self.obs.dtype)
        self.act[:, p] = act_t
        self.rew[:, p] = torch.as_tensor(rew, dtype=torch.float32).to(self.device)
        self.cont[:, p] = torch.as_tensor(cont, dtype=torch.float32).to(self.device)
        self.first[:, p] = bool(first)
        self.team_act[:, p] = act_t[self.others]
        self.pos = (p + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    # ------------------------------------------------------------------------------------ sampling
    def gather(self, agent: Tensor, start: Tensor, length: int) -> Batch:
        """Rows of ``length`` steps from slot ``start`` on, each from its agent's buffer:
        agent (R,), start (R,) device tensors → a :class:`Batch` of R rows.

        Everything here is device work on fixed storage, so the gather runs inside a captured
        phase: the host draws only the start slots (``sequence_starts``/``context_starts``)."""
        steps = self._offsets.get(length)
        if steps is None:  # once per length, before any capture (the first calls are eager)
            steps = self._offsets[length] = torch.arange(length, device=self.device)  # (T,)
        s = (start[:, None] + steps) % self.capacity  # (R, T) slots, wrapping around the ring
        ai = agent[:, None]  # (R, 1)
        return Batch(obs=self.obs[ai, s], act=self.act[ai, s], rew=self.rew[ai, s], cont=self.cont[ai, s],
                     first=self.first[ai, s], team_act=self.team_act[ai, s], agent=agent)

    def rows_agent(self, per_agent: int) -> np.ndarray:
        """Whose buffer each row of a sample comes from: agent-major, ``per_agent`` rows each (R,)."""
        return np.repeat(np.arange(self.n_agents), per_agent)

    def _start(self, ages: np.ndarray) -> np.ndarray:
        """Age of a sequence's first step (0 = newest) → its ring slot."""
        return (self.pos - 1 - ages) % self.capacity

    def _batch(self, per_agent: int, start: np.ndarray, length: int) -> Batch:
        agent = torch.from_numpy(self.rows_agent(per_agent)).to(self.device)  # (R,)
        return self.gather(agent, torch.from_numpy(start).to(self.device), length)

    def sample_recent_ages(self, count: int, length: int, decay: float) -> np.ndarray:
        """``count`` start ages of sequences of ``length``, P(age=k) ∝ decay**k, k ∈ [length−1, size−1].

        Truncated geometric by inverse CDF: with j = k − (length−1) and n valid starts,
        P(j) ∝ ρ^j ⇒ F(j) = (1−ρ^(j+1))/(1−ρ^n) ⇒ j = ⌊log(1−u(1−ρ^n)) / log ρ⌋.
        """
        n = self.size - length + 1
        if n < 1:
            raise ValueError(f"buffer holds {self.size} steps, fewer than one sequence of {length}")
        u = self.rng.random(count)
        if decay >= 1.0:
            j = np.floor(u * n)
        else:
            j = np.floor(np.log1p(-u * (-np.expm1(n * np.log(decay)))) / np.log(decay))
        return np.minimum(j.astype(np.int64), n - 1) + (length - 1)

    def sample_sequences(self, per_agent: int, length: int, decay: float) -> Batch:
        """World-model batch: ``per_agent`` non-overlapping recency-weighted sequences per agent."""
        return self._batch(per_agent, self.sequence_starts(per_agent, length, decay), length)

    def sequence_starts(self, per_agent: int, length: int, decay: float, max_rounds: int = 64,
                        max_restarts: int = 1000) -> np.ndarray:
        """Start slots (R,) of ``per_agent`` non-overlapping recency-weighted sequences per agent.

        Overlaps are resolved by redrawing only the offending later sequences (a vectorised
        rejection step, so the accepted set follows the recency law conditioned on not
        overlapping); an agent whose draws still clash after ``max_rounds`` (accepted sequences
        leaving only fragmented gaps) starts afresh.
        """
        if per_agent * length > self.size:
            raise ValueError(f"cannot fit {per_agent} disjoint sequences of {length} in {self.size} steps")
        ages = self.sample_recent_ages(self.n_agents * per_agent, length, decay).reshape(self.n_agents, per_agent)
        for attempt in range(max_rounds * max_restarts):
            # clash[i, b] = sequence b overlaps an earlier sequence b' < b of agent i
            d = np.abs(ages[:, :, None] - ages[:, None, :])  # (N, B, B)
            clash = np.tril(d < length, k=-1).any(-1)  # (N, B)
            if not clash.any():
                break
            if (attempt + 1) % max_rounds == 0:
                clash = clash.any(1, keepdims=True).repeat(per_agent, 1)  # restart the stuck agents
            ages[clash] = self.sample_recent_ages(int(clash.sum()), length, decay)
        else:
            raise RuntimeError(f"could not draw {per_agent} non-overlapping sequences of {length} from "
                               f"{self.size} steps; collect more before sampling (raise replay.warmup)")
        return self._start(ages.reshape(-1))  # (R,)

    def sample_contexts(self, per_agent: int, length: int) -> Batch:
        """Imagination starts: ``per_agent`` contexts of ``length`` steps per agent, drawn uniformly."""
        return self._batch(per_agent, self.context_starts(per_agent, length), length)

    def context_starts(self, per_agent: int, length: int) -> np.ndarray:
        """Start slots (R,) of ``per_agent`` contexts of ``length`` steps per agent, drawn uniformly."""
        n = self.size - length + 1
        if n < 1:
            raise ValueError(f"buffer holds {self.size} steps, fewer than one context of {length}")
        return self._start(self.rng.integers(0, n, size=self.n_agents * per_agent) + (length - 1))  # (R,)

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        n = self.size
        return {
            "obs": self.obs[:, :n].cpu(), "act": self.act[:, :n].cpu(), "rew": self.rew[:, :n].cpu(),
            "cont": self.cont[:, :n].cpu(), "first": self.first[:, :n].cpu(),
            "team_act": self.team_act[:, :n].cpu(), "pos": self.pos, "size": self.size,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, sd: dict) -> None:
        n = sd["size"]
        if isinstance(sd["obs"], Tensor) and sd["obs"].dtype != self.obs.dtype:
            raise ValueError(f"the saved replay holds {sd['obs'].dtype} observations, this one "
                             f"{self.obs.dtype} (another scenario's checkpoint?)")
        for k in ("obs", "act", "rew", "cont", "first", "team_act"):
            getattr(self, k)[:, :n] = sd[k].to(self.device)
        self.pos, self.size = sd["pos"], sd["size"]
        self.rng.bit_generator.state = sd["rng"]
