"""The trainer's schedule within one env step (Algorithm 2), on the CPU at the smoke preset."""

from matwm_fast.config import preset, with_fields
from matwm_fast.trainer import build


def warm(**fields):
    tr = build(with_fields(preset("smoke"), fields), device="cpu", backend="eager")
    while not tr.warm:
        tr.env_step()
    return tr


def test_world_model_updates_per_env_step_each_on_a_fresh_batch(monkeypatch):
    """``train.wm_updates`` 2: two world-model updates per env step, each on a batch of its own,
    and the budget counter counts the sequences of both; one actor-critic update as always."""
    tr = warm(**{"train.wm_updates": 2})
    batches, ac_calls = [], []
    update, ac_update = tr.wm_update, tr.ac_update
    monkeypatch.setattr(tr, "wm_update", lambda b: batches.append(b) or update(b))
    monkeypatch.setattr(tr, "ac_update", lambda r: ac_calls.append(r) or ac_update(r))
    m = tr.train_step()
    assert len(batches) == 2 and len(ac_calls) == 1
    assert not (batches[0].obs.shape == batches[1].obs.shape and (batches[0].obs == batches[1].obs).all())
    rows = batches[0].agent.shape[0]  # 4 sequences per update at the smoke preset
    assert int(m["wm_sequences"]) == 2 * rows and int(m["wm_sequences_per_agent"]) == 2 * rows // tr.n
    one = warm()
    assert int(one.train_step()["wm_sequences"]) == rows  # the paper's one update
