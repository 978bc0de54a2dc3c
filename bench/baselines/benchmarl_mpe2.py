"""BenchMARL on MPE2: the task, the budget snapshots and the policy as an action function.

Imported only after ``model_free.py`` has checked that BenchMARL is installed (it imports
BenchMARL, TorchRL and TensorDict at the top).  Its classes live in a module, not in a function,
because BenchMARL pickles the task and the callbacks into its experiment folder.

* :class:`MPE2Task` is BenchMARL's own PettingZoo task class with one change: the env is an
  ``mpe2`` parallel env (PettingZoo's ``pettingzoo.mpe`` is deprecated), wrapped by TorchRL's
  ``PettingZooWrapper`` exactly as BenchMARL wraps its PettingZoo tasks (categorical actions, the
  env's global state for MAPPO's critic, agents grouped by name prefix) — discrete actions only,
  local observations per agent as ``matwm_fast.env.MultiAgentEnv`` sees them.  Each of the
  training envs gets its own seed (BenchMARL's own task gives every env of the batch the same
  seed, so all of them would play the same layouts).
* :class:`Snapshots` counts the env steps (joint transitions) of every collected batch and copies
  the policy's parameters when training has consumed exactly a budget's env steps.
* :func:`action_function` turns the policy into ``obs (N, O) → actions (N,)`` for
  ``matwm_fast.play.play``: greedy (the mode of PPO's Categorical, the argmax of a Q-learner's
  action values) or as in training (sampled from the Categorical; ε-greedy at the ε reached).
* :func:`settable` lists what ``settings`` may change: BenchMARL's experiment fields and the
  algorithm's own (QMIX's mixer width, PPO's clip ε, ...), with their defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import time

import numpy as np
import torch
from benchmarl.algorithms import IppoConfig, IqlConfig, MappoConfig, QmixConfig, VdnConfig
from benchmarl.environments.pettingzoo.common import PettingZooClass
from benchmarl.experiment import Callback, Experiment, ExperimentConfig
from benchmarl.models.mlp import MlpConfig
from tensordict import TensorDict
from torchrl.envs.libs.pettingzoo import PettingZooWrapper
from torchrl.envs.utils import ExplorationType, set_exploration_type

# on-policy actor-critics (PPO) and off-policy value-based learners (Q-learning; QMIX and VDN mix
# the agents' values into the team's, IQL learns each alone)
ALGORITHMS = {"mappo": MappoConfig, "ippo": IppoConfig, "qmix": QmixConfig, "vdn": VdnConfig, "iql": IqlConfig}
# training env i of run seed s is seeded with TRAIN_ENV_SEED + 1000·s + i: away from the evaluation
# episodes (20,000 + s·50 + e by default) and from MATWM's training env
TRAIN_ENV_SEED = 1_000_000


class MPE2Task(PettingZooClass):
    """A BenchMARL PettingZoo task played on an ``mpe2`` scenario (config: module, max_cycles, kwargs)."""

    def get_env_fun(self, num_envs, continuous_actions, seed, device):
        config = dict(self.config)
        module, kwargs = config.pop("module"), dict(config.pop("kwargs", {}))
        made = [0]  # envs built so far by this function: the batch's envs get seeds base + 0, 1, ...

        def make():
            env_seed = TRAIN_ENV_SEED + 1000 * int(seed or 0) + made[0]
            made[0] += 1
            scenario = importlib.import_module(f"mpe2.{module}")
            return PettingZooWrapper(
                scenario.parallel_env(continuous_actions=False, max_cycles=config["max_cycles"], **kwargs),
                return_state=self.has_state(), categorical_actions=True, seed=env_seed, device=device)

        return make

    def supports_continuous_actions(self) -> bool:
        return False  # the comparison is on discrete actions, as MATWM plays them


class Snapshots(Callback):
    """Counts env steps and keeps the policy's parameters at each budget (after that batch's training)."""

    def __init__(self, budgets: list[int]):
        super().__init__()
        self.budgets = sorted(budgets)
        self.env_steps = 0  # joint transitions collected so far
        self.batches: list[int] = []  # env steps of each collected batch
        self.saved: dict[int, dict] = {}  # budget -> {"policy": state dict, "train_wall_s": ...}
        self.start = time.perf_counter()

    def __getstate__(self):  # BenchMARL pickles its callbacks: not the experiment, not the parameters
        state = self.__dict__.copy()
        state["experiment"], state["saved"] = None, {}
        return state

    def on_batch_collected(self, batch):
        n = int(batch.numel())  # the batch is (envs, steps): one entry per joint transition of one env
        self.batches.append(n)
        self.env_steps += n

    def on_train_end(self, training_td, group):
        exp = self.experiment
        if group != list(exp.train_group_map)[-1]:
            return  # the other groups of this batch have not trained yet
        if exp.total_frames != self.env_steps:
            raise RuntimeError(f"BenchMARL counted {exp.total_frames} frames, the batches {self.env_steps} env steps")
        if self.env_steps in self.budgets:
            self.saved[self.env_steps] = {
                "policy": copy.deepcopy(exp.policy.state_dict()),
                "train_wall_s": time.perf_counter() - self.start, "iterations": len(self.batches)}


def experiment_config(settings: dict, save_folder: str, max_frames: int) -> ExperimentConfig:
    """BenchMARL's default experiment config (conf/experiment/base_experiment.yaml) with the
    changes that ``settings["experiment"]`` lists, and no logging, evaluation or checkpoints."""
    cfg = ExperimentConfig.get_from_yaml()
    for key, value in settings["experiment"].items():
        setattr(cfg, key, value)
    cfg.sampling_device = cfg.train_device = cfg.buffer_device = "cpu"
    cfg.prefer_continuous_actions = False
    cfg.max_n_frames, cfg.max_n_iters = max_frames, None
    cfg.evaluation, cfg.render, cfg.loggers, cfg.create_json = False, False, [], False
    cfg.checkpoint_interval, cfg.checkpoint_at_end = 0, False
    cfg.save_folder = save_folder
    return cfg


def plain(cfg) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else repr(v))
            for k, v in dataclasses.asdict(cfg).items()}


def defaults() -> dict:
    """BenchMARL's defaults for the parts we use: experiment, the algorithms, the MLP (as plain data)."""
    return {"experiment": plain(ExperimentConfig.get_from_yaml()),
            **{name: plain(c.get_from_yaml()) for name, c in ALGORITHMS.items()},
            "model": plain(MlpConfig.get_from_yaml())}


