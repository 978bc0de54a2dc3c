"""MPE2 scenarios behind one array interface: agents are rows, observations and actions padded.

Every discrete-action MPE2 scenario is exposed through the PettingZoo parallel API and turned
into fixed-shape numpy arrays: observations (N, O) zero-padded to the largest agent's size O,
actions as integers in [0, A) with A the largest action count; an agent's padded actions are
masked out (``action_mask``) so no policy can pick them.  A time-limit truncation ends the
episode but is not a termination: the continuation flag stays 1 (SPEC §2).

The PettingZoo Butterfly scenarios (image observations, :mod:`matwm_fast.butterfly`) sit behind
the same interface: ``MultiAgentEnv(cfg)`` of a Butterfly scenario is a
:class:`~matwm_fast.butterfly.ButterflyEnv`, whose observations are (N, C, H, W) uint8 frames
(``EnvSpec.obs_shape``, ``EnvSpec.obs_dtype``).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import env_state
from .config import EnvConfig

# scenario name -> mpe2 module (versions as shipped by mpe2)
SCENARIOS = {
    "simple_tag": "simple_tag_v3",
    "simple_spread": "simple_spread_v3",
    "simple_adversary": "simple_adversary_v3",
    "simple_push": "simple_push_v3",
    "simple_reference": "simple_reference_v3",
    "simple_speaker_listener": "simple_speaker_listener_v4",
    "simple_crypto": "simple_crypto_v3",
    "simple_world_comm": "simple_world_comm_v3",
}
# parameters the wrapper owns; users set them through other means
_RESERVED = {"continuous_actions", "render_mode", "max_cycles", "benchmark_data"}


def is_butterfly(scenario: str) -> bool:
    """Whether ``scenario`` is one of the PettingZoo Butterfly (image) scenarios."""
    from .butterfly import SCENARIOS as BUTTERFLY

    return scenario in BUTTERFLY


def scenario_names() -> list[str]:
    """Every scenario ``--scenario`` takes: the MPE2 ones, then the Butterfly ones."""
    from .butterfly import SCENARIOS as BUTTERFLY

    return [*SCENARIOS, *BUTTERFLY]


def _module(scenario: str):
    if scenario not in SCENARIOS:
        raise ValueError(f"--env.scenario {scenario!r}: unknown scenario; valid scenarios: {', '.join(scenario_names())}")
    return importlib.import_module(f"mpe2.{SCENARIOS[scenario]}")


def scenario_params(scenario: str) -> dict[str, Any]:
    """The settable parameters of a scenario and their defaults."""
    if is_butterfly(scenario):
        from . import butterfly

        return butterfly.scenario_params(scenario)
    sig = inspect.signature(_module(scenario).raw_env.__init__)
    return {k: p.default for k, p in sig.parameters.items() if k != "self" and k not in _RESERVED}


def parse_kwargs(scenario: str, pairs: list[str] | tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    """``["num_good=2", ...]`` → validated ((key, value), ...), values parsed as Python literals
    (a value that is none stays a string); MPE2's parameters checked here, Butterfly's by
    :func:`matwm_fast.butterfly.check_kwargs`."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"scenario parameter {pair!r} must look like KEY=VALUE")
        key, raw = pair.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.append((key, value))
    if is_butterfly(scenario):
        from . import butterfly

        butterfly.check_kwargs(scenario, tuple(out))
        return tuple(out)
    valid = scenario_params(scenario)
    for key, _ in out:
        if key not in valid:
            raise ValueError(
                f"{scenario} has no parameter {key!r}; valid: {', '.join(valid)} (and --env.max-cycles)")
    check_kwargs(scenario, tuple(out))
    return tuple(out)


# scenario parameters that count agents: at least one of each
_COUNTS = {"num_good", "num_adversaries", "N"}
_RATIOS = {"local_ratio"}


