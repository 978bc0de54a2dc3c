"""Presets and their per-scenario tuning: what a command line resolves to."""

import pytest

from matwm_fast.cli import config_from_args
from matwm_fast.config import PRESETS, SCENARIO_TUNING, RULES, check_fields, preset, resolve
from matwm_fast.env import SCENARIOS, env_spec
from matwm_fast.train import build_parser


def from_cli(*argv: str):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_tuning_names_real_presets_scenarios_and_fields():
    for name, per_scenario in SCENARIO_TUNING.items():
        assert name in PRESETS
        for scenario, values in per_scenario.items():
            assert scenario in SCENARIOS
            assert set(values) <= set(RULES), set(values) - set(RULES)
            cfg = preset(name, scenario)
            check_fields(cfg)
            resolve(cfg, env_spec(cfg.env).n_agents)


def test_cpu_entropy_is_per_scenario():
    """Lead 1 of issue 15: η 3e-3 helped simple_spread in every seed and cost simple_tag's prey in
    every seed, so only simple_spread departs from the paper's 3e-4."""
    paper = preset("paper").ac.entropy
    assert preset("cpu", "simple_spread").ac.entropy == 3e-3 != paper
    assert preset("cpu", "simple_tag").ac.entropy == paper
    assert preset("cpu").env.scenario == "simple_tag" and preset("cpu").ac.entropy == paper
    assert preset("cpu", "simple_adversary").ac.entropy == paper  # no evidence: the paper's value
    assert preset("paper", "simple_spread").ac.entropy == paper  # the paper preset stays Table C.6
    assert preset("cpu", "simple_spread").env.scenario == "simple_spread"


@pytest.mark.parametrize("alias", ["--scenario", "--env", "--env.scenario"])
def test_command_line_gets_the_tuning_of_the_scenario_it_names(alias):
    assert from_cli("--preset", "cpu", alias, "simple_spread").ac.entropy == 3e-3
    assert from_cli("--preset", "cpu", alias, "simple_tag").ac.entropy == 3e-4
    assert from_cli("--preset", "cpu").ac.entropy == 3e-4


def test_cpu_world_model_batch_is_per_scenario():
    """issue 15: twice the world-model sequences per update helped simple_spread; it needs a warm-up
    long enough for 8 non-overlapping sequences per agent, which resolve() checks."""
    spread, tag = preset("cpu", "simple_spread"), preset("cpu", "simple_tag")
    assert (spread.wm.batch_size, spread.replay.warmup) == (24, 512)
    assert (tag.wm.batch_size, tag.replay.warmup) == (12, 500)
    assert resolve(spread, 3).wm.batch_per_agent == 8


def test_user_flags_win_over_the_tuning():
    cfg = from_cli("--preset", "cpu", "--env", "simple_spread", "--ac.entropy", "1e-3")
    assert cfg.ac.entropy == 1e-3
    assert from_cli("--preset", "cpu", "--env", "simple_tag", "--ac.entropy", "3e-3").ac.entropy == 3e-3


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown preset 'fast'.*paper"):
        preset("fast", "simple_spread")


def test_a_tuned_run_reports_no_change_from_its_preset():
    """The sweep's tables list how a run departs from its preset: the scenario's own tuning is not one."""
    from matwm_fast.tools.sweep_results import config_changes

    spread = resolve(from_cli("--preset", "cpu", "--env", "simple_spread", "--seed", "2"), 3)
    assert config_changes(spread) == []
    tag = resolve(from_cli("--preset", "cpu", "--env", "simple_tag", "--ac.entropy", "3e-3"), 4)
    assert [line for line in config_changes(tag) if "entropy" in line], config_changes(tag)
