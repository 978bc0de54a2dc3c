"""Playing episodes with a trained policy, and the paper's evaluation protocol on top of it:
mean episode return over N episodes, per agent and per team.

A fresh env (its own seed) is played with the trained policy — greedy (argmax) by default, or
sampled — while training's env and replay stay untouched.  Frames can be captured for a video:
the rendered game, and for image scenarios beside it the frames the agents see (the world
model's input, :func:`matwm_fast.butterfly.side_by_side`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .acting import ContextQueues, policy_step
from .config import EnvConfig
from .env import EnvSpec, MultiAgentEnv, random_actions
from .metrics import summarise_returns


def summarise(returns: np.ndarray, spec: EnvSpec) -> dict:
    """returns (E, N) episode returns → the flat evaluation summary (the ``eval_*`` columns of a
    metrics row): mean/std per agent, per team (each episode's mean over members), overall."""
    s = summarise_returns(returns, spec.agents, spec.teams)
    out: dict = {"episodes": s.episodes}
    for name, v in s.agents.items():
        out[f"{name}_return_mean"], out[f"{name}_return_std"] = v.mean, v.std
    for team, v in s.teams.items():
        out[f"team_{team}_return_mean"], out[f"team_{team}_return_std"] = v.mean, v.std
    out["return_mean"], out["return_std"] = s.all.mean, s.all.std
    return out


def report(returns: np.ndarray, spec: EnvSpec) -> dict:
    """returns (E, N) → the evaluation record every evaluator writes: per agent, per team, all
    agents, the flat summary and the raw returns (so any other statistic can be recomputed)."""
    s = summarise_returns(returns, spec.agents, spec.teams)
    return {
        "agents": {a: {"mean": v.mean, "std": v.std} for a, v in s.agents.items()},
        "teams": {t: {"mean": v.mean, "std": v.std, "members": [spec.agents[i] for i in spec.teams[t]]}
                  for t, v in s.teams.items()},
        "all": {"mean": s.all.mean, "std": s.all.std},
        "summary": summarise(returns, spec),
        "returns": np.round(returns, 6).tolist(),  # (E, N) in agent order
    }


@torch.no_grad()
def play(wm, ac, env_cfg: EnvConfig, act_context: int, episodes: int, seed: int, device,
         greedy: bool = True, random_policy: bool = False, capture_frames: int = 0,
         policies: np.ndarray | None = None,
         should_stop: Callable[[], bool] | None = None,
         act: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray], EnvSpec]:
    """Play ``episodes`` episodes → (returns (E, N), frames of the first ``capture_frames``, spec).

    Reproducible from ``seed`` alone and invisible to the caller's random streams: torch's global
    generator (which the latent sampling and a sampled policy draw from) is forked and seeded
    here, so evaluating during training leaves the training run exactly as without evaluation.
    ``should_stop`` is asked between episodes; when it says so, play ends early with the
    episodes finished so far (E < ``episodes``).
    ``act``, when given, is the learned policy instead of ``wm``/``ac`` (which may then be None):
    observations (N, *obs_shape) → actions (N,), called once per step (e.g. another library's policy,
    bench/baselines/model_free.py); greedy or sampled is its own business, and what it samples
    from torch's global generator is seeded here like the world model's policy.
    """
    device = torch.device(device)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        env = MultiAgentEnv(env_cfg, seed=seed, render_mode="rgb_array" if capture_frames else None)
        spec = env.spec
        rng = np.random.default_rng(seed)
        queues = ContextQueues(spec.n_agents, spec.obs_shape, act_context, device, obs_dtype=spec.obs_dtype)
        # a video frame: the game, and for images beside it the frames the agents see
        frame = (lambda o: env.view(o)) if spec.is_image else (lambda o: env.render())
        returns, frames = [], []
        for ep in range(episodes):
            if should_stop is not None and should_stop():
                break
            obs = env.reset(seed=seed + ep)
            queues.reset()
            total = np.zeros(spec.n_agents)  # (N,)
            done = False
            while not done:
                if ep < capture_frames:
                    frames.append(frame(obs))
                actions = random_actions(rng, spec)  # (N,)
                if not random_policy:
                    if act is not None:
                        learned = np.asarray(act(obs)).reshape(-1)  # (N,)
                    else:
                        o = torch.as_tensor(obs, device=device)  # (N, *obs_shape)
                        learned = policy_step(wm, ac, queues.obs, queues.act, queues.count_t, o, greedy).cpu().numpy()  # (N,)
                    actions = learned if policies is None else np.where(policies, learned, actions)
                if act is None:
                    queues.push(torch.as_tensor(obs, device=device), torch.as_tensor(actions, device=device))
                obs, rew, _, done = env.step(actions)
                total += rew
            if ep < capture_frames:
                frames.append(frame(obs))  # the final state too
            returns.append(total)
        env.close()
    return np.array(returns).reshape(-1, spec.n_agents), frames, spec  # (E, N)


def evaluate(wm, ac, env_cfg: EnvConfig, act_context: int, episodes: int, seed: int, device,
             greedy: bool = True, random_policy: bool = False, capture_frames: int = 0,
             policies: np.ndarray | None = None,
             should_stop: Callable[[], bool] | None = None,
             act: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[dict | None, list[np.ndarray]]:
    """Play ``episodes`` episodes; returns (summary, frames of the first ``capture_frames`` episodes).

    ``random_policy`` plays uniformly random actions (the baseline).  ``policies`` (N,) bool, when
    given, says which agents use the learned policy; the others act randomly (e.g. prey vs a random
    predator).  The summary is None when ``should_stop`` cut the evaluation short.  ``act``: see
    :func:`play`.
    """
    returns, frames, spec = play(wm, ac, env_cfg, act_context, episodes, seed, device, greedy=greedy,
                                 random_policy=random_policy, capture_frames=capture_frames, policies=policies,
                                 should_stop=should_stop, act=act)
    return (summarise(returns, spec) if len(returns) == episodes else None), frames


def write_video(frames: list[np.ndarray], path: str, fps: int = 10) -> None:
    """Frames (H, W, 3) uint8 → GIF or MP4 (by extension) through imageio."""
    try:
        import imageio.v2 as imageio
    except ImportError as e:
        raise RuntimeError("writing a video needs imageio: pip install 'matwm_fast[viz]'") from e
    if not frames:
        raise ValueError("no frames to write")
    if str(path).lower().endswith(".gif"):
        imageio.mimsave(path, frames, duration=1.0 / fps, loop=0)
    elif str(path).lower().endswith(".mp4"):
        try:
            imageio.mimsave(path, frames, fps=fps)
        except Exception as e:  # no ffmpeg plugin
            raise RuntimeError(f"cannot write MP4 ({e}); install imageio-ffmpeg or use a .gif path") from e
    else:
        raise ValueError(f"video path {path!r} must end in .gif or .mp4")
