"""``python bench/experiments/diagnose.py``: the scores mean what they say, the open-loop imagination is
the training imagination, env branching is exact, and the CLI runs end to end."""

from __future__ import annotations

import json

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "experiments"))
import diagnose as dg  # noqa: E402
from matwm_fast import train
from matwm_fast.config import EnvConfig, preset
from matwm_fast.env import EnvSpec, MultiAgentEnv, random_actions
from matwm_fast.imagination import ImagCaches, ImagNoise, imagine
from matwm_fast.policy import build_networks

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- scores
def test_r2_score_reference_points():
    rng = np.random.default_rng(0)
    y = rng.normal(size=500)
    assert dg.r2_score(y, y) == pytest.approx(1.0)
    assert dg.r2_score(np.full_like(y, y.mean()), y) == pytest.approx(0.0, abs=1e-12)
    assert dg.r2_score(-y + 2 * y.mean(), y) == pytest.approx(-3.0)  # mirrored: MSE = 4·Var
    per_feature = dg.r2_score(np.zeros((10, 2)), np.stack([np.arange(10.0), np.zeros(10)], 1), axis=0)
    assert per_feature[0] < 0 and np.isnan(per_feature[1])  # a constant feature has no R²


def test_effect_scores_on_known_cases():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(50, 5))
    true[::7, 4] = np.nan  # an agent with only 4 actions: its padded action must be ignored
    offset = rng.normal(size=(50, 1)) * 10  # the level does not matter for which action is best
    perfect = dg.effect_scores(true, true + offset, choice=np.nanargmax(true, 1))
    assert perfect["effect_corr"] == pytest.approx(1.0)
    assert perfect["best_action_agreement"] == 1.0
    assert perfect["regret_model_pick"] == 0.0 and perfect["regret_actor_pick"] == 0.0
    assert perfect["regret_uniform_pick"] > 0.5
    inverted = dg.effect_scores(true, -true, choice=np.nanargmin(true, 1))
    assert inverted["effect_corr"] == pytest.approx(-1.0)
    worst = np.nanmean(np.nanmax(true, 1) - np.nanmin(true, 1))
    assert inverted["regret_model_pick"] == pytest.approx(worst)
    assert inverted["regret_actor_pick"] == pytest.approx(worst)


# ----------------------------------------------------------------------------- imagination
SPEC = EnvSpec(agents=("a_0", "a_1", "a_2"), obs_sizes=(6, 6, 5), action_counts=(5, 5, 3))


