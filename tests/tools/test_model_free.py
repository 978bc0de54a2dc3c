"""bench/baselines/model_free.py: BenchMARL's MAPPO/IPPO trained to exact env-step budgets and
scored with this project's evaluator.

The refusals (bad arguments, BenchMARL missing) always run; the end-to-end runs only where the
optional dependency is installed (``pip install -e '.[baselines]'``; CI does not install it).
They check the plumbing on a budget of 200 env steps, not that the baselines learn.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "baselines" / "model_free.py"
INSTALL = "pip install -e '.[baselines]'"
HAS_LIBRARY = all(importlib.util.find_spec(m) is not None for m in ("benchmarl", "torchrl", "tensordict"))
needs_library = pytest.mark.skipif(not HAS_LIBRARY, reason=f"BenchMARL is not installed ({INSTALL})")
TAG = ["adversary_0", "adversary_1", "adversary_2", "agent_0"]
TINY = ["--budgets", "100", "200", "--frames-per-batch", "100", "--minibatch-size", "50", "--minibatch-iters", "1",
        "--episodes", "2"]


def script(*args: str, cwd: Path, pythonpath: list[Path] = (), timeout: int = 600) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(ROOT)])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


# ----------------------------------------------------------------------------- refusals (always)
@pytest.mark.parametrize("args, says", [
    (["train", "--scenario", "simple_nope", "--algo", "mappo"], "--scenario 'simple_nope': unknown scenario; allowed: simple_tag, simple_spread"),
    (["train", "--scenario", "simple_tag", "--algo", "dqn"], "--algo 'dqn': unknown algorithm; allowed: mappo, ippo, qmix, vdn, iql"),
    (["train", "--scenario", "simple_tag", "--algo", "qmix", "--minibatch-iters", "3"],
     "--minibatch-iters 3: PPO's (mappo, ippo) only; qmix learns off-policy"),
    (["train", "--scenario", "simple_tag", "--algo", "mappo", "--gamma", "1.5"], "--gamma 1.5: a discount in (0, 1]"),
    (["train", "--scenario", "simple_tag", "--algo", "mappo", "--lr", "0"], "--lr 0.0: must be positive"),
    (["train", "--scenario", "simple_tag", "--algo", "mappo", "--configs-tried", "0"], "--configs-tried 0: at least 1"),
    (["train", "--scenario", "simple_tag", "--algo", "mappo", "--set", "gamma"], "--set 'gamma': expected FIELD=VALUE"),
    (["train", "--scenario", "simple_tag", "--algo", "mappo", "--set", "a=1", "--set", "a=2"], "--set a: given twice"),
    (["train", "--scenario", "simple_tag", "--algo", "ippo", "--budgets", "20000", "12345"],
     "--budgets 12345: each budget must be a positive multiple of --frames-per-batch 5000"),
    (["train", "--scenario", "simple_tag", "--algo", "ippo", "--budgets", "0"], "--budgets 0: each budget must be a positive"),
    (["train", "--scenario", "simple_tag", "--algo", "ippo", "--frames-per-batch", "105", "--budgets", "210"],
     "--frames-per-batch 105: must be a multiple of the 10 envs"),
    (["train", "--scenario", "simple_tag", "--algo", "ippo", "--episodes", "0"], "--episodes 0: need at least 1"),
    (["train", "--scenario", "simple_tag", "--algo", "ippo", "--seed", "-1"], "--seed -1: must be 0 or more"),
    (["train", "--scenario", "simple_tag", "--algo", "ippo", "--max-cycles", "0"], "--max-cycles 0: must be at least 1"),
    (["train", "--scenario", "simple_tag", "--algo", "ippo", "--results", str(SCRIPT)], "is a file, not a directory"),
    (["train", "--algo", "ippo"], "the following arguments are required: --scenario"),
    (["eval", "no_such_policy.pt"], "no_such_policy.pt: no such policy file"),
    (["table", "--results", "no_such_dir"], "--results no_such_dir: no such directory"),
])
def test_bad_arguments_are_refused(tmp_path, args, says):
    proc = script(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error:" in proc.stderr and says in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("args, says", [
    (["--split", "report", "--seed", "0"],
     "--split report: seed 0 not allowed (it is a tuning seed); report runs use seeds 100–199"),
    (["--seed", "100"], "--split tuning: seed 100 not allowed (it is a report seed); tuning runs use seeds 0–99"),
    (["--split", "report", "--seed", "100", "--episodes", "20"],
     "--split report: 20 episodes per seed; a report result needs at least 50"),
    (["--split", "report", "--eval-seed", "7"], "argument --eval-seed: not allowed with argument --split"),
])
def test_the_protocols_splits_are_checked(tmp_path, monkeypatch, capsys, args, says):
    """The seed must be the split's, a report has 50 episodes or more (matwm_fast/protocol.py);
    refused before anything is trained or written (in this process: the checks need no library)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import model_free

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        model_free.main(["train", "--scenario", "simple_spread", "--algo", "mappo", *args])
    assert e.value.code == 2 and f"error: {says}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_table_refuses_an_empty_results_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = script("table", "--results", "empty", cwd=tmp_path)
    assert proc.returncode == 2 and "error: --results empty: no <scenario>/<algo>/seed<s>_step<budget>.json" in proc.stderr


