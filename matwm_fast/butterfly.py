"""PettingZoo Butterfly scenarios (Cooperative Pong, Pistonball, Knights-Archers-Zombies) behind
:class:`~matwm_fast.env.MultiAgentEnv`'s array interface, with image observations.

``MultiAgentEnv(EnvConfig(scenario="cooperative_pong"))`` is a :class:`ButterflyEnv`: the same
methods, rows in PettingZoo's fixed agent order, but each observation is a frame:

* **Preprocessing** (STORM's image pipeline, which MATWM builds on; the paper names the tasks):
  each agent's RGB observation is resized to 64 × 64 by area averaging — what gymnasium's
  ``ResizeObservation``, which STORM uses, asks of OpenCV (``INTER_AREA``): every source pixel
  weighted by its overlap with the output pixel (:func:`resize`, numpy, the same values as
  OpenCV's on these games' frames without OpenCV's 64 MB wheel) — and laid out channels-first:
  ``(3, 64, 64)`` uint8.  No frame stacking (the transformer sees the history) and no frame
  skipping (an env step is one game cycle of all agents, the unit the paper's 50K steps count;
  STORM's skip of 4 is an Atari convention).  Pistonball's tall crops (457 × 120) and Pong's wide screen (280 × 480) are
  squeezed to the square, as STORM squeezes Atari's 210 × 160.
* **Agents that die** (KAZ; the paper does not say how it handles them): the rows keep the
  fixed order N; a dead agent's observation is a zero frame, its reward 0 and its continuation
  flag 0 from the step it died on to the episode's end (its rows in the replay teach the world
  model that a dead agent's future is worth nothing), and its actions are ignored (not sent to
  the env).  ``alive`` (N,) says who is still playing.  The episode ends when PettingZoo's agent
  list is empty: all dead, the game lost (every continuation 0; its last frames stay as drawn),
  or the time limit (a truncation: the living keep 1).
* **Fixed settings**: Pistonball runs with discrete actions (``continuous=False``), KAZ with
  image observations (``obs_method="image"``), Pong and Pistonball with ``render_mode="rgb_array"``:
  in PettingZoo 1.27 they draw their screens only when a render mode is set (under ``None``
  Pong's frames stay black and Pistonball's frozen at the reset).  The episode length is ``--max-cycles`` (the presets take each
  game's PettingZoo default: 900, 125, 900; :data:`matwm_fast.config.SCENARIO_DEFAULTS`).
* **Exact resume without pickle**: the game's state lives in pygame surfaces and pymunk spaces,
  which cannot be written out as data.  So every episode starts from a seed of its own
  (``reset(seed=s)``; without one, drawn from the env's generator) and the state is that seed,
  the actions taken since, and the generator's state — :meth:`ButterflyEnv.set_state` resets
  with the seed and replays the actions (the simulators are deterministic), then checks that the
  replay ends on the saved observation.

``pip install 'matwm_fast[butterfly]'`` brings ``pettingzoo[butterfly]`` (pygame, pymunk).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from typing import Any

import numpy as np
import torch

from .config import EnvConfig
from .env import EnvSpec, MultiAgentEnv

# scenario name -> pettingzoo.butterfly module (versions as shipped by pettingzoo 1.27)
SCENARIOS = {
    "cooperative_pong": "cooperative_pong_v6",
    "pistonball": "pistonball_v6",
    "knights_archers_zombies": "knights_archers_zombies_v11",
}
FRAME = (3, 64, 64)
"""(C, H, W) of every agent's observation: RGB at STORM's 64 × 64."""
EXTRA = "pip install 'matwm_fast[butterfly]'  (pettingzoo[butterfly]: pygame and pymunk)"

# what matwm_fast fixes, and why (a --scenario-arg naming one is refused with the reason)
_FIXED: dict[str, dict[str, Any]] = {
    "cooperative_pong": {"render_mode": "rgb_array"},
    "pistonball": {"render_mode": "rgb_array", "continuous": False},
    "knights_archers_zombies": {"obs_method": "image", "render_mode": None},
}
_WHY = {
    "max_cycles": "the episode length is --max-cycles",
    "render_mode": "set by matwm_fast (the frames need the game drawn)",
    "render_fps": "only paces a window on screen",
    "render_ratio": "the frame is resized to 64 × 64 anyway",
    "continuous": "MATWM's actors are discrete: pistonball runs with continuous=False",
    "obs_method": "MATWM's Butterfly tasks are image-based: KAZ runs with obs_method='image'",
}
_RESERVED = {
    "cooperative_pong": {"max_cycles", "render_mode", "render_fps", "render_ratio"},
    "pistonball": {"max_cycles", "render_mode", "continuous"},
    "knights_archers_zombies": {"max_cycles", "render_mode", "obs_method"},
}
# the settable parameters: ("int", lo) an integer ≥ lo; ("num", lo, lo_open) a finite number ≥ lo
# (> lo when lo_open; lo None: any finite number); ("bool",)
_RULES: dict[str, dict[str, tuple]] = {
    "cooperative_pong": {
        "ball_speed": ("num", 0, True), "left_paddle_speed": ("num", 0, True),
        "right_paddle_speed": ("num", 0, True), "cake_paddle": ("bool",), "bounce_randomness": ("bool",),
        "max_reward": ("num", None, False), "off_screen_penalty": ("num", None, False),
    },
    "pistonball": {
        "n_pistons": ("int", 2), "time_penalty": ("num", None, False), "random_drop": ("bool",),
        "random_rotate": ("bool",), "ball_mass": ("num", 0, True), "ball_friction": ("num", 0, False),
        "ball_elasticity": ("num", 0, False),
    },
    "knights_archers_zombies": {
        "spawn_delay": ("int", 1), "num_archers": ("int", 0), "num_knights": ("int", 0),
        "max_zombies": ("int", 1), "max_arrows": ("int", 1), "killable_knights": ("bool",),
        "killable_archers": ("bool",), "line_death": ("bool",),
    },
}


def _module(scenario: str):
    """The pettingzoo.butterfly module of ``scenario``; ValueError naming the extra if it is missing."""
    if scenario not in SCENARIOS:
        from .env import scenario_names

        raise ValueError(f"--env.scenario {scenario!r}: unknown scenario; valid scenarios: {', '.join(scenario_names())}")
    try:
        return importlib.import_module(f"pettingzoo.butterfly.{SCENARIOS[scenario]}")
    except ImportError as e:
        raise ValueError(f"--scenario {scenario} needs PettingZoo's Butterfly games ({e}); {EXTRA}") from e


def _signature_defaults(scenario: str) -> dict[str, Any]:
    """Every constructor parameter of the installed game and its default."""
    mod = _module(scenario)
    if scenario == "cooperative_pong":  # raw_env takes **kwargs and hands them to the game
        game = importlib.import_module(mod.raw_env.__module__).CooperativePong
        fn, skip = game.__init__, {"self", "randomizer"}
    else:
        fn, skip = mod.raw_env.__init__, {"self"}
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if k not in skip}


def scenario_params(scenario: str) -> dict[str, Any]:
    """The settable parameters of a Butterfly scenario and their defaults."""
    defaults = _signature_defaults(scenario)
    return {k: defaults[k] for k in _RULES[scenario] if k in defaults}


def check_kwargs(scenario: str, kwargs: tuple[tuple[str, Any], ...]) -> None:
    """Each parameter by name and value (ValueError naming the value and what is allowed)."""
    valid = scenario_params(scenario)
    for key, value in kwargs:
        if key in _RESERVED[scenario]:
            raise ValueError(f"--scenario-arg {key}={value!r}: {scenario}'s {key} is not settable here: {_WHY[key]}")
        if key not in valid:
            raise ValueError(f"--scenario-arg {key}={value!r}: {scenario} has no parameter {key!r}; "
                             f"valid: {', '.join(valid)} (and --env.max-cycles)")
        rule, default = _RULES[scenario][key], valid[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if rule[0] == "bool":
            ok, want = isinstance(value, bool), "True or False"
        elif rule[0] == "int":
            ok, want = number and isinstance(value, int) and value >= rule[1], f"an integer ≥ {rule[1]}"
        else:
            lo, lo_open = rule[1], rule[2]
            ok = number and math.isfinite(value) and (lo is None or (value > lo if lo_open else value >= lo))
            want = "a finite number" + ("" if lo is None else f" {'>' if lo_open else '≥'} {lo}")
        if not ok:
            raise ValueError(f"--scenario-arg {key}={value!r}: {scenario}'s {key} must be {want} (default {default!r})")
    given = dict(kwargs)
    if scenario == "knights_archers_zombies":
        archers = given.get("num_archers", valid["num_archers"])
        knights = given.get("num_knights", valid["num_knights"])
        if archers + knights < 1:
            raise ValueError(f"--scenario-arg num_archers={archers} num_knights={knights}: "
                             "knights_archers_zombies needs at least one agent")


# ----------------------------------------------------------------------------- frames
@functools.lru_cache(maxsize=None)
def _area_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Area interpolation along one axis of ``src`` pixels to ``dst``: output pixel d covers the
    source interval [d·s, (d+1)·s), s = src/dst; each source pixel it touches weighs its overlap / s.
    → (indices (dst, K), weights (dst, K) float32), K = ⌈s⌉ + 1 (unused slots weigh 0)."""
    scale = src / dst
    k = math.ceil(scale) + 1
    idx, w = np.zeros((dst, k), np.intp), np.zeros((dst, k), np.float32)
    for d in range(dst):
        lo, hi = d * scale, (d + 1) * scale
        for j, px in enumerate(range(math.floor(lo), min(math.ceil(hi), src))):
            idx[d, j], w[d, j] = px, (min(hi, px + 1) - max(lo, px)) / scale
    return idx, w


