"""PettingZoo Butterfly behind the env interface: uint8 frames (N, 3, 64, 64), dead agents as
masks (KAZ), exact restore by replaying the episode, scenario arguments refused naming the value,
and the uint8 data path (replay, context queues, staged inputs, checkpoints)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("pettingzoo.butterfly.cooperative_pong_v6", reason="needs pip install 'matwm_fast[butterfly]'")
pytest.importorskip("pymunk", reason="needs pip install 'matwm_fast[butterfly]'")

from matwm_fast import butterfly as bf  # noqa: E402
from matwm_fast import checkpoint as ck  # noqa: E402
from matwm_fast import train  # noqa: E402
from matwm_fast.acting import ContextQueues  # noqa: E402
from matwm_fast.config import SCENARIO_DEFAULTS, EnvConfig, preset  # noqa: E402
from matwm_fast.env import SCENARIOS, EnvSpec, MultiAgentEnv, env_spec, parse_kwargs, random_actions  # noqa: E402
from matwm_fast.replay import ReplayBuffer  # noqa: E402
from matwm_fast.trainer import StepInputs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

# small games: few pistons, short episodes
SMALL = {
    "cooperative_pong": EnvConfig("cooperative_pong", max_cycles=40),
    "pistonball": EnvConfig("pistonball", max_cycles=20, kwargs=(("n_pistons", 3),)),
    "knights_archers_zombies": EnvConfig("knights_archers_zombies", max_cycles=40, kwargs=(("max_zombies", 3),)),
}


@pytest.mark.parametrize("scenario", list(bf.SCENARIOS))
def test_frames_step_and_reset(scenario):
    env = MultiAgentEnv(SMALL[scenario], seed=0)
    assert isinstance(env, bf.ButterflyEnv)
    s = env.spec
    assert s.obs_shape == (3, 64, 64) and s.obs_dtype == "uint8" and s.is_image
    assert s.n_agents == {"cooperative_pong": 2, "pistonball": 3, "knights_archers_zombies": 4}[scenario]
    assert s.action_counts == ((6,) * 4 if scenario == "knights_archers_zombies" else (3,) * s.n_agents)
    obs = env.reset(seed=1)
    assert obs.shape == (s.n_agents, 3, 64, 64) and obs.dtype == np.uint8
    assert (obs.reshape(s.n_agents, -1).max(1) > 0).all()  # the games are drawn (not PettingZoo's blank frames)
    rng = np.random.default_rng(0)
    steps, done = 0, False
    while not done:
        obs, rew, cont, done = env.step(random_actions(rng, s))
        steps += 1
        assert obs.shape == (s.n_agents, 3, 64, 64) and obs.dtype == np.uint8
        assert rew.shape == cont.shape == (s.n_agents,) and rew.dtype == cont.dtype == np.float32
        assert set(np.unique(cont)) <= {0.0, 1.0}
    assert steps <= SMALL[scenario].max_cycles
    with pytest.raises(RuntimeError, match="reset"):
        env.step(random_actions(rng, s))
    game = env.render()
    assert game.ndim == 3 and game.shape[2] == 3 and game.dtype == np.uint8
    env.close()


def state_trip(state: dict) -> dict:
    """Through a checkpoint's codec: plain data only (no pickle), exactly as resume reads it."""
    return ck.loads(ck.dumps({"trainer": {"env": state}}))["trainer"]["env"]