def on_policy(algorithm: str) -> bool:
    return ALGORITHMS[algorithm].on_policy()


def settable(algorithm: str) -> dict[str, dict]:
    """{"experiment": {field: default}, "algorithm": {field: default}}: what ``settings`` may change
    (numbers, booleans and strings; the run's plumbing — devices, logging, folders — excluded)."""
    fixed = {"sampling_device", "train_device", "buffer_device", "prefer_continuous_actions", "max_n_iters",
             "max_n_frames", "evaluation", "render", "loggers", "create_json", "save_folder", "restore_file",
             "restore_map_location", "checkpoint_interval", "checkpoint_at_end", "keep_checkpoints_num",
             "exclude_buffer_from_checkpoint", "project_name", "wandb_extra_kwargs", "adam_extra_kwargs",
             "evaluation_interval", "evaluation_episodes", "evaluation_deterministic_actions", "evaluation_static"}
    scalar = (int, float, str, bool, type(None))
    exp = {k: v for k, v in plain(ExperimentConfig.get_from_yaml()).items() if k not in fixed and isinstance(v, scalar)}
    alg = {k: v for k, v in plain(ALGORITHMS[algorithm].get_from_yaml()).items() if isinstance(v, scalar)}
    return {"experiment": exp, "algorithm": alg}


def build(scenario_module: str, scenario_name: str, max_cycles: int, kwargs: dict, algorithm: str, seed: int,
          settings: dict, save_folder: str, max_frames: int, callbacks=()) -> Experiment:
    """A BenchMARL experiment: the algorithm's defaults and BenchMARL's MLP, with the changes of
    ``settings`` ({"experiment": {...}, "algorithm": {...}})."""
    task = MPE2Task(name=scenario_name.upper(), config={"module": scenario_module, "max_cycles": max_cycles,
                                                        "kwargs": dict(kwargs)})
    algorithm_config = dataclasses.replace(ALGORITHMS[algorithm].get_from_yaml(), **settings.get("algorithm", {}))
    return Experiment(task=task, algorithm_config=algorithm_config,
                      model_config=MlpConfig.get_from_yaml(), critic_model_config=MlpConfig.get_from_yaml(),
                      seed=seed, config=experiment_config(settings, save_folder, max_frames),
                      callbacks=list(callbacks))


def action_function(policy, group_map: dict[str, list[str]], agents: tuple[str, ...],
                    obs_sizes: tuple[int, ...], greedy: bool):
    """The policy as ``obs (N, O) padded → actions (N,)`` in ``agents``' row order.

    Greedy takes each agent's best action (PPO: the Categorical's mode, the argmax of its logits;
    Q-learning: the argmax of the action values, no ε); otherwise the policy acts as in training
    (sampled from the Categorical; ε-greedy) with torch's global generator, which ``play`` seeds."""
    rows = {g: [agents.index(a) for a in members] for g, members in group_map.items()}
    for g, idx in rows.items():
        if len({obs_sizes[i] for i in idx}) != 1:
            raise ValueError(f"group {g}: its agents' observations differ in size")
    kind = ExplorationType.DETERMINISTIC if greedy else ExplorationType.RANDOM
    n = len(agents)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        td = TensorDict({g: TensorDict({"observation": torch.as_tensor(obs[idx, :obs_sizes[idx[0]]])},
                                       batch_size=[len(idx)]) for g, idx in rows.items()}, batch_size=[])
        with set_exploration_type(kind):
            td = policy(td)
        out = np.zeros(n, np.int64)
        for g, idx in rows.items():
            out[idx] = td[g, "action"].reshape(-1).numpy()
        return out

    return act