def test_missing_library_names_the_extra(tmp_path):
    """Whether or not BenchMARL is installed here: a package of that name that fails to import
    stands in for a missing one."""
    fake = tmp_path / "fake" / "benchmarl"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named benchmarl (simulated)')\n")
    for args in (["train", "--scenario", "simple_spread", "--algo", "mappo", "--results", "res", "--run-dir", "run"],
                 ["eval", str(fake / "__init__.py")]):
        proc = script(*args, cwd=tmp_path, pythonpath=[tmp_path / "fake"])
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "error: the model-free baselines need BenchMARL" in proc.stderr and INSTALL in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "res").exists() and not (tmp_path / "run").exists()


def test_the_script_imports_no_library_before_it_is_needed():
    """``table`` and the argument checks work without BenchMARL: the module imports it lazily."""
    code = ("import sys; sys.path.insert(0, %r); import model_free; "
            "assert not any(m.split('.')[0] in ('benchmarl', 'torchrl', 'tensordict') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith(('benchmarl', 'torchrl', 'tensordict')))"
            % str(SCRIPT.parent))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@needs_library
@pytest.mark.parametrize("args, says", [
    (["--set", "nope=1"], "--set nope: not a field of BenchMARL's experiment config; allowed: adam_eps,"),
    (["--set", "algorithm.nope=1"], "--set algorithm.nope: not a field of qmix's algorithm config; allowed: "
                                    "algorithm.delay_value, algorithm.loss_function, algorithm.mixing_embed_dim"),
    (["--set", "gamma=0.5"], "--set gamma: has its own flag, --gamma"),
    (["--set", "off_policy_frames_per_batch=1"], "--set off_policy_frames_per_batch: not a field"),
    (["--set", "off_policy_n_optimizer_steps=abc"], "'abc' is not an integer (BenchMARL's default: 1000)"),
    (["--set", "algorithm.delay_value=maybe"], "'maybe' is not a boolean; allowed: true, false"),
])
def test_bad_settings_are_refused_before_training(tmp_path, args, says):
    """--set is checked against BenchMARL's own config fields and their types (so it needs it)."""
    proc = script("train", "--scenario", "simple_tag", "--algo", "qmix", "--results", "res", "--run-dir", "run",
                  *args, cwd=tmp_path)
    assert proc.returncode == 2 and "error: " in proc.stderr and says in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- end to end (library)
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """MAPPO on simple_tag (two teams), 200 env steps in 2 batches of 100, evaluated on 2 episodes."""
    d = tmp_path_factory.mktemp("model_free")
    proc = script("train", "--scenario", "simple_tag", "--algo", "mappo", "--seed", "1", *TINY,
                  "--results", "res", "--run-dir", "run", cwd=d)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return d, proc