@pytest.mark.parametrize("scenario", list(bf.SCENARIOS))
def test_restored_env_continues_exactly(scenario):
    """A fresh env (another seed) given the state replays the episode and then yields the same
    frames, rewards and flags as the original, across the next episode's start too."""
    cfg = SMALL[scenario]
    a = MultiAgentEnv(cfg, seed=0)
    rng = np.random.default_rng(1)
    for _ in range(7):
        if a.step(random_actions(rng, a.spec))[3]:
            a.reset()
    st = state_trip(a.get_state())
    assert st["actions"].dtype == torch.int64 and st["obs"].dtype == torch.uint8
    acts = [random_actions(rng, a.spec) for _ in range(50)]

    def play(env):
        out = []
        for act in acts:
            o, r, c, d = env.step(act)
            out.append((o.copy(), r, c, d))
            if d:
                out.append((env.reset(),))  # a new episode: its seed from the restored generator
        return out

    first = play(a)
    b = MultiAgentEnv(cfg, seed=123)
    b.set_state(st)
    second = play(b)
    assert len(first) == len(second) and any(len(x) == 1 for x in first)  # an episode ended on the way
    for x, y in zip(first, second):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)


def test_restore_refuses_a_state_that_does_not_fit():
    a = MultiAgentEnv(SMALL["pistonball"], seed=0)
    st = a.get_state()
    other = MultiAgentEnv(EnvConfig("pistonball", max_cycles=20, kwargs=(("n_pistons", 4),)), seed=0)
    with pytest.raises(ValueError, match="3 agents|4 agents"):
        other.set_state(st)
    with pytest.raises(ValueError, match="malformed"):
        a.set_state({"world": {}})  # an MPE2 state
    a.step(np.array([2, 2, 2]))
    moved = a.get_state()
    with pytest.raises(ValueError, match="does not replay to its saved frames"):  # frames the replay never reaches
        MultiAgentEnv(SMALL["pistonball"], seed=0).set_state(dict(moved, obs=torch.zeros_like(moved["obs"])))


def test_dead_knights_and_archers_are_masked_rows():
    """KAZ with line_death: archer_0 walks off the bottom and dies.  Its row stays (N = 4), its
    frame is zero and its continuation flag 0 from that step on, its reward 0 and its actions are
    ignored; the others play on with flag 1.  A restore mid-episode keeps the dead dead."""
    cfg = EnvConfig("knights_archers_zombies", max_cycles=30, kwargs=(("line_death", True), ("spawn_delay", 1000)))
    env = MultiAgentEnv(cfg, seed=0)
    assert env.spec.agents == ("archer_0", "archer_1", "knight_0", "knight_1")
    died = None
    for t in range(25):
        act = np.array([1 if died is None else 4, 5, 5, 5])  # archer_0: backwards until dead, then "attack" (ignored)
        obs, rew, cont, done = env.step(act)
        assert obs.shape == (4, 3, 64, 64)
        if died is None and cont[0] == 0:
            died = t
            st = env.get_state()
        if died is not None:
            assert cont.tolist() == [0.0, 1.0, 1.0, 1.0] and not env.alive[0] and env.alive[1:].all()
            assert (obs[0] == 0).all() and (obs[1:].reshape(3, -1).max(1) > 0).all() and rew[0] == 0
        assert not done
    assert died is not None and died < 10
    again = MultiAgentEnv(cfg, seed=9)
    again.set_state(state_trip(st))
    assert again.alive.tolist() == [False, True, True, True]
    np.testing.assert_array_equal(again.step(np.array([0, 5, 5, 5]))[2], [0, 1, 1, 1])


