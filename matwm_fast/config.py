"""Typed, frozen configuration: one dataclass per concern, named presets, one ``resolve``.

What is learned (``env``, ``wm``, ``ac``, ``replay``, ``train``) is kept apart from how it runs
(``run``: length, device, backend, kernels, precision, threads, logging, evaluation,
checkpoints).  A resumed run may change exactly the ``run`` section.  Every number the algorithm
uses lives here (SPEC §7 is the ``paper`` preset); modules receive the section they need.  A
field's docstring is its ``--help`` text.

:func:`resolve` runs once, before anything is built: it validates every field and fills the
derived sizes (the paper's imagination rule, the world-model sequences per agent), so the
``config.json`` of a run records the sizes that ran.  :func:`diff` is the one comparison of two
configs (a resume, a checkpoint's run directory, a sweep's runs, their preset): it returns the
differences as data, and each caller words its own message.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace
from typing import Any

from .kernels import IMPLS

DERIVED = {"derived": True}  # field metadata: filled by resolve(), not a flag
# field metadata: added after runs were written; a saved config without it takes its preset's value
# (what that run ran, since the field changed nothing before it existed): load_config
LATER = {"later": True}
# how the step functions may run (matwm_fast.runtime; RunConfig.backend's docstring says what each is)
BACKENDS = ("eager", "graphs", "compile", "cudagraphs")


@dataclass(frozen=True)
class EnvConfig:
    scenario: str = "simple_tag"
    """Scenario: an MPE2 one of matwm_fast.env.SCENARIOS (simple_tag, simple_spread, ...) or a
    PettingZoo Butterfly one of matwm_fast.butterfly.SCENARIOS (cooperative_pong, pistonball,
    knights_archers_zombies: image observations, pip install 'matwm_fast[butterfly]')."""
    max_cycles: int = 25
    """Episode length: the env truncates (not terminates) after this many steps (the presets take
    each Butterfly game's own: 900, 125, 900; SCENARIO_DEFAULTS)."""
    kwargs: tuple[tuple[str, Any], ...] = ()
    """Extra scenario parameters as KEY=VALUE pairs (num_good, num_adversaries, num_obstacles, N,
    n_pistons, num_archers, ...)."""


@dataclass(frozen=True)
class WorldModelConfig:
    latent_vars: int = 32
    """K: number of categorical latent variables."""
    latent_classes: int = 32
    """C: classes per latent variable."""
    unimix: float = 0.01
    """Uniform mixture weight of every categorical (posterior, prior): 0.99·softmax + 0.01/C."""
    mlp_width: int = 512
    """Width of the encoder and decoder MLPs (vector observations)."""
    mlp_layers: int = 3
    """Hidden layers (Linear→LayerNorm→SiLU) of the encoder and of the decoder (vector observations)."""
    cnn_channels: int = field(default=32, metadata=LATER)
    """Image observations: channels of the encoder's first 4×4 stride-2 convolution, doubled at each
    further stage; the decoder mirrors them (STORM: 32, so 32-64-128-256)."""
    cnn_stages: int = field(default=4, metadata=LATER)
    """Image observations: stride-2 convolution stages of the encoder (transposed ones of the
    decoder), each halving the frame's sides (STORM: 4, 64×64 frames down to 4×4)."""
    width: int = 512
    """D: width of the sequence model (transformer) and of the action mixer."""
    layers: int = 2
    """Transformer layers of the sequence model."""
    heads: int = 8
    """Attention heads of the sequence model."""
    ffn_mult: int = 2
    """Feed-forward width of a transformer block as a multiple of D (STORM uses 2)."""
    max_len: int = 64
    """Longest sequence the transformer attends over (positional embedding size)."""
    head_width: int = 512
    """Hidden width of the dynamics, reward and continuation heads."""
    tp_width: int = 128
    """Width of the teammate predictor's small transformer."""
    tp_layers: int = 1
    """Layers of the teammate predictor's transformer."""
    tp_heads: int = 4
    """Heads of the teammate predictor's transformer."""
    reward_bins: int = 255
    """Bins of the symlog two-hot reward head."""
    bins_low: float = -20.0
    """Lowest bin (symlog space) of every two-hot head."""
    bins_high: float = 20.0
    """Highest bin (symlog space) of every two-hot head."""
    dyn_weight: float = 0.5
    """Weight of the dynamics KL (and of the action-mask loss), paper Eq. 3."""
    rep_weight: float = 0.1
    """Weight of the representation KL, paper Eq. 3."""
    free_bits: float = 1.0
    """Free nats: KL terms below this are clipped to it."""
    dropout: float = 0.0
    """Dropout on the residual branches (attention, feed-forward) of both transformers while the
    world model trains (STORM uses 0.1; imagination and acting never drop)."""
    recon_object_weight: float = field(default=1.0, metadata=LATER)
    """Frames only, outside the paper: the squared error of every pixel whose target shows an
    object (summed RGB above ``recon_object_level``) counts this many times in the reconstruction
    term; 1 is the paper's Eq. 3.  A small object, Cooperative Pong's 2×2 ball, otherwise weighs too
    little for the latent to take it up (bench/results/learning/butterfly/README.md)."""
    recon_object_level: float = field(default=0.3, metadata=LATER)
    """Frames: summed RGB, in [0, 3], above which a target pixel shows an object for
    ``recon_object_weight`` (the Butterfly games draw their objects bright on a dark background)."""
    reward_weight: float = field(default=1.0, metadata=LATER)
    """Outside the paper: the weight of the reward term in Eq. 3 (1 is the paper's).  The reward
    head reads h_t and its loss is the only one in the sum that asks the representation for what
    decides the reward; beside a reconstruction summed over 12,288 pixels it counts little, and on
    Cooperative Pong a read-out of the frames finds the missed ball that the world model's states
    do not (bench/results/learning/butterfly/README.md)."""
    recon_symlog: bool = False
    """Reconstruct symlog(obs) (DreamerV3) instead of the raw observation the encoder sees symlogged
    (vector observations; frames are reconstructed in [0, 1], as STORM)."""
    teammates: bool = True
    """The teammate predictor (paper §4.3).  Off (the paper's ablation): no teammate loss, and the
    agent state's teammate part is a constant, the uniform distribution over each teammate's actions."""
    action_scaling: bool = True
    """Agent k's action a enters the world model as index k·A + a (paper §4.2).  Off (the paper's
    ablation): index a, the same action columns for every agent."""
    batch_size: int = 16
    """World-model sequences per update, in total over all agents, split equally: batch_size // agents
    from each (SPEC §1), and what that totals written back (the paper's 16 runs as 15 on 3 agents)."""
    batch_per_agent: int = field(default=0, metadata=DERIVED)
    """Sequences drawn from each agent's buffer per update: batch_size // agents (derived)."""
    seq_len: int = 64
    """Length of each world-model training sequence."""
    lr: float = 3e-5
    """Adam learning rate of the world model."""
    adam_eps: float = 1e-8
    """Adam epsilon of the world model."""
    grad_clip: float = 1000.0
    """Global gradient-norm clip of the world model."""


@dataclass(frozen=True)
class ActorCriticConfig:
    mlp_width: int = 512
    """Hidden width of actor and critic MLPs."""
    mlp_layers: int = 2
    """Hidden layers (Linear→LayerNorm→SiLU) of actor and critic."""
    imag_batch: int = 0
    """Imagined trajectories per agent; 0 = the paper's rule by agent count (512/768/1024)."""
    horizon: int = 0
    """Imagination horizon; 0 = the paper's rule by agent count (16/12/8)."""
    context_len: int = 8
    """Real steps of context that start each imagined trajectory."""
    gamma: float = 0.985
    """Discount γ."""
    lam: float = 0.95
    """λ of the λ-returns."""
    entropy: float = 3e-4
    """Entropy bonus η of the actor loss."""
    slow_critic_decay: float = 0.98
    """EMA decay of the slow critic's weights."""
    return_scale_decay: float = 0.99
    """EMA decay of the return scale S (95th−5th percentile of λ-returns)."""
    return_pct_low: float = 0.05
    """Lower percentile of the return scale."""
    return_pct_high: float = 0.95
    """Upper percentile of the return scale."""
    lr: float = 3e-4
    """Adam learning rate of each actor and critic."""
    adam_eps: float = 1e-5
    """Adam epsilon of actors and critics."""
    grad_clip: float = 100.0
    """Gradient-norm clip, applied per agent and per network."""


@dataclass(frozen=True)
class ReplayConfig:
    capacity: int = 50_000
    """Transitions kept per agent."""
    priority_decay: float = 0.9998
    """World-model sampling weight of a transition of age k: decay**k."""
    warmup: int = 1_000
    """Random-action transitions collected before any update."""


@dataclass(frozen=True)
class TrainConfig:
    wm_every: int = 1
    """World-model update every this many env steps (after warm-up)."""
    wm_updates: int = 1
    """World-model updates at each of those env steps, each on a batch of its own (the paper: 1).
    More updates per env step, not more sequences per update: tests whether the world model is
    short of updates or of data."""
    agent_every: int = 1
    """Actor-critic update every this many env steps (after warm-up)."""
    act_context: int = 16
    """Length of each agent's (observation, action) context queue when acting."""
    seed: int = 0
    """Seed of every random generator (0 … 2**32 − 1)."""


@dataclass(frozen=True)
class RunConfig:
    steps: int = 50_000
    """Real environment steps in total (warm-up included)."""
    device: str = "auto"
    """Torch device: auto (CUDA when available), cpu, cuda, cuda:N."""
    backend: str = "auto"
    """Step-function backend: eager; graphs (each phase of a step captured as a CUDA graph from the
    eager functions, no compiler; a pass-through on the CPU); compile (Inductor); cudagraphs
    (Inductor + CUDA graphs); auto (cudagraphs on CUDA, eager on the CPU)."""
    kernels: str = "auto"
    """Kernel implementation: ref, triton, auto (Triton under eager and graphs on CUDA, else the reference ops)."""
    rollout_graph: str = "auto"
    """What a compiled backend makes one graph of in imagination: ``whole`` (the rollout with its H
    steps unrolled: fewest launches and guard checks, compilation growing with H), ``step`` (the
    prefill, one decode step run H times, the last state: compilation independent of H), or auto
    (step on CUDA, where the whole rollout took minutes to compile; whole on the CPU)."""
    amp: str = "auto"
    """Precision of the world model, imagination and the actor-critic networks: bf16 autocast, fp32,
    or auto (bf16 on CUDA and on CPUs with native bf16 matrix units, fp32 elsewhere)."""
    threads: int = 1
    """Torch CPU threads (0 = torch's default: one per core).  One by default: on 2 cores a second
    thread made a cpu-preset step 1.3× faster on an idle machine but 2.5× slower beside one busy
    process (bench/results/cpu-threads.md)."""
    log_every: int = 100
    """Env steps between metric rows."""
    checkpoint_every: int = 5_000
    """Env steps between checkpoints (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Periodic checkpoints kept on disk."""
    eval_every: int = 0
    """Env steps between evaluations during training (0 = never)."""
    eval_episodes: int = 50
    """Episodes per evaluation (the paper's protocol)."""


@dataclass(frozen=True)
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    wm: WorldModelConfig = field(default_factory=WorldModelConfig)
    ac: ActorCriticConfig = field(default_factory=ActorCriticConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = "paper"
    """Name of the preset this config started from."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Config":
        """The inverse of :meth:`to_dict`; keys outside the sections (e.g. ``runtime``) are ignored."""
        kw = {}
        for name, cls in SECTION_TYPES.items():
            sub = dict(d.get(name, {}))
            if name == "env":
                sub["kwargs"] = tuple(tuple(kv) for kv in sub.get("kwargs", ()))
            kw[name] = cls(**sub)
        return Config(preset=d.get("preset", "paper"), **kw)


SECTION_TYPES = {
    "env": EnvConfig,
    "wm": WorldModelConfig,
    "ac": ActorCriticConfig,
    "replay": ReplayConfig,
    "train": TrainConfig,
    "run": RunConfig,
}
LEARNED = ("env", "wm", "ac", "replay", "train")  # what a resume may not change; "run" may


# ----------------------------------------------------------------------------- presets
def _paper() -> Config:
    return Config(preset="paper")


def _cpu() -> Config:
    """Sized for 2 CPU cores: a few thousand env steps in well under 15 minutes."""
    c = Config()
    return replace(
        c,
        preset="cpu",
        wm=replace(c.wm, latent_vars=16, latent_classes=16, mlp_width=128, mlp_layers=2, width=128,
                   layers=2, heads=4, max_len=32, head_width=128, tp_width=64, tp_heads=2,
                   batch_size=12, seq_len=32, lr=3e-4, cnn_channels=8),
        ac=replace(c.ac, mlp_width=128, imag_batch=64, horizon=8, context_len=8),
        replay=replace(c.replay, warmup=500, capacity=20_000),
        run=replace(c.run, steps=3_000, log_every=100, checkpoint_every=1_000),
    )


def _smoke() -> Config:
    """Seconds on a CPU: for tests of the plumbing, not of learning."""
    c = Config()
    return replace(
        c,
        preset="smoke",
        wm=replace(c.wm, latent_vars=4, latent_classes=4, mlp_width=32, mlp_layers=1, width=32, layers=1,
                   heads=2, max_len=16, head_width=32, tp_width=16, tp_heads=2, reward_bins=31,
                   batch_size=4, seq_len=8, lr=1e-3, cnn_channels=2),
        ac=replace(c.ac, mlp_width=32, mlp_layers=1, imag_batch=6, horizon=3, context_len=4),
        replay=replace(c.replay, warmup=40, capacity=500),
        train=replace(c.train, act_context=6),
        # float32 whatever the CPU: at these sizes bf16 would only add conversions, and the
        # plumbing tests compare runs exactly
        run=replace(c.run, steps=60, log_every=10, checkpoint_every=0, amp="fp32"),
    )


PRESETS = {"paper": _paper, "cpu": _cpu, "smoke": _smoke}

# A preset's departures for one scenario ("section.field" → value), each on 3-seed evidence for that
# scenario alone; preset(name, scenario) applies them, the user's flags apply over them.
SCENARIO_TUNING: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        # entropy η 3e-3, world-model batch 24 (warm-up 512 then holds 8 non-overlapping sequences of
        # 32 per agent), discount γ 0.9: chosen on simple_spread's tuning runs and not carried to
        # simple_tag; the evidence and its caveats: bench/results/learning/README.md, "The tuning experiments"
        "simple_spread": {"ac.entropy": 3e-3, "wm.batch_size": 24, "replay.warmup": 512, "ac.gamma": 0.9},
    },
}


# Every preset's settings for a scenario unlike MPE2's (applied by preset() before the tuning above):
# the Butterfly games' episode lengths, PettingZoo's defaults (tests/test_butterfly.py checks them);
# Pistonball's 20 pistons get one world-model sequence each, as no preset's batch (16, 12, 4) covers
# them and the paper does not say how it split its 16 (docs/training.md, image scenarios)
SCENARIO_DEFAULTS: dict[str, dict[str, Any]] = {
    "cooperative_pong": {"env.max_cycles": 900},
    "pistonball": {"env.max_cycles": 125, "wm.batch_size": 20},
    "knights_archers_zombies": {"env.max_cycles": 900},
}


def with_fields(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with ``{"section.field": value}`` set (the one place a flat override is applied)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        sec, name = key.split(".", 1)
        sections.setdefault(sec, {})[name] = value
    return replace(cfg, **{sec: replace(getattr(cfg, sec), **kv) for sec, kv in sections.items()})


def preset(name: str, scenario: str | None = None) -> Config:
    """The named preset for ``scenario`` (default: the preset's own), with that scenario's tuning."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    scenario = scenario or cfg.env.scenario
    cfg = replace(cfg, env=replace(cfg.env, scenario=scenario))
    cfg = with_fields(cfg, SCENARIO_DEFAULTS.get(scenario, {}))
    return with_fields(cfg, SCENARIO_TUNING.get(name, {}).get(scenario, {}))


# ----------------------------------------------------------------------------- validation
def flag(key: str) -> str:
    """``section.field`` → the command-line flag that sets it."""
    return "--" + key.replace("_", "-")


def _int(lo: int, hi: int | None = None):
    return ("int", lo, hi)


def _num(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    return ("float", lo, hi, lo_open, hi_open)


def _choice(*names: str):
    return ("choice",) + names


# The allowed values of every field, checked by validate(); cross-field rules follow there.
RULES: dict[str, tuple] = {
    "env.max_cycles": _int(1),
    "wm.latent_vars": _int(1), "wm.latent_classes": _int(2), "wm.unimix": _num(0, 1, hi_open=True),
    "wm.mlp_width": _int(1), "wm.mlp_layers": _int(0), "wm.width": _int(1), "wm.layers": _int(1),
    # the frames' size is checked against the stages when the model is built (vision.check_frames)
    "wm.cnn_channels": _int(1, 4096), "wm.cnn_stages": _int(1, 10),
    "wm.heads": _int(1), "wm.ffn_mult": _int(1), "wm.max_len": _int(2), "wm.head_width": _int(1),
    "wm.tp_width": _int(1), "wm.tp_layers": _int(1), "wm.tp_heads": _int(1), "wm.reward_bins": _int(2),
    "wm.bins_low": _num(-1e6, 1e6), "wm.bins_high": _num(-1e6, 1e6), "wm.dyn_weight": _num(0, 1e6),
    "wm.rep_weight": _num(0, 1e6), "wm.free_bits": _num(0, 1e6), "wm.batch_size": _int(1),
    "wm.dropout": _num(0, 1, hi_open=True), "wm.recon_symlog": ("bool",), "wm.teammates": ("bool",),
    "wm.recon_object_weight": _num(1, 1e6), "wm.recon_object_level": _num(0, 3, hi_open=True),
    "wm.reward_weight": _num(0, 1e6),
    "wm.action_scaling": ("bool",),
    "wm.batch_per_agent": _int(0), "wm.seq_len": _int(2),
    # the lr cap only keeps Adam's float32 arithmetic representable (it overflows near 1e38); a
    # merely huge rate may diverge, and the NaN check then stops the run
    "wm.lr": _num(0, 1e30, lo_open=True), "wm.adam_eps": _num(0, 1, lo_open=True),
    "wm.grad_clip": _num(0, 1e30, lo_open=True),
    "ac.mlp_width": _int(1), "ac.mlp_layers": _int(0), "ac.imag_batch": _int(0), "ac.horizon": _int(0),
    "ac.context_len": _int(1), "ac.gamma": _num(0, 1), "ac.lam": _num(0, 1), "ac.entropy": _num(0, 1e6),
    "ac.slow_critic_decay": _num(0, 1), "ac.return_scale_decay": _num(0, 1, hi_open=True),
    "ac.return_pct_low": _num(0, 1, hi_open=True), "ac.return_pct_high": _num(0, 1, lo_open=True),
    "ac.lr": _num(0, 1e30, lo_open=True), "ac.adam_eps": _num(0, 1, lo_open=True),
    "ac.grad_clip": _num(0, 1e30, lo_open=True),
    "replay.capacity": _int(1), "replay.priority_decay": _num(0, 1, lo_open=True), "replay.warmup": _int(1),
    "train.wm_every": _int(1), "train.wm_updates": _int(1), "train.agent_every": _int(1), "train.act_context": _int(1),
    "train.seed": _int(0, 2**32 - 1),  # numpy's seeding range
    "run.steps": _int(1), "run.device": ("device",), "run.backend": _choice(*BACKENDS, "auto"),
    "run.kernels": _choice(*IMPLS, "auto"), "run.amp": _choice("auto", "bf16", "fp32"),
    "run.rollout_graph": _choice("whole", "step", "auto"),
    "run.threads": _int(0), "run.log_every": _int(1), "run.checkpoint_every": _int(0),
    "run.keep_checkpoints": _int(1), "run.eval_every": _int(0), "run.eval_episodes": _int(1),
}


def _check_field(key: str, value: Any, rule: tuple) -> None:
    kind = rule[0]
    if kind == "int":
        lo, hi = rule[1], rule[2]
        allowed = f"an integer ≥ {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
            raise ValueError(f"{flag(key)} {value!r}: must be {allowed}")
    elif kind == "float":
        lo, hi, lo_open, hi_open = rule[1:]
        allowed = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
        if not ok:
            raise ValueError(f"{flag(key)} {value!r}: must be {allowed}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{flag(key)} {value!r}: must be true or false")
    elif kind == "choice":
        if value not in rule[1:]:
            raise ValueError(f"{flag(key)} {value!r}: valid: {', '.join(rule[1:])}")
    elif kind == "device":
        if not isinstance(value, str) or not (value in ("auto", "cpu", "cuda") or
                                              (value.startswith("cuda:") and value[5:].isdigit())):
            raise ValueError(f"{flag(key)} {value!r}: unknown device; valid: auto, cpu, cuda, cuda:N")


def check_fields(cfg: Config) -> None:
    """Every field against its rule in :data:`RULES` (needs no env: runs before one is built)."""
    for sec in SECTION_TYPES:
        for f in dataclasses.fields(SECTION_TYPES[sec]):
            key = f"{sec}.{f.name}"
            if key in RULES:
                _check_field(key, getattr(getattr(cfg, sec), f.name), RULES[key])


def validate(cfg: Config, n_agents: int) -> None:
    """Refuse impossible configurations before anything is built; each message names the flag
    and says what is allowed."""
    check_fields(cfg)
    wm, ac, rp, tr = cfg.wm, cfg.ac, cfg.replay, cfg.train
    if wm.batch_size < n_agents:
        raise ValueError(
            f"wm.batch_size={wm.batch_size} is below the {n_agents} agents of {cfg.env.scenario}: each agent "
            f"needs at least one sequence; use {n_agents} or more")
    if wm.batch_per_agent not in (0, wm.batch_size // n_agents):
        raise ValueError(f"wm.batch_per_agent={wm.batch_per_agent} is derived (wm.batch_size / agents = "
                         f"{wm.batch_size // n_agents}); set wm.batch_size instead")
    if wm.seq_len > wm.max_len:
        raise ValueError(f"wm.seq_len={wm.seq_len} exceeds the transformer's wm.max_len={wm.max_len}")
    if not wm.bins_low < wm.bins_high:
        raise ValueError(f"--wm.bins-low {wm.bins_low} must be below --wm.bins-high {wm.bins_high}")
    if wm.recon_object_weight != 1:
        from .env import is_butterfly  # env imports this module

        if not is_butterfly(cfg.env.scenario):
            raise ValueError(f"--wm.recon-object-weight {wm.recon_object_weight:g}: weighs pixels; {cfg.env.scenario} "
                             f"has vector observations (allowed there: 1)")
    if not ac.return_pct_low < ac.return_pct_high:
        raise ValueError(f"--ac.return-pct-low {ac.return_pct_low} must be below --ac.return-pct-high "
                         f"{ac.return_pct_high}")
    _, horizon = imagination_size(n_agents, ac)
    if ac.context_len + horizon + 1 > wm.max_len:
        raise ValueError(
            f"ac.context_len + horizon + 1 = {ac.context_len} + {horizon} + 1 exceeds wm.max_len={wm.max_len}; "
            f"allowed: ac.context_len ≤ {wm.max_len - horizon - 1} at horizon {horizon}, or a larger wm.max_len")
    if tr.act_context > wm.max_len:
        raise ValueError(f"train.act_context={tr.act_context} exceeds wm.max_len={wm.max_len}")
    if wm.width % wm.heads or wm.tp_width % wm.tp_heads:
        raise ValueError(f"width {wm.width}/{wm.tp_width} must be divisible by heads {wm.heads}/{wm.tp_heads}")
    per_agent = wm.batch_size // n_agents
    # twice the packed size keeps non-overlapping draws easy (random placement leaves gaps)
    if rp.warmup < 2 * per_agent * wm.seq_len:
        raise ValueError(
            f"replay.warmup={rp.warmup} is too small for {per_agent} non-overlapping sequences of "
            f"{wm.seq_len} per agent; need at least {2 * per_agent * wm.seq_len}")
    if rp.warmup < ac.context_len:
        raise ValueError(f"replay.warmup={rp.warmup} is shorter than one imagination context "
                         f"(ac.context_len={ac.context_len})")
    if rp.capacity < rp.warmup:
        raise ValueError(f"replay.capacity={rp.capacity} is below replay.warmup={rp.warmup}")


# ----------------------------------------------------------------------------- derived values
def imagination_size(n_agents: int, ac: ActorCriticConfig) -> tuple[int, int]:
    """(batch per agent, horizon): the paper's footnote rule, unless set explicitly.

    ≤3 agents: 512 × 16; 4–6 agents: 768 × 12; ≥7 agents: 1024 × 8 — always per agent.
    """
    if n_agents <= 3:
        rule = (512, 16)
    elif n_agents <= 6:
        rule = (768, 12)
    else:
        rule = (1024, 8)
    return (ac.imag_batch or rule[0], ac.horizon or rule[1])


def resolve(cfg: Config, n_agents: int) -> Config:
    """Validate ``cfg`` for a scenario of ``n_agents`` and fill every derived size: the Config
    that runs (idempotent: resolving a resolved config changes nothing)."""
    validate(cfg, n_agents)
    batch, horizon = imagination_size(n_agents, cfg.ac)
    per_agent = cfg.wm.batch_size // n_agents  # SPEC §1: "16 // 4 = 4 per agent"; 16 // 3 = 5
    return replace(cfg, wm=replace(cfg.wm, batch_size=per_agent * n_agents, batch_per_agent=per_agent),
                   ac=replace(cfg.ac, imag_batch=batch, horizon=horizon))


def load_config(d: Any) -> Config:
    """A dict written by :meth:`Config.to_dict` (``config.json``, a checkpoint) → Config.

    Unknown and missing fields are named; a missing ``run`` field (one a later version added:
    it says how to run, not what is learned) takes its default, a missing field marked
    :data:`LATER` the value of the config's preset.
    """
    if not isinstance(d, dict):
        raise ValueError("config is not a mapping")
    problems, clean = [], {"preset": d.get("preset", "paper")}
    for sec, cls in SECTION_TYPES.items():
        have = d.get(sec) if isinstance(d.get(sec), dict) else {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        problems += [f"unknown field {sec}.{k}" for k in sorted(set(have) - set(fields))]
        problems += [f"missing field {sec}.{k}" for k in sorted(set(fields) - set(have))
                     if sec != "run" and not fields[k].metadata.get("later")]
        clean[sec] = {k: v for k, v in have.items() if k in fields}
        later = [k for k in fields if k not in have and fields[k].metadata.get("later")]
        if later:
            base = getattr(PRESETS[clean["preset"]]() if clean["preset"] in PRESETS else Config(), sec)
            clean[sec] |= {k: getattr(base, k) for k in later}
    if problems:
        raise ValueError("config was written by an incompatible version of matwm_fast: " + "; ".join(problems))
    try:
        return Config.from_dict(clean)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config is malformed: {e}") from e


def is_derived(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("derived"))


# ----------------------------------------------------------------------------- comparing configs
def flatten(cfg: Config | dict, sections: tuple[str, ...] = LEARNED) -> dict[str, Any]:
    """``{"section.field": value}`` over ``sections`` (by default what is learned), in field order:
    the inverse of :func:`with_fields`.  ``cfg`` may be a dict as :meth:`Config.to_dict` wrote it (a
    ``config.json``, perhaps of another version: a section it lacks adds nothing)."""
    d = cfg.to_dict() if isinstance(cfg, Config) else cfg
    return {f"{sec}.{k}": v for sec in sections if isinstance(d.get(sec), dict) for k, v in d[sec].items()}


def diff(a: Config, b: Config, sections: tuple[str, ...] = LEARNED,
         include_preset: bool = False) -> list[tuple[str, Any, Any]]:
    """``(key, a's value, b's value)`` for every ``section.field`` of ``sections`` where ``a`` and
    ``b`` differ, in field order; led by ``("preset", a's, b's)`` when ``include_preset`` and the
    presets differ.  Data, not text: each caller words its own message."""
    fa, fb = flatten(a, sections), flatten(b, sections)
    presets = [("preset", a.preset, b.preset)] if include_preset and a.preset != b.preset else []
    return presets + [(k, v, fb[k]) for k, v in fa.items() if v != fb[k]]
