"""The networks of a config, and a trained policy loaded from a checkpoint.

:func:`build_networks` is the one place the world model and the actor-critic are constructed:
the trainer builds what it trains with it, and :class:`Policy` builds the same networks from the
config a checkpoint holds before loading its weights.  ``Policy`` is what ``eval``, the sweep's
matchups and the experiments under ``bench/experiments`` play; it lives here, below the command
modules, so tools import it without importing a command line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ck
from .actor_critic import ActorCritic, state_dim
from .config import Config, load_config
from .env import EnvSpec, env_spec
from .runtime import resolve_kernels
from .world_model import WorldModel


def build_networks(cfg: Config, spec: EnvSpec, kernels: str = "ref",
                   device: torch.device | str | None = None) -> tuple[WorldModel, ActorCritic]:
    """The world model and the actor-critic of ``cfg`` for ``spec``, on ``device``, running
    ``kernels`` ('ref' or 'triton', resolved).

    Built in this order (world model first) so the draws from torch's global generator that
    initialise them are the same wherever they are built: a trainer seeded alike starts from
    the same weights.  The world model comes back in eval mode: imagination and acting never
    drop; only its own update (``Trainer.wm_update``) switches dropout on.
    """
    wm = WorldModel(cfg.wm, spec, kernels).to(device)
    s_dim = state_dim(cfg.wm.latent_vars, cfg.wm.latent_classes, cfg.wm.width, spec.n_agents, spec.n_actions)
    ac = ActorCritic(cfg.ac, spec, s_dim, wm.bins, kernels).to(device)
    wm.eval()
    return wm, ac


class Policy:
    """A trained policy loaded from one checkpoint file: its config, env step, spec and networks."""

    def __init__(self, path: Path | str, device: torch.device | str = "cpu", kernels: str = "auto"):
        """``path``: a checkpoint file, or a run directory (its latest checkpoint, resolved once
        here: ``self.path`` is the file evaluated even if training writes a newer one meanwhile).
        Only the networks are rebuilt — no replay or optimisers — so a large run evaluates cheaply."""
        self.path = ck.resolve(path)
        state = ck.load(self.path)["trainer"]
        try:
            self.cfg: Config = load_config(state["config"])
            self.step = int(state["step"])
        except (ValueError, KeyError, TypeError) as e:
            raise ck.CheckpointError(f"{self.path}: {e}") from e
        device = torch.device(device)
        impl = resolve_kernels(kernels, device, "eager")
        self.spec: EnvSpec = env_spec(self.cfg.env)
        self.wm, self.ac = build_networks(self.cfg, self.spec, impl, device)
        try:
            self.wm.load_state_dict(state["wm"])
            self.ac.load_state_dict(state["ac"])
        except (RuntimeError, KeyError, TypeError) as e:
            raise ck.CheckpointError(f"{self.path} does not fit the model built from its config: {e}") from e
