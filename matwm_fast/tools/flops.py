"""Model FLOPs of one training env step, counted analytically from the config, and the device's
own matmul peak: together (:func:`rates`) they say how far a backend is from the hardware.

What is counted (the convention of ``torch.utils.flop_counter``, which ``tests/tools/test_flops.py``
checks this module against on the real step functions):

* every matrix product of the model — the Linear layers of the encoder, decoder, action mixer,
  transformer blocks (q/k/v, output projection, feed-forward), heads, teammate predictor, actors,
  critics and slow critics — at 2·m·n·k;
* for image observations, every convolution of the encoder and transposed convolution of the
  decoder (:mod:`matwm_fast.vision`) at 2 · (pixels of its low-resolution side) · 4·4 · c_in ·
  c_out per frame — the output of a strided convolution, the input of a transposed one — which
  is torch's formula whatever the output padding;
* attention as its two products, scores q·kᵀ and the weighted sum of values, over every key the
  code computes: the full T×T square of a masked training pass (causal and episode masks do not
  skip work there) and, in imagined step t, the L + t + 1 cache slots written so far (an unrolled
  rollout reads only those; the dead ones among them, before an episode start, are scored and
  masked);
* the backward pass of what is trained: 2× the forward for a product whose input needs a
  gradient (grad-input and grad-weight), 1× where the input is data (the first layer of the
  encoder — its first convolution for frames —, of the teammate predictor, of every actor and
  critic: only the weight gradient),
  and 2× the forward for attention (no recomputation; a flash kernel that recomputes the scores
  in backward does ½ of the attention forward more).

What is left out: element-wise work (LayerNorm, SiLU, softmax, the losses, sampling), the
optimisers (clipping, Adam, the slow-critic EMA), embedding look-ups — memory-bound work that
FLOPs do not describe — and the env and replay phases, which do no model arithmetic.

Phases are those of :mod:`matwm_fast.nvtx`.  ``act`` runs the world model over each agent's
context queue, whose length grows through an episode; its figure is the average over the steps
of a ``max_cycles`` episode.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..config import Config
from ..env import EnvSpec
from ..vision import is_image, obs_shape, stage_sizes


# ----------------------------------------------------------------------------------- counting
@dataclass
class Count:
    """Forward and backward FLOPs of a piece of the model."""

    fwd: int = 0
    bwd: int = 0

    def linear(self, rows: int, d_in: int, d_out: int, grad: bool = False, input_grad: bool = True) -> None:
        """A (rows × d_in) · (d_in × d_out) product; ``grad``: trained (backward counted)."""
        f = 2 * rows * d_in * d_out
        self.fwd += f
        if grad:
            self.bwd += f * (2 if input_grad else 1)

    def mlp(self, rows: int, d_in: int, width: int, layers: int, d_out: int, grad: bool = False,
            input_grad: bool = True) -> None:
        """:func:`matwm_fast.nn.mlp` (and a StackedMLP over all agents' rows)."""
        dims = [d_in] + [width] * layers + [d_out]
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            self.linear(rows, a, b, grad, input_grad or i > 0)

    def attention(self, queries: int, keys: int, width: int, grad: bool = False) -> None:
        """Scores and weighted values of ``queries`` rows, each over ``keys`` keys, all heads
        together (heads × head_dim = width)."""
        f = 2 * 2 * queries * keys * width
        self.fwd += f
        if grad:
            self.bwd += 2 * f

    def block(self, seqs: int, tokens: int, keys: int, width: int, ffn_mult: int, grad: bool = False) -> None:
        """One transformer block over ``seqs`` × ``tokens`` queries attending ``keys`` keys each."""
        rows = seqs * tokens
        self.linear(rows, width, 3 * width, grad)
        self.attention(rows, keys, width, grad)
        self.linear(rows, width, width, grad)
        self.linear(rows, width, ffn_mult * width, grad)
        self.linear(rows, ffn_mult * width, width, grad)

    def conv(self, frames: int, pixels: int, c_in: int, c_out: int, grad: bool = False, input_grad: bool = True) -> None:
        """A 4×4 (transposed) convolution of ``frames`` frames whose low-resolution side has
        ``pixels`` pixels: as a product, (frames·pixels × 16·c_in) · (16·c_in × c_out)."""
        self.linear(frames * pixels, 16 * c_in, c_out, grad, input_grad)

    @property
    def total(self) -> int:
        return self.fwd + self.bwd


TP_FFN_MULT = 2  # the teammate predictor's feed-forward multiple (world_model.TeammatePredictor)


def _sizes(cfg: Config, spec: EnvSpec) -> dict:
    w, image = cfg.wm, is_image(obs_shape(spec))
    return {"Z": w.latent_vars * w.latent_classes, "N": spec.n_agents, "A": spec.n_actions, "O": spec.obs_dim,
            "T": max(spec.n_agents - 1, 1) * spec.n_actions,  # teammate logits
            "S": w.latent_vars * w.latent_classes + w.width + max(spec.n_agents - 1, 1) * spec.n_actions,
            "image": image, "convs": _conv_stack(cfg, spec) if image else []}


def _conv_stack(cfg: Config, spec: EnvSpec) -> list[tuple[int, int, int]]:
    """(low-resolution pixels, c_in, c_out) of each encoder stage (the decoder mirrors them)."""
    ch, h, w = obs_shape(spec)
    chans = [ch] + [cfg.wm.cnn_channels * 2**i for i in range(cfg.wm.cnn_stages)]
    sizes = stage_sizes(h, w, cfg.wm.cnn_stages)
    return [(sizes[i + 1][0] * sizes[i + 1][1], chans[i], chans[i + 1]) for i in range(cfg.wm.cnn_stages)]


def _encoder(c: Count, cfg: Config, s: dict, rows: int, grad: bool = False) -> None:
    if not s["image"]:
        c.mlp(rows, s["O"], cfg.wm.mlp_width, cfg.wm.mlp_layers, s["Z"], grad, input_grad=False)  # input: data
        return
    for i, (pixels, c_in, c_out) in enumerate(s["convs"]):
        c.conv(rows, pixels, c_in, c_out, grad, input_grad=i > 0)  # the first one's input: data
    pixels, _, c_last = s["convs"][-1]
    c.linear(rows, pixels * c_last, s["Z"], grad)


def _decoder(c: Count, cfg: Config, s: dict, rows: int, grad: bool = False) -> None:
    if not s["image"]:
        c.mlp(rows, s["Z"], cfg.wm.mlp_width, cfg.wm.mlp_layers, s["O"], grad)
        return
    pixels, _, c_last = s["convs"][-1]
    c.linear(rows, s["Z"], pixels * c_last, grad)
    for pixels, c_low, c_high in reversed(s["convs"]):  # each transposed: c_high channels back to c_low
        c.conv(rows, pixels, c_high, c_low, grad)


def _mixer(c: Count, cfg: Config, s: dict, rows: int, grad: bool = False) -> None:
    # the one-hot action's product is a column look-up (WorldModel.mix): only z is multiplied
    c.linear(rows, s["Z"], cfg.wm.width, grad)
    c.linear(rows, cfg.wm.width, cfg.wm.width, grad)


def _head(c: Count, cfg: Config, rows: int, d_out: int, grad: bool = False) -> None:
    c.mlp(rows, cfg.wm.width, cfg.wm.head_width, 1, d_out, grad)


def _teammates(c: Count, cfg: Config, s: dict, seqs: int, tokens: int, keys: int, grad: bool = False) -> None:
    w, rows = cfg.wm, seqs * tokens
    c.linear(rows, s["Z"], w.tp_width, grad, input_grad=False)  # input: stop-gradient latents
    for _ in range(w.tp_layers):
        c.block(seqs, tokens, keys, w.tp_width, TP_FFN_MULT, grad)
    c.linear(rows, w.tp_width, s["T"], grad)


def _sequence(c: Count, cfg: Config, seqs: int, tokens: int, keys: int, grad: bool = False) -> None:
    for _ in range(cfg.wm.layers):
        c.block(seqs, tokens, keys, cfg.wm.width, cfg.wm.ffn_mult, grad)


def wm_update(cfg: Config, spec: EnvSpec) -> Count:
    """``WorldModel.observe`` on the world-model batch (R sequences × T steps), and its backward."""
    s, w = _sizes(cfg, spec), cfg.wm
    r, t = w.batch_size, w.seq_len
    c, m = Count(), w.batch_size * w.seq_len
    _encoder(c, cfg, s, m, grad=True)
    _decoder(c, cfg, s, m, grad=True)
    _mixer(c, cfg, s, m, grad=True)
    _sequence(c, cfg, r, t, t, grad=True)
    for d_out in (s["Z"], w.reward_bins, 1):  # dynamics, reward, continuation heads
        _head(c, cfg, m, d_out, grad=True)
    _teammates(c, cfg, s, r, t, t, grad=True)
    return c


def imagine(cfg: Config, spec: EnvSpec) -> Count:
    """Algorithm 1 for all agents (no gradient): prefill the L-step contexts, then H decode steps.
    Frames are encoded in the prefill only: a decode step costs the same for any observation."""
    s, w, ac = _sizes(cfg, spec), cfg.wm, cfg.ac
    r, ctx, h = spec.n_agents * ac.imag_batch, ac.context_len, ac.horizon
    c = Count()
    _encoder(c, cfg, s, r * ctx)
    _mixer(c, cfg, s, r * ctx)
    _sequence(c, cfg, r, ctx, ctx)
    _teammates(c, cfg, s, r, ctx, ctx)
    _head(c, cfg, r, s["Z"])  # z_0 from the last context step
    for t in range(h + 1):  # teammate prediction of s_t, against the t + L + 1 latents so far
        _teammates(c, cfg, s, r, 1, ctx + t + 1)
    for t in range(h):  # a_t, then one world-model step over the L + t + 1 tokens so far
        c.mlp(r, s["S"], ac.mlp_width, ac.mlp_layers, s["A"])  # actor
        _mixer(c, cfg, s, r)
        _sequence(c, cfg, r, 1, ctx + t + 1)
        for d_out in (w.reward_bins, 1, s["Z"]):  # reward, continuation, next latent
            _head(c, cfg, r, d_out)
    return c


def ac_update(cfg: Config, spec: EnvSpec) -> Count:
    """Every agent's actor, critic and slow critic on its H+1 imagined states, and the backward."""
    s, w, ac = _sizes(cfg, spec), cfg.wm, cfg.ac
    rows = spec.n_agents * ac.imag_batch * (ac.horizon + 1)
    c = Count()
    c.mlp(rows, s["S"], ac.mlp_width, ac.mlp_layers, s["A"], grad=True, input_grad=False)  # actor
    c.mlp(rows, s["S"], ac.mlp_width, ac.mlp_layers, w.reward_bins, grad=True, input_grad=False)  # critic
    c.mlp(rows, s["S"], ac.mlp_width, ac.mlp_layers, w.reward_bins)  # slow critic
    return c


def act(cfg: Config, spec: EnvSpec) -> Count:
    """``acting.policy_step``: it always runs over the whole context queue (masking the steps not
    yet filled), so its count does not depend on how full the queue is."""
    s, n, queue = _sizes(cfg, spec), spec.n_agents, cfg.train.act_context
    c = Count()
    _encoder(c, cfg, s, n * (queue + 1))  # the queue and the current observation
    _mixer(c, cfg, s, n * queue)
    _sequence(c, cfg, n, queue, queue)
    _teammates(c, cfg, s, n, queue + 1, queue + 1)
    c.mlp(n, s["S"], cfg.ac.mlp_width, cfg.ac.mlp_layers, s["A"])  # actor
    return c


def step_flops(cfg: Config, spec: EnvSpec) -> dict[str, float]:
    """FLOPs per env step after warm-up, per phase (zero for env and replay_sample); ``cfg`` must
    be resolved (``config.resolve``: imagination sizes and per-agent batch filled in)."""
    if not cfg.ac.imag_batch or not cfg.ac.horizon:
        raise ValueError("step_flops needs a resolved config (matwm_fast.config.resolve)")
    t = cfg.train
    return {"act": float(act(cfg, spec).total), "env": 0.0, "replay_sample": 0.0,
            "wm_update": wm_update(cfg, spec).total / t.wm_every, "imagine": float(imagine(cfg, spec).total),
            "ac_update": ac_update(cfg, spec).total / t.agent_every}


AMP_PHASES = ("wm_update", "imagine", "ac_update")  # the step functions that run under steps.autocast


def phase_precision(phase: str, amp: torch.dtype | None) -> str:
    """The precision a phase's matmuls run in: the updates and imagination under the run's
    autocast, acting (outside the step functions) in float32."""
    return "bf16" if amp == torch.bfloat16 and phase in AMP_PHASES else "fp32"


def rates(step_flops: dict[str, float], phase_ms: dict[str, float], amp: torch.dtype | None,
          peaks: dict[str, float] | None) -> dict:
    """Achieved FLOP/s of each phase that does model arithmetic, and its fraction of the measured
    peak of the precision the phase runs in (``None`` without a peak)."""
    achieved, frac, precision = {}, {}, {}
    for p, f in step_flops.items():
        if f <= 0:
            continue
        achieved[p] = f / (phase_ms[p] / 1e3) if phase_ms[p] > 0 else None
        precision[p] = phase_precision(p, amp)
        peak = (peaks or {}).get(precision[p])
        frac[p] = achieved[p] / peak if achieved[p] is not None and peak else None
    return {"flops_per_s": achieved, "peak_fraction": frac, "phase_precision": precision}


# ----------------------------------------------------------------------------------- the device's peak
PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5, n: int | None = None) -> float:
    """FLOP/s of one large square matrix product on ``device`` (random data: zeros run faster),
    the median over repeats for about ``seconds`` after a warm-up; float32 products run as the
    process is set (``torch.backends.cuda.matmul.allow_tf32``), like the model's."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)

    def once() -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - t0

    for _ in range(2):
        once()
    times, t_end = [], time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < t_end:
        times.append(once())
    return 2 * n**3 / statistics.median(times)


def measure_peaks(device: torch.device, seconds: float = 0.5) -> dict[str, float]:
    """FLOP/s of a large fp32 and bf16 matrix product on ``device`` (see :func:`matmul_peak`)."""
    return {name: matmul_peak(device, dt, seconds) for name, dt in PEAK_DTYPES.items()}
