"""The world model shared by all agents (SPEC §3): one parameter set, agents as rows.

Data flow for a row of agent k (paper §4, STORM §3):

    o_t ─symlog─▶ encoder ─▶ q(z_t | o_t)  (K×C categorical, unimix)  ─sample─▶ z_t
    e_t = mix(z_t, onehot(k·A + a_t))                     # action scaling tells the WM who acts
    h_t = transformer(e_{≤t})                             # causal, never across an episode start
    p(z_{t+1} | h_t) = g_D(h_t);  r_t = g_R(h_t);  c_t = g_C(h_t)
    teammates' a_t ~ f(sg(z_{≤t}))                         # teammate predictor
    ô_t = decoder(z_t)

The observation's shape picks the encoder and decoder: vectors (O,) take MLPs (o_t symlogged),
frames (C, H, W) STORM's convolutions (:mod:`matwm_fast.vision`, o_t uint8 scaled to [0, 1]
inside the model); everything from the latent on is the same module for both.  Imagination and
acting see the latent, never the frame: a rollout encodes its L context frames once, in the
prefill, and its decode steps are those of the vector path.

The module only computes; the loss lives in :mod:`matwm_fast.losses` and the optimiser in the
trainer.  ``kernels`` ('ref' or 'triton'), fixed at construction, says which implementation of
the fused ops (latent sampling, decode attention, LayerNorm + SiLU) every call runs.  The same
class serves as imagination's bf16 twin (:class:`~matwm_fast.nn.LowPrecisionCopy`): inputs are
brought to the weights' dtype where they enter (a no-op for float32 weights), and the
``*_step``/``*_table`` methods are imagination's per-step forms, with what a rollout shares made
once per rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import WorldModelConfig
from .kernels import sample_latent
from .env import EnvSpec
from .losses import symlog, unimix_probs
from .nn import MLP, mlp
from .transformer import CausalTransformer, KVCache, segment_mask
from .vision import ConvDecoder, ConvEncoder, is_image, obs_shape

Tensor = torch.Tensor


@dataclass
class WMOutputs:
    """Everything the world-model loss needs, for R rows of T steps."""

    post_probs: Tensor  # (R, T, K, C) posterior q(z_t | o_t), unimixed
    prior_probs: Tensor  # (R, T, K, C) prior p(z_{t+1} | h_t), unimixed
    recon: Tensor  # (R, T, O) decoded observation; frames: (R, T, C, H, W) in [0, 1] units
    reward_logits: Tensor  # (R, T, NB)
    cont_logits: Tensor  # (R, T)
    team_logits: Tensor | None  # (R, T, N-1, A) masked to each teammate's real actions; None: predictor off
    seg_mask: Tensor  # (R, T, T) attention mask (also tells which t+1 targets are valid)


class TeammatePredictor(nn.Module):
    """f(sg(z_{≤t})): a small causal transformer over the focal agent's latent history.

    Its output at step t is logits over every teammate's action at step t ((N−1) × A).  Teammate
    slots are ordered by agent index with the focal agent left out.  **CHOICE**: a learned
    focal-agent embedding is added to the input, since the same shared predictor must know whose
    teammates it predicts (the dynamics learn this from the scaled action).
    """

    def __init__(self, cfg: WorldModelConfig, spec: EnvSpec, kernels: str = "ref"):
        super().__init__()
        n, a = spec.n_agents, spec.n_actions
        self.n_team, self.n_act, self.enabled = max(n - 1, 1), a, cfg.teammates
        self.inp = nn.Linear(cfg.latent_vars * cfg.latent_classes, cfg.tp_width)
        self.agent_emb = nn.Embedding(n, cfg.tp_width)
        self.tf = CausalTransformer(cfg.tp_width, cfg.tp_layers, cfg.tp_heads, 2, cfg.max_len, kernels, cfg.dropout)
        self.out = nn.Linear(cfg.tp_width, self.n_team * a)
        counts = torch.tensor(spec.action_counts)
        others = [[j for j in range(n) if j != i] or [i] for i in range(n)]
        valid = torch.arange(a)[None, None] < counts[torch.tensor(others)][..., None]  # (N, N-1, A)
        if n == 1:
            valid = torch.zeros_like(valid)  # no teammates: the slot is a dummy, all-masked
        self.register_buffer("valid", valid, persistent=False)

    def _masked(self, out: Tensor, agent: Tensor) -> Tensor:
        """logits (R, ..., N-1, A) → the same with each teammate's unavailable actions at -1e9."""
        valid = self.valid[agent].view(agent.shape[0], *([1] * (out.dim() - 3)), self.n_team, self.n_act)
        return out.masked_fill(~valid, -1e9)

    def _logits(self, h: Tensor, agent: Tensor) -> Tensor:
        return self._masked(self.out(h).unflatten(-1, (self.n_team, self.n_act)), agent)  # (..., N-1, A)

    def _constant(self, z: Tensor, agent: Tensor) -> Tensor:
        """The ablation (``wm.teammates`` off): zero logits, i.e. a uniform guess, whatever z says."""
        return self._masked(z.new_zeros(*z.shape[:-1], self.n_team, self.n_act), agent)  # (R, ..., N-1, A)

    def forward(self, z: Tensor, pos: Tensor, mask: Tensor, agent: Tensor, cache: KVCache | None = None) -> Tensor:
        """z (R, T, K·C) (already stop-gradient), agent (R,) → logits (R, T, N-1, A)."""
        if not self.enabled:
            return self._constant(z, agent)
        x = self.inp(z) + self.agent_emb(agent)[:, None]  # (R, T, Dtp)
        return self._logits(self.tf(x, pos, mask, cache), agent)

    def decode(self, z: Tensor, pos: Tensor, agent: Tensor, cache: KVCache, index: Tensor, kv_start: Tensor) -> Tensor:
        """One step: z (R, K·C) → logits (R, N-1, A)."""
        if not self.enabled:
            return self._constant(z, agent)
        x = self.inp(z) + self.agent_emb(agent)  # (R, Dtp)
        return self._logits(self.tf.decode(x, pos, cache, index, kv_start), agent)

    def step_inputs(self, agent: Tensor, pos: Tensor) -> tuple[Tensor | None, Tensor]:
        """What every imagined step of a rollout shares, made once per rollout: the input bias of
        step t, inp's bias + the focal-agent embedding + the positional embedding (T, R, Dtp) for
        positions pos (T, R), and each row's unavailable teammate actions (R, N-1, A) bool."""
        invalid = ~self.valid[agent]  # (R, N-1, A)
        if not self.enabled:
            return None, invalid
        return self.tf.pos(pos) + (self.agent_emb(agent) + self.inp.bias), invalid  # (T, R, Dtp)

    def decode_step(self, z: Tensor, bias: Tensor | None, invalid: Tensor, agent: Tensor, cache: KVCache,
                    index: Tensor | int, kv_start: Tensor, kv_len: Tensor, live: int | None = None) -> Tensor:
        """:meth:`decode` with the shared parts of :meth:`step_inputs` (bias: step t's (R, Dtp)):
        the input layer and both embeddings are one ``addmm``, the mask one ``masked_fill``."""
        if not self.enabled:
            return self._constant(z, agent)
        x = torch.addmm(bias, z, self.inp.weight.t())  # (R, Dtp) = inp(z) + agent emb + pos emb
        h = self.tf.decode_embedded(x, cache, index, kv_start, kv_len, live)  # (R, Dtp)
        return self.out(h).unflatten(-1, (self.n_team, self.n_act)).masked_fill(invalid, -1e9)  # (R, N-1, A)


