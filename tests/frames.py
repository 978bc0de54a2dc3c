"""Image-observation fixtures that need no image env: a spec of frames, configs sized for tests,
and uint8 batches (for tests/test_vision.py and tests/tools/test_flops.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from matwm_fast.config import Config, preset, resolve
from matwm_fast.env import EnvSpec

AGENTS = ("paddle_0", "paddle_1")


@dataclass(frozen=True)
class _FrameSpec(EnvSpec):
    """EnvSpec with the frame fields, for a checkout whose EnvSpec does not have them yet."""

    obs_shape: tuple[int, ...] = ()
    obs_dtype: str = "float32"


def image_spec(shape=(3, 16, 12), agents=AGENTS, actions=3) -> EnvSpec:
    """A spec of uint8 frames ``shape`` (C, H, W), as an image scenario's env hands it out."""
    kw = dict(agents=tuple(agents), obs_sizes=(shape[0] * shape[1] * shape[2],) * len(agents),
              action_counts=(actions,) * len(agents), obs_shape=tuple(shape), obs_dtype="uint8")
    try:
        return EnvSpec(**kw)
    except TypeError:  # EnvSpec without obs_shape / obs_dtype
        return _FrameSpec(**kw)


def image_config(spec: EnvSpec, stages: int = 2, channels: int = 2, name: str = "smoke", **wm) -> Config:
    """The ``name`` preset with a conv stack of ``stages`` stages of ``channels``, resolved for ``spec``."""
    c = preset(name)
    return resolve(replace(c, wm=replace(c.wm, cnn_stages=stages, cnn_channels=channels, **wm)), spec.n_agents)


def frames(*lead: int, shape=(3, 16, 12), seed: int = 0) -> torch.Tensor:
    """Random uint8 frames (*lead, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*lead, *shape), generator=g, dtype=torch.uint8)


def sequences(spec: EnvSpec, rows: int, steps: int, seed: int = 0):
    """A world-model batch of uint8 frames: obs, act, rew, cont, first, team_act, agent (agent-major rows)."""
    g = torch.Generator().manual_seed(seed)
    n = spec.n_agents
    obs = frames(rows, steps, shape=spec.obs_shape, seed=seed)
    act = torch.randint(0, spec.n_actions, (rows, steps), generator=g)
    rew = torch.randn(rows, steps, generator=g)
    cont = torch.ones(rows, steps)
    first = torch.zeros(rows, steps, dtype=torch.bool)
    first[:, steps // 2] = True
    team_act = torch.randint(0, spec.n_actions, (rows, steps, max(n - 1, 1)), generator=g)
    agent = torch.arange(n).repeat_interleave(rows // n)
    return obs, act, rew, cont, first, team_act, agent