@needs_library
def test_tiny_run_writes_policies_and_evaluations(tiny_run):
    d, proc = tiny_run
    for budget in (100, 200):
        assert (d / "run" / f"policy_step{budget}.pt").is_file()
        res = json.loads((d / "res" / "simple_tag" / "mappo" / f"seed1_step{budget}.json").read_text())
        assert res["algorithm"] == "mappo" and res["scenario"] == "simple_tag" and res["seed"] == 1
        assert res["budget"] == res["env_steps"] == budget and res["iterations"] == budget // 100
        assert res["batches"] == [100, 100]  # every joint transition counted, training stopped at the budget
        assert res["library"]["benchmarl"] and res["library"]["torchrl"] and res["max_cycles"] == 25
        assert res["group_map"] == {"adversary": TAG[:3], "agent": TAG[3:]}
        # the sweep's matchup episodes of seed 1: 20,000 + 1·2, two episodes
        assert res["evaluation"]["episodes"] == 2 and res["evaluation"]["seed"] == 20_002
        assert res["evaluation"]["split"] == "tuning"
        assert set(res["results"]) == {"greedy", "sampled", "random", "adversary_vs_random", "agent_vs_random"}
        for name, r in res["results"].items():
            returns = np.array(r["returns"])  # (E, N)
            assert returns.shape == (2, 4), name
            assert list(r["agents"]) == TAG and r["teams"]["adversary"]["members"] == TAG[:3]
            for i, a in enumerate(TAG):
                assert r["agents"][a]["mean"] == pytest.approx(returns[:, i].mean(), abs=1e-5)
            assert r["teams"]["adversary"]["mean"] == pytest.approx(returns[:, :3].mean(), abs=1e-5)
            assert r["all"]["mean"] == pytest.approx(returns.mean(), abs=1e-5)
            assert r["summary"]["episodes"] == 2
        assert f"wrote res/simple_tag/mappo/seed1_step{budget}.json" in proc.stdout


@needs_library
def test_evaluation_is_this_projects_protocol(tiny_run):
    """The random matchup is exactly play's random policy on those episodes; the other matchups
    are play with the policy as an action function: the same episodes, so paired."""
    from matwm_fast.config import EnvConfig
    from matwm_fast.play import play

    d, _ = tiny_run
    res = json.loads((d / "res" / "simple_tag" / "mappo" / "seed1_step200.json").read_text())
    returns, _, _ = play(None, None, EnvConfig(scenario="simple_tag"), 1, 2, 20_002, "cpu", random_policy=True)
    np.testing.assert_allclose(np.array(res["results"]["random"]["returns"]), returns, atol=1e-5)