# --------------------------------------------------------------------------- scenario arguments
@pytest.mark.parametrize("args,message", [
    (["--scenario", "pistonball", "--scenario-arg", "n_pistons=1"],
     "--scenario-arg n_pistons=1: pistonball's n_pistons must be an integer ≥ 2 (default 20)"),
    (["--scenario", "pistonball", "--scenario-arg", "n_piston=4"],
     "--scenario-arg n_piston=4: pistonball has no parameter 'n_piston'; valid: n_pistons, time_penalty"),
    (["--scenario", "pistonball", "--scenario-arg", "continuous=True"],
     "pistonball's continuous is not settable here: MATWM's actors are discrete"),
    (["--scenario", "cooperative_pong", "--scenario-arg", "cake_paddle=3"],
     "--scenario-arg cake_paddle=3: cooperative_pong's cake_paddle must be True or False (default True)"),
    (["--scenario", "cooperative_pong", "--scenario-arg", "ball_speed=nan"],
     "cooperative_pong's ball_speed must be a finite number > 0 (default 9)"),
    (["--scenario", "knights_archers_zombies", "--scenario-arg", "obs_method='vector'"],
     "KAZ runs with obs_method='image'"),
    (["--scenario", "knights_archers_zombies", "--scenario-arg", "num_archers=0", "--scenario-arg", "num_knights=0"],
     "knights_archers_zombies needs at least one agent"),
    (["--scenario", "knights_archers_zombies", "--scenario-arg", "max_cycles=10"],
     "the episode length is --max-cycles"),
    (["--scenario", "cooperative_pongg"], "unknown scenario; valid scenarios: simple_tag"),
])
def test_bad_scenario_arguments_exit_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "smoke", "--device", "cpu", *args, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_unknown_scenario_lists_the_butterfly_games_too(capsys):
    with pytest.raises(ValueError, match="simple_world_comm, cooperative_pong, pistonball, knights_archers_zombies"):
        parse_kwargs("pong", ["x=1"])


def test_scenario_arguments_reach_the_game():
    cfg = EnvConfig("knights_archers_zombies", max_cycles=5,
                    kwargs=parse_kwargs("knights_archers_zombies", ["num_archers=1", "num_knights=2"]))
    assert env_spec(cfg).agents == ("archer_0", "knight_0", "knight_1")
    assert parse_kwargs("cooperative_pong", ["ball_speed=7.5"]) == (("ball_speed", 7.5),)


def test_presets_take_each_games_own_episode_length():
    """SCENARIO_DEFAULTS hold PettingZoo's defaults; a --max-cycles flag still wins; MPE2 unchanged."""
    for scenario, values in SCENARIO_DEFAULTS.items():
        default = bf._signature_defaults(scenario)["max_cycles"]
        assert values["env.max_cycles"] == default
        for name in ("paper", "cpu", "smoke"):
            assert preset(name, scenario).env.max_cycles == default
    assert preset("smoke", "simple_tag").env.max_cycles == 25
    from matwm_fast.cli import config_from

    assert config_from("smoke", {"env.scenario": "pistonball", "env.max_cycles": 50}).env.max_cycles == 50
    assert set(SCENARIOS).isdisjoint(bf.SCENARIOS)


def test_every_preset_gives_each_piston_a_world_model_sequence():
    """Pistonball's default 20 pistons outnumber every preset's batch: the presets take 20, one each
    (what resolve writes back); a smaller --wm.batch-size is refused naming both numbers."""
    from matwm_fast.cli import config_from
    from matwm_fast.config import resolve

    pistons = bf._signature_defaults("pistonball")["n_pistons"]
    for name in ("paper", "cpu", "smoke"):
        assert preset(name, "simple_tag").wm.batch_size < pistons
        cfg = resolve(preset(name, "pistonball"), pistons)
        assert (cfg.wm.batch_size, cfg.wm.batch_per_agent) == (pistons, 1)
    with pytest.raises(ValueError, match="wm.batch_size=16 is below the 20 agents of pistonball"):
        resolve(config_from("paper", {"env.scenario": "pistonball", "wm.batch_size": 16}), pistons)


# --------------------------------------------------------------------------- the uint8 data path
def test_vector_specs_are_unchanged():
    s = EnvSpec(agents=("a_0", "a_1"), obs_sizes=(3, 5), action_counts=(2, 2))
    assert s.obs_shape == (5,) and s.obs_dtype == "float32" and not s.is_image and s.obs_dim == 5
    with pytest.raises(ValueError, match="obs_shape"):
        EnvSpec(agents=("a_0",), obs_sizes=(12,), action_counts=(2,), obs_shape=(3, 2, 2), obs_dtype="float32")


