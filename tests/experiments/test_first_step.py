"""bench/experiments/first_step.py: the first step of each episode acted
four ways on a trained checkpoint; its ``h0`` arm must be the protocol's own greedy evaluation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "experiments"))

import first_step  # noqa: E402

from matwm_fast import train  # noqa: E402
from matwm_fast.policy import Policy  # noqa: E402
from matwm_fast.play import evaluate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
EPISODES = 2


@pytest.fixture(scope="module")
def spread_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("first_step") / "run"
    assert train.main(["--preset", "smoke", "--scenario", "simple_spread", "--device", "cpu", "--steps", "40",
                       "--wm.batch-size", "3", "--seed", "1", "--run-dir", str(d)]) == 0
    return d


def test_h0_arm_is_the_protocols_greedy_evaluation(spread_run):
    res = first_step.measure(spread_run, first_step.ARMS, EPISODES)
    first = first_step.EVAL_SEED + 1 * EPISODES  # seed 1's matchup episodes
    assert res["episode_seeds"] == [first, first + EPISODES - 1]
    pol = Policy(spread_run)
    ref, _ = evaluate(pol.wm, pol.ac, pol.cfg.env, pol.cfg.train.act_context, EPISODES, first, "cpu")
    np.testing.assert_allclose(res["results"]["h0"]["return_mean"], ref["return_mean"], rtol=0, atol=1e-9)
    assert set(res["results"]) == set(first_step.ARMS)


def test_primed_queue_holds_the_made_up_step(spread_run, monkeypatch):
    """The primed arm's first call sees one queued step: the first observation and a no-op."""
    pol = Policy(spread_run)
    act, state = first_step.learned(pol, "primed")
    obs = np.random.default_rng(0).standard_normal((pol.spec.n_agents, pol.spec.obs_dim)).astype(np.float32)
    seen = {}
    real = first_step.policy_step

    def spy(wm, ac, past_obs, past_act, count, o, greedy=False):
        seen.update(count=int(count), obs=past_obs[:, 0].clone(), act=past_act[:, 0].clone())
        return real(wm, ac, past_obs, past_act, count, o, greedy)

    monkeypatch.setattr(first_step, "policy_step", spy)
    act(obs)
    assert seen["count"] == 1 and state["calls"] == 1
    np.testing.assert_array_equal(seen["obs"].numpy(), obs)
    assert (seen["act"] == first_step.NOOP).all()


def test_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        first_step.main([str(tmp_path)])
    assert e.value.code == 2
    assert f"{tmp_path}: not a run directory" in capsys.readouterr().err