@needs_library
def test_saved_policy_reloads_and_greedy_is_argmax(tiny_run):
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    import benchmarl_mpe2 as bm
    from matwm_fast.config import EnvConfig
    from matwm_fast.env import MultiAgentEnv

    d, _ = tiny_run
    # eval: the same numbers from the saved file
    proc = script("eval", "run/policy_step200.pt", "--episodes", "2", "--out", "again.json", cwd=d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((d / "again.json").read_text())
    first = json.loads((d / "res" / "simple_tag" / "mappo" / "seed1_step200.json").read_text())
    for name in first["results"]:
        assert again["results"][name]["returns"] == first["results"][name]["returns"], name
    # greedy = argmax of the policy's logits; observations as MultiAgentEnv pads them
    saved = torch.load(d / "run" / "policy_step200.pt", weights_only=True)
    exp = bm.build("simple_tag_v3", "simple_tag", 25, {}, "mappo", 1, saved["build"], str(d), 100)
    exp.policy.load_state_dict(saved["policy"])
    env = MultiAgentEnv(EnvConfig(scenario="simple_tag"))
    spec = env.spec
    act = bm.action_function(exp.policy, exp.group_map, spec.agents, spec.obs_sizes, greedy=True)
    obs = env.reset(seed=3)
    from tensordict import TensorDict

    td = TensorDict({"adversary": TensorDict({"observation": torch.as_tensor(obs[:3])}, batch_size=[3]),
                     "agent": TensorDict({"observation": torch.as_tensor(obs[3:, :14])}, batch_size=[1])},
                    batch_size=[])
    with torch.no_grad():
        td = exp.policy(td)
    logits = torch.cat([td["adversary", "logits"], td["agent", "logits"]])  # (4, 5)
    assert act(obs).tolist() == logits.argmax(-1).tolist()
    exp.close()


@needs_library
def test_ippo_on_simple_spread_and_the_table(tmp_path):
    proc = script("train", "--scenario", "simple_spread", "--algo", "ippo", "--seed", "0", *TINY,
                  "--results", "res", "--run-dir", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "res" / "simple_spread" / "ippo" / "seed0_step200.json").read_text())
    assert set(res["results"]) == {"greedy", "sampled", "random"}  # one team: no <team>_vs_random
    assert np.array(res["results"]["sampled"]["returns"]).shape == (2, 3)
    assert res["evaluation"]["seed"] == 20_000
    proc = script("table", "--results", "res", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "res" / "results.md").read_text()
    assert "## simple_spread" in md and "| 200 | IPPO | 1 |" in md
    agg = json.loads((tmp_path / "res" / "results.json").read_text())
    assert agg["simple_spread/200/ippo"]["all_greedy"] == [res["results"]["greedy"]["all"]["mean"]]


@needs_library
def test_an_off_policy_learner_with_settings(tmp_path):
    """QMIX on simple_tag with --gamma and --set (an experiment and an algorithm field): the settings
    reach BenchMARL, are recorded, and greedy is the argmax of the action values (no ε)."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    import benchmarl_mpe2 as bm
    from tensordict import TensorDict

    from matwm_fast.config import EnvConfig
    from matwm_fast.env import MultiAgentEnv

    proc = script("train", "--scenario", "simple_tag", "--algo", "qmix", "--seed", "2", "--budgets", "100", "200",
                  "--frames-per-batch", "100", "--gamma", "0.9", "--set", "off_policy_n_optimizer_steps=3",
                  "--set", "algorithm.mixing_embed_dim=8", "--configs-tried", "7", "--episodes", "2",
                  "--results", "res", "--run-dir", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "res" / "simple_tag" / "qmix" / "seed2_step200.json").read_text())
    assert res["configs_tried"] == 7 and res["batches"] == [100, 100]
    assert res["settings"]["tuned"] == {"off_policy_collected_frames_per_batch": 100, "gamma": 0.9,
                                        "off_policy_n_optimizer_steps": 3, "algorithm.mixing_embed_dim": 8}
    saved = torch.load(tmp_path / "run" / "policy_step200.pt", weights_only=True)
    exp = bm.build("simple_tag_v3", "simple_tag", 25, {}, "qmix", 2, saved["build"], str(tmp_path), 100)
    assert exp.config.gamma == 0.9 and exp.config.off_policy_n_optimizer_steps == 3
    assert exp.algorithm_config.mixing_embed_dim == 8
    exp.policy.load_state_dict(saved["policy"])
    spec = MultiAgentEnv(EnvConfig(scenario="simple_tag")).spec
    act = bm.action_function(exp.policy, exp.group_map, spec.agents, spec.obs_sizes, greedy=True)
    env = MultiAgentEnv(EnvConfig(scenario="simple_tag"))
    obs = env.reset(seed=5)
    td = TensorDict({"adversary": TensorDict({"observation": torch.as_tensor(obs[:3])}, batch_size=[3]),
                     "agent": TensorDict({"observation": torch.as_tensor(obs[3:, :14])}, batch_size=[1])},
                    batch_size=[])
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        td = exp.policy(td)
    values = torch.cat([td["adversary", "action_value"], td["agent", "action_value"]])  # (4, 5)
    for _ in range(3):  # the ε-greedy layer is off: the same argmax every time
        assert act(obs).tolist() == values.argmax(-1).tolist()
    exp.close()