def resize(frame: np.ndarray, size: tuple[int, int] = FRAME[1:]) -> np.ndarray:
    """An RGB observation (H, W, 3) uint8 → (3, h, w) uint8, (h, w) = ``size`` (64 × 64), by area
    averaging: OpenCV's ``INTER_AREA`` when shrinking (STORM's resize), one separable weighted sum
    per axis, rounded to nearest (half to even, as OpenCV)."""
    turned = np.swapaxes(frame, 0, 1)
    if not frame.flags.c_contiguous and turned.flags.c_contiguous:
        # PettingZoo's frames are transposed views of pygame's (W, H, 3) pixels: gather along the
        # memory's own order and transpose the small result instead
        return np.swapaxes(resize(turned, (size[1], size[0])), 1, 2)
    iy, wy = _area_weights(frame.shape[0], size[0])
    ix, wx = _area_weights(frame.shape[1], size[1])
    rows = np.einsum("dk,dkwc->dwc", wy, frame[iy], dtype=np.float32)  # (h, W, 3)
    out = np.einsum("ek,dekc->cde", wx, rows[:, ix])  # (3, h, w)
    return np.rint(out).astype(np.uint8)


def side_by_side(game: np.ndarray, obs: np.ndarray, height: int = 256, gap: int = 4) -> np.ndarray:
    """One video frame: the rendered game (H, W, 3) scaled to at least ``height`` rows, then the
    agents' own frames obs (N, 3, h, w) — what the world model sees — in a grid beside it, each
    shown at 2× (nearest pixel) in grids of up to two rows, else 1×; a dead agent's cell is black.
    → (height', W', 3) uint8."""
    n, _, fh, fw = obs.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    k = 2 if rows <= 2 else 1
    cell_h, cell_w = fh * k, fw * k
    height = max(height, rows * cell_h + gap * (rows - 1))
    h, w = game.shape[:2]
    scaled = resize(game, (height, max(1, round(w * height / h)))).transpose(1, 2, 0)  # (height, ·, 3)
    grid = np.zeros((height, cols * cell_w + gap * (cols - 1), 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * (cell_h + gap), c * (cell_w + gap)
        big = obs[i].transpose(1, 2, 0).repeat(k, 0).repeat(k, 1)  # (h·k, w·k, 3)
        grid[y: y + cell_h, x: x + cell_w] = big
    sep = np.full((height, gap, 3), 255, np.uint8)
    return np.concatenate([scaled, sep, grid], axis=1)


# ----------------------------------------------------------------------------- the env
class ButterflyEnv(MultiAgentEnv):
    """A PettingZoo Butterfly parallel env as arrays: frames (N, 3, 64, 64) uint8, rewards (N,),
    continuation flags (N,), done; agents in PettingZoo's fixed order whoever is alive."""

    def __init__(self, cfg: EnvConfig, seed: int = 0, render_mode: str | None = None):
        # render_mode is MPE's switch for video frames: here the game's own screen is always at
        # hand (render() reads it), so it changes nothing
        mod = _module(cfg.scenario)
        check_kwargs(cfg.scenario, cfg.kwargs)
        try:
            self.env = mod.parallel_env(max_cycles=cfg.max_cycles, **_FIXED[cfg.scenario], **dict(cfg.kwargs))
        except TypeError as e:  # a parameter this PettingZoo version does not know
            raise ValueError(f"{cfg.scenario} refused its parameters {dict(cfg.kwargs)}: {e}") from e
        self.scenario = cfg.scenario
        agents = tuple(self.env.possible_agents)
        self.spec = EnvSpec(agents=agents, obs_sizes=(math.prod(FRAME),) * len(agents),
                            action_counts=tuple(int(self.env.action_space(a).n) for a in agents),
                            obs_shape=FRAME, obs_dtype="uint8")
        self.alive = np.ones(len(agents), bool)  # (N,) who is still playing this episode
        self._seeds = np.random.default_rng(seed)  # the seeds of episodes reset without one
        self._start(seed)

    # -- arrays ---------------------------------------------------------------------------------
    def _pack(self, obs: dict, show: np.ndarray | None = None) -> np.ndarray:
        """Frames (N, 3, 64, 64); zero for an agent PettingZoo hands none (dead before this step)
        or that ``show`` (N,) hides (died at this step while the game goes on)."""
        out = np.zeros((self.spec.n_agents, *FRAME), np.uint8)  # (N, 3, 64, 64)
        for i, a in enumerate(self.spec.agents):
            if a in obs and (show is None or show[i]):
                out[i] = resize(obs[a])
        return out

    def _start(self, seed: int) -> np.ndarray:
        obs, _ = self.env.reset(seed=seed)
        self._episode_seed = int(seed)
        self._actions: list[np.ndarray] = []  # each (N,): the episode so far, what set_state replays
        self.alive[:] = True
        self._obs = self._pack(obs)
        self._needs_reset = False
        return self._obs

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode (with ``seed``, else one drawn from this env's generator); returns
        frames (N, 3, 64, 64) uint8."""
        if seed is None:
            seed = int(self._seeds.integers(2**32))
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"episode seed {seed!r}: need a non-negative integer")
        return self._start(int(seed))

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """Act with (N,) integer actions (a dead agent's is ignored); returns (frames (N, 3, 64, 64)
        uint8, rewards (N,), continues (N,), done).  ``continues`` is 0 for an agent that died (from
        that step on) and for all at a lost game's end; ``done``: call ``reset``."""
        actions = self._check_actions(actions)
        live = set(self.env.agents)
        obs, rew, term, _, _ = self.env.step({a: int(actions[i]) for i, a in enumerate(self.spec.agents) if a in live})
        self._actions.append(actions.astype(np.int64))
        rewards = np.array([float(rew.get(a, 0.0)) for a in self.spec.agents], np.float32)  # (N,)
        for i, a in enumerate(self.spec.agents):
            if term.get(a, False):
                self.alive[i] = False  # died now (or the game was lost): 0 from here to the end
        continues = self.alive.astype(np.float32)  # (N,)
        done = not self.env.agents
        # the game's last frames stay as they are (every agent terminates at a game's end)
        self._obs = self._pack(obs, self.alive | done)
        self._needs_reset = done
        return self._obs, rewards, continues, done

    def render(self) -> np.ndarray:
        """The whole game screen as the simulator holds it (H, W, 3) uint8 (read, never redrawn:
        a video leaves the episode exactly as it would have run)."""
        return np.ascontiguousarray(self.env.state())

    def view(self, obs: np.ndarray | None = None) -> np.ndarray:
        """A video frame: the game beside the frames the agents see (``obs``, default the current)."""
        return side_by_side(self.render(), self._obs if obs is None else obs)

    def close(self) -> None:
        self.env.close()

    # -- exact resume ------------------------------------------------------------------------------
    def get_state(self) -> dict:
        """This episode as plain data: its seed, the actions taken since (T, N), the generator of
        later episodes' seeds, the current frames (checked on restore) and whether it is over."""
        n = self.spec.n_agents
        acts = np.stack(self._actions) if self._actions else np.zeros((0, n), np.int64)
        return {"episode_seed": self._episode_seed, "actions": torch.from_numpy(acts),
                "seeds": self._seeds.bit_generator.state, "obs": torch.from_numpy(self._obs.copy()),
                "needs_reset": self._needs_reset}

    def set_state(self, state: dict) -> None:
        """Continue from :meth:`get_state` of an env of the same config: reset with the episode's
        seed and replay its actions.  ValueError if the state does not fit or does not replay to
        the saved frames (another PettingZoo, pygame or pymunk version)."""
        try:
            seed, acts, seeds = int(state["episode_seed"]), state["actions"], state["seeds"]
            obs, needs_reset = state["obs"], bool(state["needs_reset"])
            if not (isinstance(acts, torch.Tensor) and isinstance(obs, torch.Tensor) and isinstance(seeds, dict)):
                raise TypeError("actions and obs must be tensors, seeds a generator state")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"env state is malformed: expected a {self.scenario} episode (episode_seed, actions, "
                             f"seeds, obs, needs_reset): {e!r}") from e
        n = self.spec.n_agents
        if acts.dim() != 2 or acts.shape[1] != n or tuple(obs.shape) != (n, *FRAME) or obs.dtype != torch.uint8:
            raise ValueError(f"env state holds actions {tuple(acts.shape)} and frames {tuple(obs.shape)} "
                             f"{obs.dtype}; this {self.scenario} env has {n} agents of {FRAME} uint8 frames")
        self._start(seed)
        for t, a in enumerate(acts.numpy()):
            if self._needs_reset:
                raise ValueError(f"env state does not replay: its episode ended after {t} of {len(acts)} actions")
            self.step(a)
        if self._needs_reset != needs_reset or not np.array_equal(self._obs, obs.numpy()):
            raise ValueError(f"env state does not replay to its saved frames after {len(acts)} actions "
                             "(a different pettingzoo, pygame or pymunk version?)")
        try:
            self._seeds.bit_generator.state = seeds
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"env state's seed generator is malformed: {e}") from e
