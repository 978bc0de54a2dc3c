"""``build_networks`` builds what the trainer trains, and ``Policy`` loads it back from a
checkpoint: the same config, step and weights, in eval mode; weights that do not fit are refused."""

from __future__ import annotations

import pytest
import torch

from matwm_fast import checkpoint as ck
from matwm_fast.config import preset
from matwm_fast.policy import Policy, build_networks
from matwm_fast.trainer import build, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(v, sb[k]) for k, v in sa.items())


@pytest.fixture(scope="module")
def trained():
    tr = build(preset("smoke"), device="cpu")
    while tr.step < 45:  # past warm-up (40): the weights have been updated
        tr.train_step()
    return tr


def test_build_networks_are_the_trainers_from_the_same_seed():
    tr = build(preset("smoke"), device="cpu")
    seed_everything(tr.cfg.train.seed)
    wm, ac = build_networks(tr.cfg, tr.spec, "ref", "cpu")
    assert same_weights(wm, tr.wm) and same_weights(ac, tr.ac)
    assert not wm.training and not tr.wm.training  # imagination and acting never drop


def test_policy_loads_the_trained_networks(trained, tmp_path):
    path = ck.CheckpointDir(tmp_path).write(trained.step, {"trainer": trained.state_dict(), "extra": {}})
    pol = Policy(tmp_path)  # a run directory: its latest checkpoint
    assert pol.path == path and pol.step == 45 and pol.cfg == trained.cfg and pol.spec == trained.spec
    assert same_weights(pol.wm, trained.wm) and same_weights(pol.ac, trained.ac)
    assert not pol.wm.training


def test_policy_refuses_weights_its_config_does_not_build(trained, tmp_path):
    sd = trained.state_dict()
    sd["config"]["wm"]["width"] = 64  # the saved weights are of width 32
    path = ck.CheckpointDir(tmp_path).write(trained.step, {"trainer": sd, "extra": {}})
    with pytest.raises(ck.CheckpointError, match=f"{path} does not fit the model built from its config"):
        Policy(path)