def check_kwargs(scenario: str, kwargs: tuple[tuple[str, Any], ...]) -> None:
    """Each parameter against the type of the scenario's own default and a sane range."""
    if is_butterfly(scenario):
        from . import butterfly

        return butterfly.check_kwargs(scenario, kwargs)
    valid = scenario_params(scenario)
    for key, value in kwargs:
        if key not in valid:
            raise ValueError(f"--scenario-arg {key}={value!r}: {scenario} has no parameter {key!r}; "
                             f"valid: {', '.join(valid)} (and --env.max-cycles)")
        default = valid[key]
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "True or False"
        elif isinstance(default, int) or default is None:  # None: an optional count (e.g. neighbours)
            lo = 1 if key in _COUNTS else 0
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= lo) or (default is None and value is None)
            want = f"an integer ≥ {lo}" + (" or None" if default is None else "")
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                0.0 <= value <= 1.0 if key in _RATIOS else np.isfinite(value))
            want = "a number in [0, 1]" if key in _RATIOS else "a finite number"
        else:
            ok, want = True, ""
        if not ok:
            raise ValueError(f"--scenario-arg {key}={value!r}: {scenario}'s {key} must be {want} "
                             f"(default {default!r})")


@dataclass(frozen=True)
class EnvSpec:
    """Static facts of a scenario that the model is built from."""

    agents: tuple[str, ...]
    """Agent names in PettingZoo's order (row i of every array is agents[i])."""
    obs_sizes: tuple[int, ...]
    """Unpadded observation size of each agent."""
    action_counts: tuple[int, ...]
    """Number of discrete actions of each agent."""
    obs_shape: tuple[int, ...] = ()
    """One agent's observation as the env hands it out: ``(O,)`` for vector scenarios (O =
    :attr:`obs_dim`, filled in when left empty), ``(C, H, W)`` for image scenarios.  Models
    branch on ``len(obs_shape)``."""
    obs_dtype: str = "float32"
    """The observations' dtype: ``float32`` for vectors, ``uint8`` for image frames (stored as
    such everywhere: env arrays, replay, queues, staged inputs; the world model converts)."""

    def __post_init__(self):
        object.__setattr__(self, "obs_shape", tuple(int(x) for x in self.obs_shape) or (max(self.obs_sizes),))
        image = len(self.obs_shape) == 3
        if (len(self.obs_shape), self.obs_dtype) not in ((1, "float32"), (3, "uint8")) or (
                image and set(self.obs_sizes) != {int(np.prod(self.obs_shape))}):
            raise ValueError(f"EnvSpec: obs_shape {self.obs_shape} / obs_dtype {self.obs_dtype!r} / obs_sizes "
                             f"{self.obs_sizes}: want (O,) float32, or (C, H, W) uint8 with every size C·H·W")

    @property
    def is_image(self) -> bool:
        """Whether observations are image frames (C, H, W), not vectors."""
        return len(self.obs_shape) == 3

    @property
    def n_agents(self) -> int:
        return len(self.agents)

    @property
    def obs_dim(self) -> int:
        return max(self.obs_sizes)

    @property
    def n_actions(self) -> int:
        return max(self.action_counts)

    @property
    def teams(self) -> dict[str, list[int]]:
        """Agents grouped by name prefix (``adversary_0`` → team ``adversary``)."""
        teams: dict[str, list[int]] = {}
        for i, name in enumerate(self.agents):
            teams.setdefault(name.rsplit("_", 1)[0], []).append(i)
        return teams

    def obs_mask(self) -> np.ndarray:
        """(N, O) 1 for an agent's real observation features, 0 for padding.  Meaningful for
        vector scenarios only: an image scenario's frames have no padding (all ones over
        O = C·H·W), and the image world model does not use it."""
        return (np.arange(self.obs_dim)[None] < np.array(self.obs_sizes)[:, None]).astype(np.float32)

    def action_mask(self) -> np.ndarray:
        """(N, A) True for an agent's real actions, False for padded ones."""
        return np.arange(self.n_actions)[None] < np.array(self.action_counts)[:, None]


