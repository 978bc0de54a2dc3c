"""Algorithm 2 (SPEC §2): collect, then per env step one shared world-model update and one
actor-critic update per agent (all agents in one batched call).

The trainer owns what modules must not: the optimisers, the replay, the env, the RNGs and the
device.  Its update methods are the step functions that :mod:`matwm_fast.backends` compiles and
CUDA-graphs; they take tensors, return metric tensors and never synchronise with the host.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from .acting import ContextQueues, policy_step
from .actor_critic import ActorCritic, state_dim
from .config import Config, imagination_size, validate
from .env import MultiAgentEnv, random_actions
from .imagination import ImagCaches, imagine
from .losses import actor_critic_loss, world_model_loss
from .nn import ema_update, per_agent_grad_clip
from .nvtx import phase
from .backends import StepFunctions, resolve_backend
from .replay import Batch, ReplayBuffer
from .world_model import WorldModel

Tensor = torch.Tensor


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else must be a device torch accepts."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; valid here: auto, cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; valid: auto, cpu, cuda, cuda:N")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class EpisodeStats:
    """Running returns of the current episode and those finished since the last log row."""

    current: np.ndarray
    finished: list[np.ndarray] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: Config, device: torch.device | str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        tr = cfg.train
        seed_everything(tr.seed)
        self.env = MultiAgentEnv(cfg.env, seed=tr.seed)
        self.spec = spec = self.env.spec
        validate(cfg, spec.n_agents)
        self.n = n = spec.n_agents
        self.rng = np.random.default_rng(tr.seed)
        self.wm = WorldModel(cfg.wm, spec).to(self.device)
        s_dim = state_dim(cfg.wm.latent_vars, cfg.wm.latent_classes, cfg.wm.width, n, spec.n_actions)
        self.ac = ActorCritic(cfg.ac, spec, s_dim, self.wm.bins).to(self.device)
        self.backend = resolve_backend(tr.backend, self.device)
        # CUDA graphs replay the optimiser step: its state must live on the device (capturable)
        # and the learning rate be a tensor, so nothing is read from the host inside the graph
        graphs = self.backend == "cudagraphs"

        def lr(x: float):
            return torch.tensor(x, device=self.device) if graphs else x

        self.wm_opt = torch.optim.Adam(self.wm.parameters(), lr=lr(cfg.wm.lr), eps=cfg.wm.adam_eps, capturable=graphs)
        self.ac_opt = torch.optim.Adam(
            [{"params": self.ac.actor_params()}, {"params": self.ac.critic_params()}],
            lr=lr(cfg.ac.lr), eps=cfg.ac.adam_eps, capturable=graphs)
        self.replay = ReplayBuffer(n, spec.obs_dim, cfg.replay.capacity, self.device, seed=tr.seed + 1)
        self.queues = ContextQueues(n, spec.obs_dim, tr.act_context, self.device)
        self.imag_batch, self.horizon = imagination_size(n, cfg.ac)
        # the caches hold what autocast computes: bf16 keys/values on CUDA with amp, else float32
        cache_dtype = torch.bfloat16 if (self.device.type == "cuda" and tr.amp) else torch.float32
        self.caches = ImagCaches.allocate(self.wm, n * self.imag_batch, cfg.ac.context_len, self.horizon,
                                          self.device, cache_dtype)
        self.agents = torch.arange(n, device=self.device)  # (N,)
        self.obs_mask = self.wm.obs_mask  # (N, O)
        self.step = 0  # env steps taken
        self.obs = self.env.reset(seed=tr.seed)
        self.first = True
        self.episodes = EpisodeStats(np.zeros(n))
        self.fn = StepFunctions.build(self, self.backend)
        # the per-step budget counters live on the device with the other metrics, made once
        self.counters = {k: torch.zeros((), device=self.device)
                         for k in ("wm_sequences", "wm_sequences_per_agent", "imagined_steps")}
        # device-side record of the first non-finite loss: (step, which) — checked at log intervals
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.bad_which = torch.zeros((), dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------------------------ budget
    @property
    def wm_per_agent(self) -> int:
        return self.cfg.wm.batch_size // self.n

    @property
    def imagined_per_update(self) -> int:
        """Imagined steps per agent update, all agents: N × B × H (36,864 for the paper preset)."""
        return self.n * self.imag_batch * self.horizon

    @property
    def warm(self) -> bool:
        return len(self.replay) >= self.cfg.replay.warmup

    # ------------------------------------------------------------------------------------ acting
    def choose_actions(self, greedy: bool = False) -> np.ndarray:
        if not self.warm:
            return random_actions(self.rng, self.spec)
        past_obs, past_act = self.queues.view()
        obs = torch.as_tensor(self.obs, device=self.device)  # (N, O)
        self.wm.eval()
        a = policy_step(self.wm, self.ac, past_obs, past_act, obs, greedy=greedy)  # (N,)
        return a.cpu().numpy()

    def env_step(self) -> None:
        """Act, step the env, store the transition; on episode end reset env and queues."""
        with phase("act"):
            actions = self.choose_actions()
        with phase("env"):
            next_obs, rew, cont, done = self.env.step(actions)
        self.replay.add(self.obs, actions, rew, cont, self.first)
        self.queues.push(torch.as_tensor(self.obs, device=self.device), torch.as_tensor(actions, device=self.device))
        self.episodes.current += rew
        self.step += 1
        self.first = False
        self.obs = next_obs
        if done:
            self.episodes.finished.append(self.episodes.current.copy())
            self.episodes.current[:] = 0.0
            self.obs = self.env.reset()
            self.queues.reset()
            self.first = True

    # ------------------------------------------------------------------------------------ updates
    # Each update is split into pure pieces — a loss function (forward only) and an optimiser step
    # (clip + Adam + EMA) — that :mod:`matwm_fast.backends` wraps with torch.compile / CUDA graphs;
    # the backward pass between them is autograd's (compiled by AOTAutograd under a backend).
    def wm_loss(self, obs: Tensor, act: Tensor, rew: Tensor, cont: Tensor, first: Tensor, team_act: Tensor,
                agent: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Paper Eq. 3 on the combined batch of all agents: R = N·(B/N) rows of T steps."""
        c = self.cfg.wm
        with self.autocast():
            out = self.wm.observe(obs, act, first, agent)
        return world_model_loss(out, obs, rew, cont, team_act, self.obs_mask[agent], self.wm.bins,
                                c.dyn_weight, c.rep_weight, c.free_bits)

    def wm_opt_step(self) -> Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.wm.parameters(), self.cfg.wm.grad_clip)
        self.wm_opt.step()
        return norm

    def imagine_rollout(self, obs: Tensor, act: Tensor, first: Tensor, noise=None):
        with torch.no_grad(), self.autocast():
            return imagine(self.wm, self.ac, obs, act, first, self.agents, self.horizon, self.caches, noise)

    def ac_loss(self, states: Tensor, actions: Tensor, rewards: Tensor, continues: Tensor):
        """Eqs. 10–13 for every agent at once, each on its own imagined batch (N, B, H+1, S)."""
        ac, c = self.ac, self.cfg.ac
        n, b, h1, s = states.shape
        flat = states.reshape(n, b * h1, s)  # (N, B·(H+1), S)
        logits = ac.policy_logits(flat).view(n, b, h1, -1)[:, :, :-1]  # (N, B, H, A)
        critic_logits = ac.critic(flat).view(n, b, h1, -1)  # (N, B, H+1, NB)
        with torch.no_grad():
            slow_logits = ac.slow_critic(flat).view(n, b, h1, -1)  # (N, B, H+1, NB)
        return actor_critic_loss(logits, actions, critic_logits, slow_logits, rewards, continues, ac.bins,
                                 ac.return_scale, c.gamma, c.lam, c.entropy, c.return_scale_decay,
                                 c.return_pct_low, c.return_pct_high)

    def ac_opt_step(self, new_scale: Tensor) -> tuple[Tensor, Tensor]:
        ac, c = self.ac, self.cfg.ac
        actor_norm = per_agent_grad_clip(ac.actor_params(), c.grad_clip)
        critic_norm = per_agent_grad_clip(ac.critic_params(), c.grad_clip)
        self.ac_opt.step()
        ema_update(ac.slow_critic, ac.critic, c.slow_critic_decay)
        ac.return_scale.copy_(new_scale)
        return actor_norm, critic_norm

    def autocast(self):
        """bf16 autocast for the world model on CUDA when ``train.amp``; a no-op on the CPU."""
        on = self.device.type == "cuda" and self.cfg.train.amp
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    # the step functions the loop calls; a backend replaces the pure pieces they use
    def wm_update(self, batch: Batch) -> dict[str, Tensor]:
        """One step of the shared world model on the combined batch of all agents."""
        self.wm.train()
        loss, m = self.fn.wm_loss(batch.obs, batch.act, batch.rew, batch.cont, batch.first, batch.team_act,
                                  batch.agent)
        self.wm_opt.zero_grad(set_to_none=False)
        loss.backward()
        m["grad_norm"] = self.fn.wm_opt_step()
        return m

    def imagine(self, ctx: Batch, noise=None):
        self.wm.eval()
        return self.fn.imagine(ctx.obs, ctx.act, ctx.first, noise)

    def ac_update(self, roll) -> dict[str, Tensor]:
        """One actor-critic step for every agent (per-agent clipping inside)."""
        loss, m = self.fn.ac_loss(roll.states, roll.actions, roll.rewards, roll.continues)
        self.ac_opt.zero_grad(set_to_none=False)
        loss.backward()
        m["actor_grad_norm"], m["critic_grad_norm"] = self.fn.ac_opt_step(m["return_scale"])
        return m

    def _flag_nonfinite(self, which: int, *losses: Tensor) -> None:
        """Remember the first step whose loss was NaN/Inf, on the device (no sync here)."""
        bad = ~torch.isfinite(torch.stack([x.float().sum() for x in losses])).all()
        new = bad & (self.bad_step < 0)
        self.bad_step.copy_(torch.where(new, self.step, self.bad_step))
        self.bad_which.copy_(torch.where(new, which, self.bad_which))

    def train_step(self) -> dict[str, Tensor] | None:
        """One env step of Algorithm 2; returns the step's metric tensors once updates run."""
        if self.backend == "cudagraphs":
            # a new iteration: outputs of the previous step's graphs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        self.env_step()
        if not self.warm:
            return None
        metrics: dict[str, Tensor] = {}
        tr = self.cfg.train
        if self.step % tr.wm_every == 0:
            with phase("replay_sample"):
                batch = self.replay.sample_sequences(self.wm_per_agent, self.cfg.wm.seq_len,
                                                     self.cfg.replay.priority_decay)
            with phase("wm_update"):
                wm_m = self.wm_update(batch)
            self._flag_nonfinite(0, wm_m["total"])
            metrics.update({f"shared_wm_{k}_loss" if k != "grad_norm" else "shared_wm_grad_norm": v
                            for k, v in wm_m.items()})
            # counted from the batch itself (host-known shapes: no sync), into tensors made once
            rows = batch.agent.shape[0]
            metrics["wm_sequences"] = self.counters["wm_sequences"].fill_(rows)
            metrics["wm_sequences_per_agent"] = self.counters["wm_sequences_per_agent"].fill_(rows // self.n)
        if self.step % tr.agent_every == 0:
            with phase("replay_sample"):
                ctx = self.replay.sample_contexts(self.imag_batch, self.cfg.ac.context_len)
            with phase("imagine"):
                roll = self.imagine(ctx)
            with phase("ac_update"):
                ac_m = self.ac_update(roll)
            self._flag_nonfinite(1, ac_m["actor_loss"], ac_m["critic_loss"])
            for i, name in enumerate(self.spec.agents):
                for k, v in ac_m.items():
                    metrics[f"{name}_{k}"] = v[i]
            metrics["imagined_steps"] = self.counters["imagined_steps"].fill_(roll.actions.numel())
        return metrics

    def check_finite(self) -> None:
        """Raise if any loss so far was NaN/Inf, naming the loss and the step (one host sync)."""
        step = int(self.bad_step)
        if step >= 0:
            which = ("shared world-model loss (shared_wm_total_loss)",
                     "actor-critic loss (<agent>_actor_loss / <agent>_critic_loss)")[int(self.bad_which)]
            raise FloatingPointError(f"non-finite {which} at env step {step}")
