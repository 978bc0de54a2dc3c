"""Algorithm 2 (SPEC §2): collect, then per env step one shared world-model update and one
actor-critic update per agent (all agents in one batched call).

The trainer owns what modules must not: the env, the replay, the optimisers, the RNGs and the
device.  Its update methods call the pure step functions of :mod:`matwm_fast.steps` (compiled
there, once, when the backend asks for it); they never synchronise with the host.  Everything
the next step depends on comes out of :meth:`Trainer.state_dict` as plain data (tensors,
numbers, strings), and goes back in through :meth:`Trainer.load_state_dict`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .acting import ContextQueues
from .config import Config, diff, load_config, resolve
from .env import MultiAgentEnv, env_spec, random_actions
from .graphs import Graph, Staged
from .imagination import ImagCaches, ImagNoise, Rollout
from .nvtx import phase
from .policy import build_networks
from .replay import Batch, ReplayBuffer
from .runtime import Runtime, adam, grads_to_none, resolve_runtime
from .steps import compile_steps

Tensor = torch.Tensor


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators (the entry points call this first)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class EpisodeStats:
    """Running returns of the current episode and those finished since the last log row."""

    current: np.ndarray  # (N,)
    finished: list[np.ndarray] = field(default_factory=list)  # each (N,)


@dataclass
class StepInputs:
    """Host data a training step needs on the device, staged into fixed buffers (graphs.Staged),
    and the row → agent maps of the two replay samples, made once."""

    obs: Staged  # (N, *obs_shape) the observation the agents act on, in the env's dtype (uint8 frames stay uint8)
    act: Staged  # (N,) the actions taken, for the context queues
    step: Staged  # () the env step, for the non-finite record
    wm_start: Staged  # (N·Bw,) start slots of the world model's sequences
    ctx_start: Staged  # (N·Bi,) start slots of the imagination contexts
    wm_agent: Tensor  # (N·Bw,) long
    ctx_agent: Tensor  # (N·Bi,) long

    @staticmethod
    def allocate(replay: ReplayBuffer, obs_shape: int | tuple[int, ...], wm_per_agent: int, imag_per_agent: int,
                 device: torch.device) -> "StepInputs":
        """``obs_shape``: one observation's, (O,) or (C, H, W); its dtype is the replay's."""
        n = replay.n_agents
        obs_shape = (obs_shape,) if isinstance(obs_shape, int) else tuple(obs_shape)

        def agents(per_agent: int) -> Tensor:
            return torch.from_numpy(replay.rows_agent(per_agent)).to(device)  # (N·B,)

        return StepInputs(Staged((n, *obs_shape), replay.obs.dtype, device), Staged((n,), torch.long, device),
                          Staged((), torch.long, device), Staged((n * wm_per_agent,), torch.long, device),
                          Staged((n * imag_per_agent,), torch.long, device), agents(wm_per_agent),
                          agents(imag_per_agent))


class Trainer:
    def __init__(self, cfg: Config, runtime: Runtime):
        self.env = MultiAgentEnv(cfg.env, seed=cfg.train.seed)
        self.spec = spec = self.env.spec
        if resolve(cfg, spec.n_agents) != cfg:
            raise ValueError("Trainer needs the config that runs: pass matwm_fast.config.resolve(cfg, n_agents)")
        self.cfg, self.rt, self.device = cfg, runtime, runtime.device
        self.n = n = spec.n_agents
        self.rng = np.random.default_rng(cfg.train.seed)
        # the world model in eval mode: imagination and acting; only its own update trains it (dropout)
        self.wm, self.ac = build_networks(cfg, spec, runtime.kernels, self.device)
        self.wm_opt = adam(self.wm.parameters(), cfg.wm.lr, cfg.wm.adam_eps, runtime)
        self.ac_opt = adam([{"params": self.ac.actor_params()}, {"params": self.ac.critic_params()}], cfg.ac.lr,
                           cfg.ac.adam_eps, runtime)
        if not grads_to_none(runtime):
            # every gradient in a buffer of its own, allocated once, that backward accumulates into
            # in place: under Inductor's CUDA-graph trees a parameter's first .grad would be the
            # backward graph's output itself, which the next replay overwrites (the first GPU run
            # failed so at its second update: bench/results/gpu/)
            for group in (*self.wm_opt.param_groups, *self.ac_opt.param_groups):
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
        # observations as the env hands them out: (O,) float32 vectors or (C, H, W) uint8 frames
        self.replay = ReplayBuffer(n, spec.obs_shape, cfg.replay.capacity, self.device, seed=cfg.train.seed + 1,
                                   obs_dtype=spec.obs_dtype)
        self.queues = ContextQueues(n, spec.obs_shape, cfg.train.act_context, self.device, obs_dtype=spec.obs_dtype)
        # under bf16 the rollout runs on bf16 twins of the world model and actors the caches hold
        self.caches = ImagCaches.allocate(self.wm, n * cfg.ac.imag_batch, cfg.ac.context_len, cfg.ac.horizon,
                                          self.device, runtime.cache_dtype, ac=self.ac)
        self.fns = compile_steps(runtime)  # the step functions as the backend runs them
        self.agents = torch.arange(n, device=self.device)  # (N,)
        self.inputs = StepInputs.allocate(self.replay, spec.obs_shape, cfg.wm.batch_per_agent, cfg.ac.imag_batch,
                                          self.device)
        self._rollout: Rollout | None = None  # the imagination phase's output, the update phase's input
        # the four phases a training step runs, each one CUDA graph under ``graphs`` on CUDA (plain
        # calls elsewhere): everything they read is the trainer's own fixed state or ``inputs``
        capture = runtime.backend == "graphs"
        self.graphs = {name: Graph(fn, self.device, name=name, capture=capture) for name, fn in (
            ("act", self._act_phase), ("wm_update", self._wm_phase), ("imagine", self._imagine_phase),
            ("ac_update", self._ac_phase))}
        self.step = 0  # env steps taken
        self.imagined_total = 0  # imagined steps so far: the one place they are counted
        self.obs = self.env.reset(seed=cfg.train.seed)  # (N, *obs_shape)
        self.first = True
        self.episodes = EpisodeStats(np.zeros(n))
        # the per-step budget counters live on the device with the other metrics, made once
        self.counters = {k: torch.zeros((), device=self.device)
                         for k in ("wm_sequences", "wm_sequences_per_agent", "imagined_steps")}
        # device-side record of the first non-finite loss: (step, which: 0 = world model, 1 + i = agent i)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.bad_which = torch.zeros((), dtype=torch.long, device=self.device)

    @property
    def imagined_per_update(self) -> int:
        """Imagined steps per agent update, all agents: N × B × H (36,864 for the paper preset)."""
        return self.n * self.cfg.ac.imag_batch * self.cfg.ac.horizon

    @property
    def warm(self) -> bool:
        return len(self.replay) >= self.cfg.replay.warmup

    # ------------------------------------------------------------------------------------ acting
    def choose_actions(self) -> np.ndarray:
        """The agents' actions for ``self.obs`` (N,): random until the replay is warm, then each
        agent's policy from its own context queue.  Stages the observation on the device (where
        the context queue takes it from after the env step)."""
        self.inputs.obs.put(self.obs)
        if not self.warm:
            return random_actions(self.rng, self.spec)
        return self.graphs["act"]().cpu().numpy()  # (N,): the one host sync of an env step

    def env_step(self) -> None:
        """Act, step the env, store the transition; on episode end reset env and queues."""
        with phase("act"):
            actions = self.choose_actions()
        with phase("env"):
            next_obs, rew, cont, done = self.env.step(actions)
        self.replay.add(self.obs, actions, rew, cont, self.first)
        self.queues.push(self.inputs.obs.device, self.inputs.act.put(actions))
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
    def wm_update(self, batch: Batch) -> dict[str, Tensor]:
        """One step of the shared world model on the combined batch of all agents."""
        s = self.fns
        self.wm.train()  # wm.dropout acts here, and only here
        loss, m = s.wm_loss(self.wm, batch.obs, batch.act, batch.rew, batch.cont, batch.first, batch.team_act,
                            batch.agent, self.rt.amp, self.rt.kernels)
        self.wm.eval()
        self.wm_opt.zero_grad(set_to_none=grads_to_none(self.rt))
        loss.backward()
        m["grad_norm"] = s.wm_opt_step(self.wm, self.wm_opt, self.cfg.wm.grad_clip)
        return m

    def imagine(self, ctx: Batch, noise: ImagNoise | None = None) -> Rollout:
        return self.fns.rollout(self.wm, self.ac, ctx.obs, ctx.act, ctx.first, self.agents, self.cfg.ac.horizon,
                                  self.caches, noise, self.rt.amp)

    def ac_update(self, roll: Rollout) -> dict[str, Tensor]:
        """One actor-critic step for every agent (per-agent clipping inside); the loss updates the
        return scale, the optimiser step stores it in ``ac.return_scale``."""
        s = self.fns
        loss, scale, m = s.ac_loss(self.ac, roll.states, roll.actions, roll.rewards, roll.continues, self.cfg.ac,
                                   self.rt.amp, self.rt.kernels)
        self.ac_opt.zero_grad(set_to_none=grads_to_none(self.rt))
        loss.backward()
        m["return_scale"] = scale  # logged too: <agent>_return_scale
        m["actor_grad_norm"], m["critic_grad_norm"] = s.ac_opt_step(self.ac, self.ac_opt, scale, self.cfg.ac)
        return m

    # the phases: functions of the trainer's fixed state and staged inputs only (see graphs.py)
    def _act_phase(self) -> Tensor:
        q = self.queues
        return self.fns.act(self.wm, self.ac, q.obs, q.act, q.count_t, self.inputs.obs.device)  # (N,)

    def _wm_phase(self) -> dict[str, Tensor]:
        inp = self.inputs
        m = self.wm_update(self.replay.gather(inp.wm_agent, inp.wm_start.device, self.cfg.wm.seq_len))
        self._flag_nonfinite(m["total"].reshape(1), 0)
        return m

    def _imagine_phase(self) -> Rollout:
        inp = self.inputs
        return self.imagine(self.replay.gather(inp.ctx_agent, inp.ctx_start.device, self.cfg.ac.context_len))

    def _ac_phase(self) -> dict[str, Tensor]:
        m = self.ac_update(self._rollout)
        self._flag_nonfinite(m["actor_loss"] + m["critic_loss"], 1)  # (N,)
        return m

    def train_step(self) -> dict[str, Tensor] | None:
        """One env step of Algorithm 2; returns the step's metric tensors once updates run:
        0-dim for the shared world model and the budget, (N,) per agent for the actor-critics.
        They stay valid until the next ``train_step`` (under ``graphs`` they are a graph's outputs)."""
        if self.rt.backend == "cudagraphs":
            # a new iteration: outputs of the previous step's graphs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        self.env_step()
        if not self.warm:
            return None
        metrics: dict[str, Tensor] = {}
        cfg, inp, g = self.cfg, self.inputs, self.graphs
        inp.step.put(self.step)
        if self.step % cfg.train.wm_every == 0:
            for _ in range(cfg.train.wm_updates):  # each on a fresh batch; the row shows the last
                with phase("replay_sample"):
                    inp.wm_start.put(self.replay.sequence_starts(cfg.wm.batch_per_agent, cfg.wm.seq_len,
                                                                 cfg.replay.priority_decay))
                with phase("wm_update"):
                    wm_m = g["wm_update"]()
            metrics.update({f"shared_wm_{k}_loss" if k != "grad_norm" else "shared_wm_grad_norm": v
                            for k, v in wm_m.items()})
            rows = cfg.wm.batch_size * cfg.train.wm_updates  # host-known shapes: counted without a sync
            metrics["wm_sequences"] = self.counters["wm_sequences"].fill_(rows)
            metrics["wm_sequences_per_agent"] = self.counters["wm_sequences_per_agent"].fill_(rows // self.n)
        if self.step % cfg.train.agent_every == 0:
            with phase("replay_sample"):
                inp.ctx_start.put(self.replay.context_starts(cfg.ac.imag_batch, cfg.ac.context_len))
            with phase("imagine"):
                self._rollout = g["imagine"]()
            with phase("ac_update"):
                ac_m = g["ac_update"]()
            metrics.update(ac_m)  # (N,) each: the row names them <agent>_<metric>
            imagined = self.imagined_per_update
            self.imagined_total += imagined
            metrics["imagined_steps"] = self.counters["imagined_steps"].fill_(imagined)
        return metrics

    def _flag_nonfinite(self, losses: Tensor, offset: int) -> None:
        """Remember the first step and loss that was NaN/Inf, on the device (no sync here; the
        step comes in through ``inputs.step``, so a captured phase reads the current one)."""
        bad = ~torch.isfinite(losses.detach().float())  # (K,)
        new = bad.any() & (self.bad_step < 0)
        self.bad_step.copy_(torch.where(new, self.inputs.step.device, self.bad_step))
        self.bad_which.copy_(torch.where(new, offset + bad.int().argmax(), self.bad_which))

    def check_finite(self) -> None:
        """Raise if any loss so far was NaN/Inf, naming the loss and the step (one host sync)."""
        step = int(self.bad_step)
        if step >= 0:
            which = int(self.bad_which)
            if which == 0:
                what = "shared world-model loss (shared_wm_total_loss)"
            else:
                name = self.spec.agents[which - 1]
                what = f"actor-critic loss of {name} ({name}_actor_loss / {name}_critic_loss)"
            raise FloatingPointError(f"non-finite {what} at env step {step}")

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything the next step depends on, as plain data (no object needs pickling)."""
        np_state = np.random.get_state()
        return {
            "config": self.cfg.to_dict(), "agents": list(self.spec.agents), "step": self.step,
            "imagined_total": self.imagined_total,
            "wm": self.wm.state_dict(), "ac": self.ac.state_dict(),
            "wm_opt": self.wm_opt.state_dict(), "ac_opt": self.ac_opt.state_dict(),
            "replay": self.replay.state_dict(), "env": self.env.get_state(),
            "obs": torch.from_numpy(self.obs.copy()), "first": self.first,
            "queues": self.queues.state_dict(),
            "episodes": {"current": torch.from_numpy(self.episodes.current.copy()),
                         "finished": [torch.from_numpy(r.copy()) for r in self.episodes.finished]},
            "bad": {"step": self.bad_step.cpu(), "which": self.bad_which.cpu()},
            "rng": {"python": random.getstate(),
                    "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "trainer": self.rng.bit_generator.state},
        }

    def load_state_dict(self, sd: dict, same_config: bool = True) -> None:
        """Continue from :meth:`state_dict`.  ``same_config``: refuse a state whose learned config
        differs from this trainer's (``False``: ``--init-from``, a new run with changed settings;
        the weights must still fit).  Raises ValueError saying what does not fit."""
        saved = load_config(sd["config"])
        if same_config:
            changed = [f"{k}: checkpoint {a!r} vs this run {b!r}" for k, a, b in diff(saved, self.cfg)]
            if changed:
                raise ValueError("checkpoint is from a different config: " + "; ".join(changed))
        if list(sd["agents"]) != list(self.spec.agents):
            raise ValueError(f"checkpoint agents {sd['agents']} differ from this env's {list(self.spec.agents)}")
        try:
            self.wm.load_state_dict(sd["wm"])
            self.ac.load_state_dict(sd["ac"])
            _load_optimizer(self.wm_opt, sd["wm_opt"])
            _load_optimizer(self.ac_opt, sd["ac_opt"])
            self.replay.load_state_dict(sd["replay"])
            self.env.set_state(sd["env"])
            self.obs, self.first = sd["obs"].numpy().copy(), bool(sd["first"])
            self.step, self.imagined_total = int(sd["step"]), int(sd["imagined_total"])
            self.queues.load_state_dict(sd["queues"])
            self.episodes = EpisodeStats(sd["episodes"]["current"].numpy().copy(),
                                         [r.numpy().copy() for r in sd["episodes"]["finished"]])
            self.bad_step.copy_(sd["bad"]["step"])
            self.bad_which.copy_(sd["bad"]["which"])
            for g in self.graphs.values():  # the optimisers' state tensors are new: capture anew
                g.reset()
            rng = sd["rng"]
            random.setstate(rng["python"])
            name, keys, *rest = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self.rng.bit_generator.state = rng["trainer"]
        except (RuntimeError, KeyError, TypeError, AttributeError, IndexError) as e:  # another model or a damaged state
            raise ValueError(f"checkpoint does not fit the model built from its config: {type(e).__name__}: {e}") from e


# how an optimiser runs, not what it learns: kept from the trainer's own optimiser on load
_RUNTIME_KEYS = ("capturable", "foreach", "fused", "differentiable", "lr")


def _load_optimizer(opt: torch.optim.Optimizer, sd: dict) -> None:
    """``opt.load_state_dict(sd)``, keeping ``opt``'s runtime settings.

    ``load_state_dict`` replaces every group setting with the saved one, but device and backend
    may change on resume: ``cudagraphs`` runs Adam ``capturable`` with a float32 device-tensor
    learning rate, eager on the CPU neither.  So those settings stay ``opt``'s — the learning rate
    included: it comes from the config.  They go in before loading (Adam places its ``step``
    counters as ``capturable`` wants) and the very objects are put back after (loading deep-copies
    groups; a CUDA graph may hold the lr tensor).
    """
    runtime = [{k: g[k] for k in _RUNTIME_KEYS if k in g} for g in opt.param_groups]
    groups = [{**saved, **cur} for saved, cur in zip(sd["param_groups"], runtime)]
    opt.load_state_dict({"state": sd["state"], "param_groups": groups})
    for g, cur in zip(opt.param_groups, runtime):
        g.update(cur)


def build(cfg: Config, **run) -> Trainer:
    """An entry point's sequence in one call, for tools and tests: ``run`` overrides (e.g.
    ``device="cpu", backend="compile"``), resolve the config, resolve the runtime, seed, build."""
    cfg = resolve(replace(cfg, run=replace(cfg.run, **run)), env_spec(cfg.env).n_agents)
    seed_everything(cfg.train.seed)
    return Trainer(cfg, resolve_runtime(cfg.run))