def test_replay_queues_and_staged_inputs_hold_uint8_frames():
    n, shape = 2, (3, 8, 6)
    rb = ReplayBuffer(n, shape, 40, seed=0, obs_dtype="uint8")
    assert rb.obs.dtype == torch.uint8 and rb.obs.shape == (n, 40, *shape)
    g = np.random.default_rng(0)
    frames = [g.integers(0, 256, (n, *shape), dtype=np.uint8) for _ in range(30)]
    for t, f in enumerate(frames):
        rb.add(f, np.array([t % 3, 1]), np.ones(n), np.ones(n), first=t == 0)
    with pytest.raises(TypeError, match="uint8"):
        rb.add(frames[0].astype(np.float32), np.zeros(n), np.ones(n), np.ones(n), first=False)
    b = rb.gather(torch.tensor([0, 1]), torch.tensor([3, 10]), 5)
    assert b.obs.dtype == torch.uint8 and b.obs.shape == (2, 5, *shape)
    np.testing.assert_array_equal(b.obs[1, 0].numpy(), frames[10][1])
    # a checkpoint keeps them uint8 (safetensors U8), and they come back bit for bit
    sd = ck.loads(ck.dumps({"trainer": {"replay": rb.state_dict()}}))["trainer"]["replay"]
    assert sd["obs"].dtype == torch.uint8
    back = ReplayBuffer(n, shape, 40, seed=5, obs_dtype=torch.uint8)
    back.load_state_dict(sd)
    assert torch.equal(back.obs, rb.obs) and back.pos == rb.pos
    with pytest.raises(ValueError, match="float32 observations"):
        back.load_state_dict(ReplayBuffer(n, shape, 40).state_dict())
    q = ContextQueues(n, shape, 4, "cpu", obs_dtype="uint8")
    for f in frames[:6]:
        q.push(torch.from_numpy(f), torch.zeros(n, dtype=torch.long))
    assert q.obs.dtype == torch.uint8 and torch.equal(q.view()[0][:, -1], torch.from_numpy(frames[5]))
    inp = StepInputs.allocate(rb, shape, 1, 1, torch.device("cpu"))
    staged = inp.obs.put(frames[0])
    assert staged.dtype == torch.uint8 and staged.shape == (n, *shape) and torch.equal(staged, torch.from_numpy(frames[0]))


def test_resize_is_area_averaging():
    """OpenCV's INTER_AREA (STORM's resize): each source pixel weighs its overlap with the output
    pixel — 5 → 2 pixels: (a + b + c/2) / 2.5 and (c/2 + d + e) / 2.5; a whole factor is a block mean."""
    row = np.array([10, 20, 30, 40, 250], np.uint8)
    frame = np.broadcast_to(row[None, :, None], (4, 5, 3)).copy()  # (H, W, 3)
    out = bf.resize(frame, (2, 2))
    assert out.shape == (3, 2, 2) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 0], np.rint((10 + 20 + 15) / 2.5))
    np.testing.assert_array_equal(out[:, :, 1], np.rint((15 + 40 + 250) / 2.5))
    big = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    block = big.reshape(64, 8, 64, 8, 3).astype(np.float64).mean((1, 3)).transpose(2, 0, 1)
    np.testing.assert_array_equal(bf.resize(big), np.rint(block))
    turned = np.swapaxes(big.copy(), 0, 1)  # PettingZoo's layout: a transposed view
    np.testing.assert_array_equal(bf.resize(turned), bf.resize(np.ascontiguousarray(turned)))


