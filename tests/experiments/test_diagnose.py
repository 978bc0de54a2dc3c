"""``python bench/experiments/diagnose.py``: the CLI runs end to end, and its ``model`` report is what a
training run's evaluation logs as ``eval_wm_*``.  The scores, the imagination and the env branching
it reports are matwm_fast/wm_probe.py's, tested in tests/test_wm_probe.py."""

from __future__ import annotations

import json

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "experiments"))
import diagnose as dg  # noqa: E402
from matwm_fast import train, wm_probe
from matwm_fast.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("diag") / "run"
    assert train.main(["--preset", "smoke", "--device", "cpu", "--scenario", "simple_spread", "--steps", "45",
                       "--wm.batch_size", "6", "--eval-every", "45", "--eval-episodes", "1", "--run-dir", str(d)]) == 0
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


def test_model_report_is_what_training_logs(run_dir, tmp_path):
    """The evaluation at step 45 scored the model of the step-45 checkpoint: `diagnose model` with
    the probe's seed and sizes and the run's horizon reports the same numbers."""
    (row,) = [r for r in read_metrics(run_dir) if "eval_wm_reward_r2" in r]
    assert row["env_step"] == 45
    out = tmp_path / "report.json"
    assert dg.main(["model", str(run_dir), "--seed", str(wm_probe.HELD_OUT_SEED), "--horizon", "3",
                    "--episodes", str(wm_probe.EPISODES), "--contexts", str(wm_probe.CONTEXTS),
                    "--samples", str(wm_probe.SAMPLES), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["env_step"] == 45
    assert row["eval_wm_reward_r2"] == rep["teacher_forced"]["reward_r2"]
    assert row["eval_wm_effect_corr"] == rep["held_actions"]["effect_corr"]
    assert all(isinstance(row[f"eval_agent_{i}_wm_reward_r2"], float) for i in range(3))


def test_model_probe_reads_the_reward_from_the_states(run_dir, tmp_path):
    """--probe adds MLPs from h_t and (z_t, a_t) beside the reward head, and changes nothing else."""
    argv = ["model", str(run_dir), "--episodes", "2", "--contexts", "2", "--horizon", "3", "--samples", "2"]
    assert dg.main([*argv, "--out", str(tmp_path / "a.json")]) == 0
    assert dg.main([*argv, "--probe", "3", "--out", str(tmp_path / "b.json")]) == 0
    plain, probed = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    sp = probed.pop("state_probe")
    assert probed == plain
    assert sp["episodes"] == 3 and sp["fit_steps"] == 3 * 25 * 3 and sp["test_steps"] == 2 * 25 * 3
    assert all(np.isfinite(sp[k]["r2_heldout"]) for k in ("h", "z", "head"))
    assert "end_pred" not in sp["head"]  # simple_spread's episodes never end early


def test_model_features_keep_the_steps_that_happened(run_dir):
    """Padded episodes: a row per step that happened, the same features as the unpadded episode's
    (causal attention keeps the padding out), and the step that ended an episode marked."""
    from matwm_fast.policy import Policy
    from matwm_fast.probe_episodes import random_episodes

    pol = Policy(str(run_dir), "cpu")
    wm = pol.wm
    data = random_episodes(pol.cfg.env, 2, 7)  # (E=2, T=25, N=3)
    cut = {k: v.copy() for k, v in data.items()}
    cut["valid"][1, 10:] = False  # episode 1 "ended" after 10 steps
    cut["ended"][1] = True
    full, part = ((torch.manual_seed(0), dg.model_features(wm, d))[1] for d in (data, cut))  # the same draws
    keep = np.ones((2, 3, 25), bool)  # (E, N, T) rows in the features' order
    keep[1, :, 10:] = False
    keep = keep.reshape(-1)
    assert part["h"].shape[0] == keep.sum() == 25 * 3 + 10 * 3
    for k in ("h", "z", "r"):
        np.testing.assert_allclose(part[k].numpy(), full[k].numpy()[keep], rtol=1e-5, atol=1e-5)
    ends = np.zeros((2, 3, 25), bool)
    ends[1, :, 9] = True
    np.testing.assert_array_equal(part["end"].numpy(), ends.reshape(-1)[keep])
    torch.manual_seed(0)
    end = wm_probe.teacher_forced(wm, cut)["end"]  # the step that ended episode 1, every agent's
    assert end["steps"] == 3 and end["reward_true"] == pytest.approx(float(cut["rew"][1, 9].mean()))
    assert "end" not in wm_probe.teacher_forced(wm, data)  # no episode ended early


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


def test_wm_data_eval_every_scores_midway_without_changing_the_training(tmp_path):
    """--eval-every 3 of 6 updates: a row after 3 and one after 6, each equal to a run stopped there."""
    args = ["wm-data", "--scenario", "simple_tag", "--preset", "smoke", "--steps", "50", "--test-episodes", "2"]
    assert dg.main([*args, "--updates", "6", "--eval-every", "3", "--out", str(tmp_path / "k.json")]) == 0
    for n in (3, 6):
        assert dg.main([*args, "--updates", str(n), "--out", str(tmp_path / f"{n}.json")]) == 0
    rows = json.loads((tmp_path / "k.json").read_text())
    assert [r["updates"] for r in rows] == [3, 6]
    assert rows[0] == json.loads((tmp_path / "3.json").read_text())[0]
    assert rows[1] == json.loads((tmp_path / "6.json").read_text())[0]


def test_wm_data_set_changes_the_fitted_config(tmp_path):
    """--set trains another world model (here: finer reward bins) and is written beside its rows."""
    args = ["wm-data", "--scenario", "simple_tag", "--preset", "smoke", "--steps", "50", "--test-episodes", "2",
            "--updates", "3"]
    assert dg.main([*args, "--out", str(tmp_path / "a.json")]) == 0
    assert dg.main([*args, "--set", "wm.bins_low=-3", "--set", "wm.bins_high=3", "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text())[0] for f in ("a.json", "b.json"))
    assert a["set"] == [] and b["set"] == ["wm.bins_low=-3", "wm.bins_high=3"]
    assert a["reward_r2_heldout"] != b["reward_r2_heldout"]


def test_wm_data_probe_fits_mlps_on_the_models_features(tmp_path):
    """--probe adds held-out and training R² of MLPs on z_t, on z_t decoded (each with a_t) and on h_t."""
    assert dg.main(["wm-data", "--scenario", "simple_spread", "--preset", "smoke", "--steps", "50",
                    "--test-episodes", "2", "--updates", "2", "--probe", "--out", str(tmp_path / "p.json")]) == 0
    row = json.loads((tmp_path / "p.json").read_text())[0]
    keys = [f"probe_{f}_r2_{s}" for f in ("z", "xhat", "h") for s in ("train", "heldout")]
    assert all(np.isfinite(row[k]) for k in keys) and row["probe_z_r2_train"] != row["probe_h_r2_train"]


def test_reward_data_on_the_world_models_information(tmp_path):
    """--inputs now: o_t and a one-hot a_t (observation width + action count features)."""
    args = ["reward-data", "--scenario", "simple_spread", "--steps", "50", "--test-episodes", "2",
            "--updates", "5", "--width", "8", "--batch", "8"]
    assert dg.main([*args, "--out", str(tmp_path / "next.json")]) == 0
    assert dg.main([*args, "--inputs", "now", "--out", str(tmp_path / "now.json")]) == 0
    nxt, now = (json.loads((tmp_path / f"{k}.json").read_text())[0] for k in ("next", "now"))
    assert (nxt["inputs"], now["inputs"]) == ("next", "now") and nxt["r2_heldout"] != now["r2_heldout"]


@pytest.mark.parametrize("argv, needle", [
    (["wm-data", "--scenario", "simple_tag", "--steps", "10", "--set", "wm.bins=3"], "--set wm.bins=3: need SECTION.FIELD=VALUE"),
    (["wm-data", "--scenario", "simple_tag", "--steps", "10", "--set", "wm.lr=-1"], "--wm.lr -1"),
    (["wm-data", "--scenario", "simple_tag", "--preset", "gpu", "--steps", "10"], "unknown preset 'gpu'; valid: paper, cpu, smoke"),
    (["wm-data", "--scenario", "simple_tag", "--steps", "10", "--updates", "0"], "--updates must be ≥ 1, got 0"),
    (["wm-data", "--scenario", "simple_tag", "--steps", "10", "--eval-every", "-1"], "--eval-every must be ≥ 0"),
    (["wm-data", "--scenario", "simple_spread", "--preset", "smoke", "--steps", "0"], "--steps must be ≥ 1, got 0"),
    (["reward-data", "--scenario", "simple_sprad", "--steps", "10"], "unknown scenario 'simple_sprad'; valid: simple_tag"),
    (["reward-data", "--scenario", "simple_spread", "--steps", "0"], "--steps must be ≥ 1, got 0"),
    (["model", "/nonexistent/run", "--contexts", "0"], "--contexts must be ≥ 1, got 0"),
    (["model", "/nonexistent/run", "--probe", "-1"], "--probe must be ≥ 0 episodes (0 = no probe), got -1"),
    (["model", "/nonexistent/run"], "/nonexistent/run"),
])
def test_bad_arguments_are_refused_with_the_allowed_values(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        dg.main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