class WorldModel(nn.Module):
    def __init__(self, cfg: WorldModelConfig, spec: EnvSpec, kernels: str = "ref"):
        super().__init__()
        self.cfg, self.spec, self.kernels = cfg, spec, kernels
        k, c, d = cfg.latent_vars, cfg.latent_classes, cfg.width
        n, a, o = spec.n_agents, spec.n_actions, spec.obs_dim
        self.K, self.C, self.N, self.A, self.O = k, c, n, a, o
        self.obs_shape = shape = obs_shape(spec)  # (O,) or (C, H, W)
        self.image = is_image(shape)
        if self.image:
            self.encoder = ConvEncoder(shape, cfg.cnn_channels, cfg.cnn_stages, k * c, kernels)
            self.decoder = ConvDecoder(shape, cfg.cnn_channels, cfg.cnn_stages, k * c, kernels)
        else:
            self.encoder = mlp(o, cfg.mlp_width, cfg.mlp_layers, k * c, kernels)
            self.decoder = mlp(k * c, cfg.mlp_width, cfg.mlp_layers, o, kernels)
        # action mixer, STORM's form (Linear→LN→SiLU→Linear→LN) rather than the paper's single Linear
        self.mixer = MLP(nn.Linear(k * c + n * a, d), nn.LayerNorm(d), nn.SiLU(), nn.Linear(d, d), nn.LayerNorm(d),
                         kernels=kernels)
        self.seq = CausalTransformer(d, cfg.layers, cfg.heads, cfg.ffn_mult, cfg.max_len, kernels, cfg.dropout)
        self.dyn_head = mlp(d, cfg.head_width, 1, k * c, kernels)
        self.rew_head = mlp(d, cfg.head_width, 1, cfg.reward_bins, kernels)
        self.con_head = mlp(d, cfg.head_width, 1, 1, kernels)
        self.teammates = TeammatePredictor(cfg, spec, kernels)
        # No action-mask head g_M: MPE2 hands out no per-step action masks (padded actions are
        # static and masked in the policy), so the 0.5·mask term of Eq. 3 is identically absent.
        self.register_buffer("bins", torch.linspace(cfg.bins_low, cfg.bins_high, cfg.reward_bins), persistent=False)
        # (N, O) each agent's real features; frames have no padding: (N, 1) ones, which the pixel loss ignores
        mask = torch.ones(n, 1) if self.image else torch.from_numpy(spec.obs_mask())
        self.register_buffer("obs_mask", mask, persistent=False)
        # zero the last layers of reward/continuation heads: predictions start at 0 / p=0.5 (DreamerV3)
        for head in (self.rew_head, self.con_head):
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    # ------------------------------------------------------------------------------- pieces
    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the weights are stored in: float32 (trained under autocast or not), or a
        low-precision twin's bf16 (:class:`~matwm_fast.nn.LowPrecisionCopy`, imagination)."""
        return self.mixer[0].weight.dtype

    def posterior(self, obs: Tensor, noise: Tensor | None = None, rng: tuple[Tensor, Tensor] | None = None
                  ) -> tuple[Tensor, Tensor]:
        """obs (..., O), or frames (..., C, H, W) uint8 → (z (..., K·C) one-hot with straight-through
        grad, probs (..., K, C))."""
        if self.image:  # scaled to [0, 1] in the weights' dtype, channels-last (vision.ConvEncoder)
            logits = self.encoder(obs).unflatten(-1, (self.K, self.C))  # (..., K, C)
            return self._draw(logits, noise, rng)
        x = symlog(obs).to(self.param_dtype)  # a no-op unless the weights are a bf16 twin's
        logits = self.encoder(x).unflatten(-1, (self.K, self.C))  # (..., K, C)
        return self._draw(logits, noise, rng)

    def prior(self, h: Tensor, noise: Tensor | None = None, rng: tuple[Tensor, Tensor] | None = None
              ) -> tuple[Tensor, Tensor]:
        """h (..., D) → (z_{t+1} (..., K·C), prior probs (..., K, C))."""
        logits = self.dyn_head(h).unflatten(-1, (self.K, self.C))  # (..., K, C)
        return self._draw(logits, noise, rng)

    def _draw(self, logits: Tensor, noise: Tensor | None, rng: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        # ``sample(logits, noise)`` as callers (and tests replacing it) know it, unless a generator is given
        return self.sample(logits, noise) if rng is None else self.sample(logits, noise, rng)

    def sample(self, logits: Tensor, noise: Tensor | None, rng: tuple[Tensor, Tensor] | None = None
               ) -> tuple[Tensor, Tensor]:
        """One draw per latent variable; z and probs come in the weights' dtype or wider: float32
        from float32 weights (the KL terms of the loss), bf16 from a bf16 twin (imagination, where
        the probabilities are unused and z is the next layer's input; both samplers compute in
        float32 whatever they read, so the draw is the same).  ``rng``: (seed, offset) device
        tensors for the Triton sampler's own generator (the reference draws from torch's)."""
        lead = logits.shape[:-2]
        flat = logits.reshape(-1, self.K, self.C)  # (M, K, C)
        flat = flat.to(torch.promote_types(flat.dtype, self.param_dtype))
        nz = None if noise is None else noise.reshape(-1, self.K)  # one uniform per variable
        seed, offset = rng if rng is not None else (None, None)
        z, probs = sample_latent(flat, self.cfg.unimix, noise=nz, seed=seed, offset=offset,
                                 impl=self.kernels)  # (M, K, C) each
        return z.reshape(*lead, self.K * self.C), probs.reshape(*lead, self.K, self.C)

    def scaled_action(self, agent: Tensor, act: Tensor) -> Tensor:
        """Paper's action scaling: agent k's action a → index k·A + a of a one-hot of width N·A
        (the ablation, ``wm.action_scaling`` off: index a, the first A columns for every agent)."""
        if not self.cfg.action_scaling:
            return act
        return agent.view(-1, *([1] * (act.dim() - 1))) * self.A + act  # (R, ...) long

    def mix(self, z: Tensor, agent: Tensor, act: Tensor) -> Tensor:
        """(z (R, ..., K·C), a (R, ...)) → token e (R, ..., D) = mixer([z, onehot(k·A + a)]).

        The first layer's product with the one-hot is one column of its weight, so it is looked
        up instead: W·[z; e_i] + b = W_z·z + W[:, K·C + i] + b — neither the one-hot nor the
        concatenation is built (per imagination step they would be R × (K·C + N·A) copies).
        """
        first = self.mixer[0]
        kc = self.K * self.C
        col = first.weight[:, kc:].t()[self.scaled_action(agent, act)]  # (R, ..., D)
        return self.mixer.run(F.linear(z, first.weight[:, :kc], first.bias) + col, start=1)

    def mix_table(self) -> Tensor:
        """The mixer's first layer for every scaled action with its bias folded in, (N, A, D):
        row [k, a] = W[:, K·C + k·A + a] + b (the ablation reads row [0, a]).  Made once per
        rollout, so that each imagined step's first layer is one gather and one ``addmm``."""
        first = self.mixer[0]
        table = first.weight[:, self.K * self.C:].t() + first.bias  # (N·A, D)
        return table.view(self.N, self.A, -1)

    def mix_step(self, z: Tensor, table: Tensor, agent: Tensor, act: Tensor) -> Tensor:
        """:meth:`mix` of one step from :meth:`mix_table`: z (R, K·C), agent, act (R,) → (R, D)."""
        rows = table[agent, act] if self.cfg.action_scaling else table[0, act]  # (R, D) = W_a·e_i + b
        first = self.mixer[0]
        return self.mixer.run(torch.addmm(rows, z, first.weight[:, : self.K * self.C].t()), start=1)

    def heads(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h (..., D) → (reward logits (..., NB), continuation logit (...,))."""
        return self.rew_head(h), self.con_head(h).squeeze(-1)

    # ------------------------------------------------------------------------------- training pass
    def observe(self, obs: Tensor, act: Tensor, first: Tensor, agent: Tensor) -> WMOutputs:
        """Teacher-forced pass over real sequences: obs (R, T, O) or (R, T, C, H, W), act (R, T),
        first (R, T), agent (R,)."""
        z, post = self.posterior(obs)  # (R, T, K·C), (R, T, K, C)
        recon = self.decoder(z)  # (R, T, O) or (R, T, C, H, W)
        mask, pos = segment_mask(first)  # (R, T, T), (R, T)
        h = self.seq(self.mix(z, agent, act), pos, mask)  # (R, T, D)
        prior_logits = self.dyn_head(h).unflatten(-1, (self.K, self.C))  # (R, T, K, C)
        prior = unimix_probs(prior_logits, self.cfg.unimix)  # (R, T, K, C)
        rew_logits, con_logits = self.heads(h)  # (R, T, NB), (R, T)
        team = self.teammates(z.detach(), pos, mask, agent) if self.teammates.enabled else None  # (R, T, N-1, A)
        return WMOutputs(post, prior, recon, rew_logits, con_logits, team, mask)