class MultiAgentEnv:
    """A PettingZoo MPE2 parallel env with padded array observations and actions.

    Constructed with a Butterfly scenario it is a :class:`matwm_fast.butterfly.ButterflyEnv`
    (the same methods; observations are uint8 frames): every caller builds envs this one way."""

    def __new__(cls, cfg: EnvConfig, *args, **kwargs):
        if cls is MultiAgentEnv and is_butterfly(cfg.scenario):
            from .butterfly import ButterflyEnv

            cls = ButterflyEnv
        return super().__new__(cls)

    def __init__(self, cfg: EnvConfig, seed: int = 0, render_mode: str | None = None):
        mod = _module(cfg.scenario)
        check_kwargs(cfg.scenario, cfg.kwargs)
        kwargs = dict(cfg.kwargs)
        self.env = mod.parallel_env(max_cycles=cfg.max_cycles, continuous_actions=False,
                                    render_mode=render_mode, **kwargs)
        self._seed = seed
        obs, _ = self.env.reset(seed=seed)
        agents = tuple(self.env.possible_agents)
        self.spec = EnvSpec(
            agents=agents,
            obs_sizes=tuple(int(np.prod(self.env.observation_space(a).shape)) for a in agents),
            action_counts=tuple(int(self.env.action_space(a).n) for a in agents),
        )
        self._obs = self._pack(obs)
        self._needs_reset = False

    # -- arrays ---------------------------------------------------------------------------------
    def _pack(self, obs: dict) -> np.ndarray:
        out = np.zeros((self.spec.n_agents, self.spec.obs_dim), np.float32)  # (N, O)
        for i, a in enumerate(self.spec.agents):
            if a in obs:
                o = np.asarray(obs[a], np.float32).reshape(-1)
                out[i, : o.shape[0]] = o
        return out

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode; returns observations (N, O)."""
        obs, _ = self.env.reset(seed=seed)
        self._obs = self._pack(obs)
        self._needs_reset = False
        return self._obs

    def _check_actions(self, actions: np.ndarray) -> np.ndarray:
        """(N,) integer actions, each within its agent's count, in an episode still running."""
        if self._needs_reset:
            raise RuntimeError("episode is over: call reset() before step()")
        actions = np.asarray(actions).reshape(-1)
        for i, n in enumerate(self.spec.action_counts):
            if not 0 <= actions[i] < n:
                raise ValueError(f"action {actions[i]} of {self.spec.agents[i]} outside [0, {n})")
        return actions

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """Act with (N,) integer actions; returns (obs (N, O), rewards (N,), continues (N,), done).

        ``continues`` is 0 only for an agent that really terminated; ``done`` says the episode is
        over (termination or time limit) and the caller must ``reset``.
        """
        actions = self._check_actions(actions)
        live = self.env.agents
        obs, rew, term, trunc, _ = self.env.step(
            {a: int(actions[i]) for i, a in enumerate(self.spec.agents) if a in live})
        rewards = np.array([float(rew.get(a, 0.0)) for a in self.spec.agents], np.float32)  # (N,)
        continues = np.array([0.0 if term.get(a, False) else 1.0 for a in self.spec.agents], np.float32)
        done = any(term.values()) or any(trunc.values()) or not self.env.agents
        self._obs = self._pack(obs)
        self._needs_reset = done
        return self._obs, rewards, continues, done

    def render(self) -> np.ndarray:
        return self.env.render()

    def close(self) -> None:
        self.env.close()

    # -- exact resume ------------------------------------------------------------------------------
    def get_state(self) -> dict:
        """Everything needed to continue this env exactly (world, its RNG, the wrappers' flags),
        as plain data: see :mod:`matwm_fast.env_state`."""
        return {"world": env_state.snapshot(self.env), "obs": torch.from_numpy(self._obs.copy()),
                "needs_reset": self._needs_reset}

    def set_state(self, state: dict) -> None:
        """Continue from :meth:`get_state` of an env of the same config; ValueError if it does not fit."""
        if not isinstance(state, dict) or not isinstance(state.get("obs"), torch.Tensor):
            raise ValueError(f"env state is malformed: expected a mapping of world, obs and needs_reset, "
                             f"got a {type(state).__name__}")
        try:
            env_state.restore(self.env, state["world"])
            obs = state["obs"].numpy().astype(np.float32)
            needs_reset = bool(state["needs_reset"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"env state is malformed: {e!r}") from e
        if obs.shape != self._obs.shape:
            raise ValueError(f"env state holds observations {obs.shape}, this env {self._obs.shape}")
        self._obs, self._needs_reset = obs, needs_reset


def random_actions(rng: np.random.Generator, spec: EnvSpec) -> np.ndarray:
    """Uniform actions that respect each agent's action count: (N,)."""
    return (rng.random(spec.n_agents) * np.array(spec.action_counts)).astype(np.int64)


def env_spec(cfg: EnvConfig) -> EnvSpec:
    """The spec of a scenario (a throwaway env is built to read it): what config.resolve needs."""
    env = MultiAgentEnv(cfg)
    try:
        return env.spec
    finally:
        env.close()