def test_resize_matches_opencv_inter_area():
    """Against OpenCV itself where it is installed (it is not a dependency): real frames of each game."""
    cv2 = pytest.importorskip("cv2")
    for scenario, cfg in SMALL.items():
        env = MultiAgentEnv(cfg, seed=0)
        rng = np.random.default_rng(0)
        for _ in range(5):
            obs, *_ = env.env.step({a: int(rng.integers(3)) for a in env.env.agents})
            for o in obs.values():
                want = cv2.resize(np.ascontiguousarray(o), (64, 64), interpolation=cv2.INTER_AREA)
                np.testing.assert_array_equal(bf.resize(o), want.transpose(2, 0, 1), err_msg=scenario)
            if not env.env.agents:
                break


def test_replay_memory_at_the_papers_capacity():
    """The figure docs/training.md quotes: 50,000 frames × 12,288 bytes per agent."""
    assert int(np.prod(bf.FRAME)) * 50_000 == 614_400_000


def test_video_frame_shows_the_game_beside_what_the_agents_see():
    env = MultiAgentEnv(SMALL["knights_archers_zombies"], seed=0)
    frame = env.view()
    assert frame.dtype == np.uint8 and frame.shape[0] == 2 * 128 + 4 and frame.shape[2] == 3
    # the agents' 2×2 grid sits at the right edge, each frame enlarged 2×
    grid = frame[:, -(2 * 128 + 4):]
    np.testing.assert_array_equal(grid[:128:2, :128:2], env._obs[0].transpose(1, 2, 0))
    many = bf.side_by_side(np.zeros((560, 880, 3), np.uint8), np.ones((20, 3, 64, 64), np.uint8))
    assert many.shape[0] == 4 * 64 + 3 * 4  # pistonball's 20 agents: a 5 × 4 grid at 1×, nothing cut


def test_world_model_probe_scores_pong():
    """The probe on frames: padded episodes of uint8 frames, branch points near a missed ball (the
    random episodes end early), scores that are finite and the same at every call."""
    from matwm_fast import probe_episodes as pe
    from matwm_fast import wm_probe
    from matwm_fast.config import resolve
    from matwm_fast.policy import build_networks

    cfg = SMALL["cooperative_pong"]
    data = pe.random_episodes(cfg, 3, 0)
    assert data["obs"].dtype == np.uint8 and data["obs"].shape[2:] == (2, *bf.FRAME) and "next_obs" not in data
    length = data["valid"].sum(1)  # (E,)
    assert data["ended"][length < cfg.max_cycles].all()  # a miss ended it, not the time limit
    ctx = pe.held_action_contexts(cfg, 2, 4, 6, 0, near_end=True)
    assert ctx.past_obs.shape == (2, 2, 4, *bf.FRAME) and ((ctx.to_end >= 1) & (ctx.to_end <= 6)).all()
    assert ctx.true.shape == (2 * 2, 3) and np.isfinite(ctx.true).all()  # every paddle's three actions
    run = resolve(preset("smoke", "cooperative_pong"), 2)
    torch.manual_seed(0)
    wm, ac = build_networks(run, env_spec(cfg))
    probe = wm_probe.HeldOutProbe(cfg, run.ac.context_len, run.ac.horizon, episodes=3, contexts=2, samples=2)
    scores = probe(wm, ac)
    assert set(scores) == {"wm_reward_r2", "paddle_0_wm_reward_r2", "paddle_1_wm_reward_r2", "wm_effect_corr"}
    assert np.isfinite(scores["wm_reward_r2"])
    np.testing.assert_equal(probe(wm, ac), scores)  # NaN (no effect to correlate) included


def test_pettingzoo_parameter_table_matches_the_installed_games():
    """Every parameter matwm_fast validates exists in the installed game, and every one of the
    game's parameters is either settable or fixed with a reason."""
    for scenario in bf.SCENARIOS:
        installed = set(bf._signature_defaults(scenario))
        assert set(bf._RULES[scenario]) <= installed
        assert installed <= set(bf._RULES[scenario]) | bf._RESERVED[scenario], installed - set(bf._RULES[scenario])
        assert bf._RESERVED[scenario] <= set(bf._WHY)