def test_held_action_imagination_equals_training_imagination():
    """The diagnostic's full-pass rollout gives imagine()'s rewards when the actor always picks
    the held action and both see the same latent draws (float64)."""
    torch.manual_seed(0)
    cfg = preset("smoke")
    wm, ac = (m.double() for m in build_networks(cfg, SPEC))
    held = 2  # valid for every agent
    with torch.no_grad():
        ac.actor.net[-1].weight.zero_()
        ac.actor.net[-1].bias.fill_(-1e4)
        ac.actor.net[-1].bias[..., held] = 1e4
    n, b, L, h = SPEC.n_agents, 4, 5, 3
    g = torch.Generator().manual_seed(3)
    ctx_obs = torch.randn(n, L, SPEC.obs_dim, generator=g, dtype=torch.float64)  # one context per agent
    ctx_act = torch.randint(0, 3, (n, L), generator=g)  # (N, L)
    obs = ctx_obs.repeat_interleave(b, 0)  # (N·B, L, O): every row of agent i starts from its context
    act = ctx_act.repeat_interleave(b, 0)  # (N·B, L)
    first = torch.zeros(n * b, L, dtype=torch.bool)
    first[:, 0] = True
    noise = ImagNoise.draw(n * b, L, h, wm.K, wm.A, "cpu", torch.Generator().manual_seed(4))
    noise = ImagNoise(noise.ctx.double(), noise.latent.double(), noise.action.double())
    with torch.no_grad():
        roll = imagine(wm, ac, obs, act, first, torch.arange(n), h,
                       ImagCaches.allocate(wm, n * b, L, h, "cpu", torch.float64), noise)
    assert (roll.actions == held).all()
    for i in range(n):
        rows = slice(i * b, (i + 1) * b)
        mine = dg.imagine_held_action(wm, ctx_obs[i], ctx_act[i], i, held, h, b, noise.rows(rows))  # (B, H)
        torch.testing.assert_close(mine, roll.rewards[i], rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- env branching
def test_branched_returns_equal_straight_replays():
    cfg = EnvConfig(scenario="simple_spread")
    env = MultiAgentEnv(cfg, seed=0)
    rng = np.random.default_rng(0)
    env.reset(seed=11)
    prefix = [random_actions(rng, env.spec) for _ in range(4)]
    for a in prefix:
        env.step(a)
    state = env.get_state()
    mates = np.stack([random_actions(rng, env.spec) for _ in range(6)])  # (H, N)
    branched = dg.true_held_returns(env, state, 1, [0, 3, 4], mates)
    assert np.array_equal(branched, dg.true_held_returns(env, state, 1, [0, 3, 4], mates))
    for k, held in enumerate([0, 3, 4]):  # the same from a fresh env played straight through
        fresh = MultiAgentEnv(cfg, seed=0)
        fresh.reset(seed=11)
        for a in prefix:
            fresh.step(a)
        total = 0.0
        for step in mates:
            joint = step.copy()
            joint[1] = held
            total += float(fresh.step(joint)[1][1])
        assert branched[k] == pytest.approx(total, abs=1e-6)
    assert len(set(branched.tolist())) > 1  # holding different actions leads to different returns


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("diag") / "run"
    assert train.main(["--preset", "smoke", "--device", "cpu", "--scenario", "simple_spread", "--steps", "45",
                       "--wm.batch_size", "6", "--run-dir", str(d)]) == 0
    return d


def test_model_cli_writes_a_complete_report(run_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert dg.main(["model", str(run_dir), "--episodes", "2", "--contexts", "2", "--horizon", "3",
                    "--samples", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "simple_spread @ env step 45" in text and "effect corr" in text
    rep = json.loads(out.read_text())
    tf, ha = rep["teacher_forced"], rep["held_actions"]
    assert len(tf["recon_r2_per_feature"]) == 18
    assert tf["recon_r2_per_feature"][-1] is None  # simple_spread's silent comm slot never varies
    assert np.isfinite(tf["reward_r2"]) and 0 < tf["posterior_entropy"] <= tf["posterior_entropy_max"]
    assert ha["contexts"] == 2 * 3 and ha["horizon"] == 3
    for k in ("effect_corr", "regret_model_pick", "regret_actor_pick", "regret_uniform_pick"):
        assert np.isfinite(ha[k])
    assert 0 <= ha["regret_model_pick"] and 0 <= ha["regret_actor_pick"]


def test_reward_data_cli_is_reproducible(tmp_path, capsys):
    args = ["reward-data", "--scenario", "simple_spread", "--steps", "100", "50", "--test-episodes", "2",
            "--updates", "30", "--width", "16", "--batch", "8"]
    assert dg.main([*args, "--out", str(tmp_path / "a.json")]) == 0
    assert dg.main([*args, "--out", str(tmp_path / "b.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert a == json.loads((tmp_path / "b.json").read_text())
    assert [r["steps"] for r in a] == [50, 100] and [r["episodes"] for r in a] == [2, 4]
    assert "held-out R²" in capsys.readouterr().out


def test_wm_data_cli_trains_and_scores_reproducibly(tmp_path, capsys):
    args = ["wm-data", "--scenario", "simple_tag", "--preset", "smoke", "--steps", "60", "30",
            "--test-episodes", "2"]
    assert dg.main([*args, "--updates", "3", "--out", str(tmp_path / "a.json")]) == 0
    assert dg.main([*args, "--updates", "3", "--out", str(tmp_path / "b.json")]) == 0
    assert dg.main([*args, "--updates", "6", "--out", str(tmp_path / "c.json")]) == 0
    a, c = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "c.json"))
    assert a == json.loads((tmp_path / "b.json").read_text())
    assert [(r["steps"], r["episodes"]) for r in a] == [(50, 2), (75, 3)]  # whole 25-step episodes
    for r in a:
        assert all(np.isfinite(r[k]) for k in ("reward_r2_heldout", "reward_r2_train", "recon_r2_heldout"))
    assert a[0]["recon_r2_heldout"] != c[0]["recon_r2_heldout"]  # the updates really train the model
    assert "reward R² held-out" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["wm-data", "--scenario", "simple_tag", "--preset", "gpu", "--steps", "10"], "unknown preset 'gpu'; valid: paper, cpu, smoke"),
    (["wm-data", "--scenario", "simple_tag", "--steps", "10", "--updates", "0"], "--updates must be ≥ 1, got 0"),
    (["wm-data", "--scenario", "simple_spread", "--preset", "smoke", "--steps", "0"], "--steps must be ≥ 1, got 0"),
    (["reward-data", "--scenario", "simple_sprad", "--steps", "10"], "unknown scenario 'simple_sprad'; valid: simple_tag"),
    (["reward-data", "--scenario", "simple_spread", "--steps", "0"], "--steps must be ≥ 1, got 0"),
    (["model", "/nonexistent/run", "--contexts", "0"], "--contexts must be ≥ 1, got 0"),
    (["model", "/nonexistent/run"], "/nonexistent/run"),
])
def test_bad_arguments_are_refused_with_the_allowed_values(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        dg.main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
