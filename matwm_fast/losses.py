"""The math of MATWM as pure functions: transforms, distributions and the two losses.

Public, stable API (others test against these names and shapes; time is the last dimension):
``symlog``, ``symexp``, ``twohot_decode``, ``lambda_returns``.  Losses are pure functions of
tensors and their config section, returning the loss and a dict of detached metric tensors (no
``.item()`` here: the training loop reads them only at a log interval); the actor-critic loss
also returns the state it updates, the return scale.  ``kernels`` names the implementation of the
fused two-hot cross-entropy (``kernels.twohot_ce``: 'ref' or 'triton'), the runtime's choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ActorCriticConfig, WorldModelConfig
from .kernels import twohot_ce
from .vision import unit_pixels

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- transforms
def fp32(x: Tensor) -> Tensor:
    """At least float32 (bf16 activations are upcast for softmaxes and losses; float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def symlog(x: Tensor) -> Tensor:
    """sign(x)·log(1+|x|): compresses large magnitudes (DreamerV3, Eq. 1)."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: Tensor) -> Tensor:
    """Inverse of :func:`symlog`: sign(x)·(exp(|x|)−1)."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


def twohot_decode(logits: Tensor, bins: Tensor) -> Tensor:
    """The value a symlog two-hot head predicts, in real space: symexp of its expectation in symlog
    space (DreamerV3's decoding), not the expectation of symexp — a spread head decodes below its
    real-space mean: (..., NB) → (...,)."""
    return symexp((torch.softmax(fp32(logits), -1) * bins).sum(-1))


def lambda_returns(rewards: Tensor, continues: Tensor, values: Tensor, gamma: float, lam: float) -> Tensor:
    """TD(λ) returns, DreamerV3 Eq. 7 / paper Eq. 11: rewards, continues (..., H); values (..., H+1).

    ``G_t = r_t + γ·c_t·((1−λ)·V_{t+1} + λ·G_{t+1})`` with ``G_H = V_H``; returns (..., H).
    The recursion runs backwards over H (12 in the paper preset), a short static loop that
    torch.compile unrolls.
    """
    horizon = rewards.shape[-1]
    if values.shape[-1] != horizon + 1:
        raise ValueError(f"values must have H+1={horizon + 1} steps on the last axis, got {values.shape[-1]}")
    next_g = values[..., horizon]  # (...,)
    out = []
    for t in reversed(range(horizon)):
        next_g = rewards[..., t] + gamma * continues[..., t] * ((1.0 - lam) * values[..., t + 1] + lam * next_g)
        out.append(next_g)
    return torch.stack(out[::-1], dim=-1)  # (..., H)


# ----------------------------------------------------------------------------- categorical latents
def unimix_probs(logits: Tensor, unimix: float) -> Tensor:
    """(1−u)·softmax + u/C over the last axis: keeps every class reachable (DreamerV3 §Robustness)."""
    probs = torch.softmax(fp32(logits), dim=-1)
    return (1.0 - unimix) * probs + unimix / logits.shape[-1]


def categorical_kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p‖q) of categorical distributions (..., K, C), summed over the K variables → (...,)."""
    return (p * (torch.log(p) - torch.log(q))).sum(dim=(-1, -2))


def kl_free_bits(post: Tensor, prior: Tensor, free_bits: float) -> tuple[Tensor, Tensor, Tensor]:
    """The dynamics and representation terms of paper Eq. 3, per element (DreamerV3 free bits).

    Returns ``(dyn, rep, kl)`` each (...,): ``dyn = max(fb, KL(sg(post)‖prior))`` trains the prior,
    ``rep = max(fb, KL(post‖sg(prior)))`` trains the encoder, ``kl`` is the raw divergence.  The clip
    is applied per (batch, time) element before averaging (**CHOICE**: DreamerV3's form; STORM clips
    the batch mean, which lets a few large KLs hide many small ones).
    """
    dyn_kl = categorical_kl(post.detach(), prior)
    rep_kl = categorical_kl(post, prior.detach())
    return dyn_kl.clamp_min(free_bits), rep_kl.clamp_min(free_bits), dyn_kl.detach()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1 (no host sync: the count is a tensor)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------- world-model loss
def world_model_loss(out, obs: Tensor, rew: Tensor, cont: Tensor, team_act: Tensor, obs_mask: Tensor,
                     bins: Tensor, cfg: WorldModelConfig, kernels: str = "ref") -> tuple[Tensor, dict[str, Tensor]]:
    """Paper Eq. 3, averaged over batch and time: rec + rew + con + team + 0.5·dyn + 0.1·rep (the
    reward term weighted by ``cfg.reward_weight``, 1 in the paper).

    out: :class:`~matwm_fast.world_model.WMOutputs` for R rows × T steps; obs (R, T, O), or frames
    (R, T, C, H, W) (:func:`pixel_reconstruction`); rew, cont (R, T); team_act (R, T, N−1);
    obs_mask (R, O) marks each row's real features (frames: unused).  From ``cfg``: the KL weights
    (``dyn_weight``, ``rep_weight``), ``free_bits``, the frames' object weight
    (``recon_object_weight``, ``recon_object_level``) and the vector reconstruction target, obs or
    symlog(obs) with ``recon_symlog``.  The KL
    pairs (prior at t, posterior at t+1) count only where t+1 lies in t's episode: across an
    episode start the "next latent" is a reset, not a consequence of a_t.
    """
    if obs.dim() == 5:  # frames (R, T, C, H, W)
        rec = pixel_reconstruction(out.recon, obs, cfg.recon_object_weight, cfg.recon_object_level)
    else:
        target = symlog(obs) if cfg.recon_symlog else obs  # (R, T, O)
        rec = ((fp32(out.recon) - target).pow(2) * obs_mask[:, None]).sum(-1).mean()
    rew_loss = twohot_ce(out.reward_logits, symlog(rew), bins, kernels).mean()
    con_loss = F.binary_cross_entropy_with_logits(fp32(out.cont_logits), cont)
    if out.team_logits is None:  # the teammate predictor is off (ablation)
        team_loss = torch.zeros((), device=obs.device)
    else:
        team_logits = fp32(out.team_logits)  # (R, T, N-1, A)
        team = F.cross_entropy(team_logits.flatten(0, 2), team_act.flatten(), reduction="none")  # (R·T·(N-1),)
        has_team = (team_logits.amax(-1) > -1e8).flatten().float()  # dummy slot of a lone agent: 0
        team_loss = (team * has_team).view(team_act.shape).sum(-1).mean()
    dyn, rep, kl = kl_free_bits(out.post_probs[:, 1:], out.prior_probs[:, :-1], cfg.free_bits)  # (R, T-1) each
    same_episode = out.seg_mask[:, 1:, :-1].diagonal(dim1=1, dim2=2)  # (R, T-1): t+1 attends t
    dyn_loss, rep_loss = masked_mean(dyn, same_episode), masked_mean(rep, same_episode)
    # weight 1, the paper's: no multiply, so the graph is Eq. 3's call for call (launch count)
    rew_term = rew_loss if cfg.reward_weight == 1 else cfg.reward_weight * rew_loss
    total = rec + rew_term + con_loss + team_loss + cfg.dyn_weight * dyn_loss + cfg.rep_weight * rep_loss
    metrics = {
        "total": total, "rec": rec, "rew": rew_loss, "con": con_loss, "team": team_loss,
        "dyn": dyn_loss, "rep": rep_loss, "kl": masked_mean(kl, same_episode),
    }
    return total, {k: v.detach() for k, v in metrics.items()}


def pixel_reconstruction(recon: Tensor, frames: Tensor, object_weight: float = 1.0,
                         object_level: float = WorldModelConfig.recon_object_level) -> Tensor:
    """The reconstruction term on pixels (paper Eq. 3, STORM's ``MSELoss``): the squared error
    summed over every pixel of every channel, averaged over batch and time.  recon (R, T, C, H, W)
    in [0, 1] units; frames (R, T, C, H, W), uint8 (scaled by 1/255) or already in [0, 1].
    ``object_weight`` ≠ 1 (outside the paper; ``WorldModelConfig.recon_object_weight``) weighs the
    error of each pixel whose target's summed channels exceed ``object_level`` that many times."""
    pred = fp32(recon)
    target = unit_pixels(frames, pred.dtype)  # (R, T, C, H, W)
    err = (pred - target).pow(2)  # (R, T, C, H, W)
    if object_weight != 1:  # a host float: the paper's loss stays the same graph, call for call
        err = err * (1 + (object_weight - 1) * (target.sum(-3, keepdim=True) > object_level))  # (R, T, C, H, W)
    return err.sum((-3, -2, -1)).mean()


# ----------------------------------------------------------------------------- actor-critic loss
def percentile(sorted_x: Tensor, p: float) -> Tensor:
    """The ``p`` quantile of each row of ``sorted_x`` (..., M), sorted ascending: linear
    interpolation between the two nearest ranks, as ``torch.quantile``'s default.  The ranks are
    host numbers fixed by the shape, so no tensor of quantiles is built per call (a host-to-device
    copy inside a captured step) and one sort serves both ends of the return range."""
    m = sorted_x.shape[-1]
    rank = p * (m - 1)
    lo = int(rank)
    hi = min(lo + 1, m - 1)
    return torch.lerp(sorted_x[..., lo], sorted_x[..., hi], rank - lo)  # (...,)


def return_range(returns: Tensor, low: float, high: float) -> Tensor:
    """Per-agent spread of λ-returns, the high − low percentile: (N, ...) → (N,)."""
    flat = fp32(returns.flatten(1)).sort(dim=1).values  # (N, B·H)
    return percentile(flat, high) - percentile(flat, low)


def actor_critic_loss(policy_logits: Tensor, actions: Tensor, critic_logits: Tensor, slow_logits: Tensor,
                      rewards: Tensor, continues: Tensor, bins: Tensor, prev_scale: Tensor, cfg: ActorCriticConfig,
                      kernels: str = "ref") -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Paper Eqs. 10–13 (DreamerV3 form) for N agents at once, each on its own imagined batch.

    policy_logits (N, B, H, A); actions (N, B, H); critic_logits, slow_logits (N, B, H+1, NB);
    rewards, continues (N, B, H); prev_scale (N,) the EMA of the return range S before this batch.
    From ``cfg``: ``gamma``, ``lam``, ``entropy``, ``return_scale_decay``, ``return_pct_low`` and
    ``return_pct_high``.  Returns ``(loss, scale, metrics)``: loss = Σ_agents (actor_i + critic_i),
    summing keeps agent i's gradient equal to the gradient of its own loss; scale (N,) the updated
    EMA of S, which the caller stores for the next batch (EMA from 0, as DreamerV3; max(1, S) makes
    the first updates unscaled); metrics (N,) tensors.
    """
    values = twohot_decode(critic_logits, bins)  # (N, B, H+1)
    returns = lambda_returns(rewards, continues, values.detach(), cfg.gamma, cfg.lam)  # (N, B, H)
    # actor: REINFORCE with normalised advantage, plus entropy bonus
    logp_all = torch.log_softmax(fp32(policy_logits), -1)  # (N, B, H, A)
    logp = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (N, B, H)
    probs = logp_all.exp()
    entropy = -(probs * logp_all.clamp_min(-1e4)).sum(-1)  # (N, B, H); masked actions contribute 0
    decay = cfg.return_scale_decay
    scale = decay * prev_scale + (1.0 - decay) * return_range(returns, cfg.return_pct_low, cfg.return_pct_high)  # (N,)
    adv = (returns - values[..., :-1]) / scale.clamp_min(1.0).view(-1, 1, 1)  # (N, B, H)
    actor = (-adv.detach() * logp - cfg.entropy * entropy).flatten(1).mean(1)  # (N,)
    # critic: two-hot CE to sg(G_t), plus CE to the slow critic's value as a regulariser
    slow_v = twohot_decode(slow_logits, bins)  # (N, B, H+1)
    crit_logits = critic_logits[..., :-1, :]  # (N, B, H, NB)
    critic = (twohot_ce(crit_logits, symlog(returns.detach()), bins, kernels)
              + twohot_ce(crit_logits, symlog(slow_v[..., :-1].detach()), bins, kernels)).flatten(1).mean(1)  # (N,)
    loss = (actor + critic).sum()
    metrics = {
        "actor_loss": actor.detach(), "critic_loss": critic.detach(), "entropy": entropy.detach().flatten(1).mean(1),
        "return": returns.detach().flatten(1).mean(1), "value": values.detach().flatten(1).mean(1),
        "imag_reward": rewards.flatten(1).mean(1),
    }
    return loss, scale, metrics
