"""Image observations: the convolutional encoder and decoder of STORM (Zhang et al., 2023), which
MATWM uses for pixels, in place of the vector path's MLPs (SPEC §3, pixels as the features).

    frame (C, H, W) uint8 ─/255─▶ [Conv 4×4 stride 2 → LayerNorm(channels) → SiLU] × S
                          ─flatten─▶ Linear ─▶ K×C logits of the posterior
    z (K·C) ─Linear─▶ LayerNorm → SiLU ─▶ [ConvT 4×4 stride 2 → LayerNorm → SiLU] × (S−1)
                          ─▶ ConvT 4×4 stride 2 ─▶ frame (C, H, W), in [0, 1] units

From STORM (``sub_models/world_models.py``: ``EncoderBN``, ``DecoderBN``, ``DistHead``): 4×4
kernels, stride 2, padding 1; a stem of 32 channels doubled at every stage; stages until the
64×64 frame is 4×4 (S = 4: 32, 64, 128, 256 channels, 4·4·256 = 4,096 features); the posterior
logits one Linear of them; the decoder its mirror (a bias-free Linear to 4·4·256, transposed
convolutions halving the channels, the last one to the frame's channels with a bias and no
activation); pixels scaled to [0, 1] by /255; the reconstruction loss the squared error summed
over the pixels (:func:`matwm_fast.losses.world_model_loss`).

**CHOICE**: LayerNorm over the channels + SiLU where STORM has BatchNorm + ReLU (DreamerV3's
image encoder, and this project's MLPs).  BatchNorm's running statistics would be state outside
the parameters — imagination's bf16 twins (:class:`~matwm_fast.nn.LowPrecisionCopy`) copy
parameters only, and would act on stale statistics — it couples the rows of a batch, and it
switches behaviour between training and acting.

**Channels-last.**  Activations run in channels-last memory format (NHWC in memory, NCHW to
torch), the layout cuDNN's and oneDNN's convolutions prefer, in which the channel LayerNorm is a
LayerNorm over contiguous rows (one fused :func:`~matwm_fast.nn.norm` call) and flattening for
the Linear layers is a view.  The weights are *stored* as ordinary contiguous tensors in
channels-last order, ``(out, kh, kw, in)``, and handed to the convolution as a permuted view
with channels-last strides: the convolution converts nothing, while checkpoints (which save
contiguous tensors) and the optimiser state they restore keep the parameters' layout — a
channels-last *parameter* would come back from a checkpoint with its Adam moments in the other
layout, and fused Adam, which walks the tensors as flat memory, would then mix them up.

**Odd sizes.**  A stage maps a side n to ⌊n/2⌋; the decoder's transposed convolutions add the
lost row or column back (``output_padding``), so any frame of at least 2^S pixels a side comes
back at its own size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import norm

Tensor = torch.Tensor

KERNEL, STRIDE, PADDING = 4, 2, 1  # STORM's convolutions


def obs_shape(spec) -> tuple[int, ...]:
    """The shape of one agent's observation: ``spec.obs_shape`` — (O,) for vectors, (C, H, W) for
    frames — or, for a spec without one, (obs_dim,)."""
    shape = getattr(spec, "obs_shape", None)
    return tuple(int(s) for s in shape) if shape else (int(spec.obs_dim),)


def is_image(shape: tuple[int, ...]) -> bool:
    """Frames (C, H, W) take the convolutional encoder and decoder; vectors (O,) the MLPs."""
    return len(shape) == 3


def stage_sizes(height: int, width: int, stages: int) -> list[tuple[int, int]]:
    """(H, W) before the first stage and after each: a stage maps n to ⌊n/2⌋ (4×4, stride 2, pad 1)."""
    sizes = [(height, width)]
    for _ in range(stages):
        h, w = sizes[-1]
        sizes.append((h // 2, w // 2))
    return sizes


def check_frames(shape: tuple[int, ...], stages: int) -> None:
    """Refuse frames the encoder cannot halve ``stages`` times (ValueError naming the flag)."""
    c, h, w = shape
    if min(c, h, w) < 1:
        raise ValueError(f"image observations of shape {shape}: every side must be at least 1")
    if min(h, w) < 2**stages:
        most = max(min(h, w).bit_length() - 1, 0)
        raise ValueError(f"--wm.cnn-stages {stages}: {h}×{w} frames vanish after {stages} halvings (each side needs "
                         f"at least 2^{stages} = {2**stages} pixels); at most {most} for these frames")


def unit_pixels(frames: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Frames in [0, 1] as ``dtype``: uint8 ones divided by 255 (STORM's scaling); floating ones are
    taken to be in [0, 1] already and only cast.  A batch of frames (M, C, H, W) comes back
    channels-last (one copy does both the cast and the layout)."""
    if frames.dim() == 4:
        x = frames.to(dtype, memory_format=torch.channels_last)
    else:
        x = frames.to(dtype)
    return x / 255.0 if frames.dtype == torch.uint8 else x


class Conv(nn.Module):
    """STORM's 4×4 stride-2 convolution (``transposed``: its transpose, ``output_padding`` adding
    back the row/column an odd side lost), its weight stored contiguous in channels-last order:
    ``(out, kh, kw, in)`` — for a transposed one ``(in, kh, kw, out)``, torch's ``(in, out, kh,
    kw)`` with its second axis last — and viewed back with channels-last strides per call.
    Initialised as ``nn.Conv2d`` / ``nn.ConvTranspose2d`` would be (the same draws)."""

    def __init__(self, c_in: int, c_out: int, transposed: bool = False, bias: bool = False,
                 output_padding: tuple[int, int] = (0, 0)):
        super().__init__()
        kind = nn.ConvTranspose2d if transposed else nn.Conv2d
        ref = kind(c_in, c_out, KERNEL, STRIDE, PADDING, bias=bias)  # torch's own initialisation
        self.weight = nn.Parameter(ref.weight.detach().permute(0, 2, 3, 1).contiguous())  # (A, kh, kw, B)
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None  # (out,)
        self.transposed, self.output_padding = transposed, tuple(output_padding)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.permute(0, 3, 1, 2)  # (A, B, kh, kw), channels-last strides: a view
        if self.transposed:
            return F.conv_transpose2d(x, w, self.bias, STRIDE, PADDING, self.output_padding)
        return F.conv2d(x, w, self.bias, STRIDE, PADDING)


def channel_norm(ln: nn.LayerNorm, x: Tensor, kernels: str) -> Tensor:
    """SiLU(LayerNorm over the channels) of a channels-last (M, C, H, W): one fused op on the
    (M, H, W, C) view, whose rows are contiguous; the result is channels-last again.

    A bf16 activation of float32 weights (autocast) is normalised in float32 on the reference
    path, as CUDA's autocast runs every LayerNorm and as the Triton kernel computes: CPU autocast
    would keep it in bf16, whose backward over rows of a few channels ran 3.7× slower than
    float32's (159 against 43 ms for 384 frames of 32×32×8, one thread)."""
    rows = x.permute(0, 2, 3, 1)  # (M, H, W, C)
    if kernels == "ref" and rows.dtype != ln.weight.dtype and rows.dtype in (torch.bfloat16, torch.float16):
        return norm(ln, rows.to(ln.weight.dtype), kernels, "silu").to(rows.dtype).permute(0, 3, 1, 2)
    return norm(ln, rows, kernels, "silu").permute(0, 3, 1, 2)


def _channels(channels: int, stages: int) -> list[int]:
    """Channels after each stage: ``channels`` doubled at every stage after the first."""
    return [channels * 2**i for i in range(stages)]


class ConvEncoder(nn.Module):
    """Frames (..., C, H, W), uint8 or in [0, 1] → (..., d_out) logits."""

    def __init__(self, shape: tuple[int, int, int], channels: int, stages: int, d_out: int, kernels: str = "ref"):
        super().__init__()
        check_frames(shape, stages)
        self.shape, self.kernels = tuple(shape), kernels
        chans = [shape[0]] + _channels(channels, stages)
        h, w = stage_sizes(shape[1], shape[2], stages)[-1]
        self.convs = nn.ModuleList(Conv(a, b) for a, b in zip(chans, chans[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(b) for b in chans[1:])
        self.out = nn.Linear(h * w * chans[-1], d_out)  # STORM's post_head

    def forward(self, frames: Tensor) -> Tensor:
        lead = frames.shape[:-3]
        # straight to the dtype the first convolution computes in: autocast's, else the weights'
        kind = frames.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.out.weight.dtype
        x = unit_pixels(frames.reshape(-1, *self.shape), dtype)  # (M, C, H, W) channels-last
        for conv, ln in zip(self.convs, self.norms):
            x = channel_norm(ln, conv(x), self.kernels)  # (M, c_i, H_i, W_i)
        x = x.permute(0, 2, 3, 1).flatten(1)  # (M, h·w·c) in (h, w, c) order: a view of channels-last
        return self.out(x).reshape(*lead, -1)  # (..., d_out)


class ConvDecoder(nn.Module):
    """Latents (..., d_in) → frames (..., C, H, W) in [0, 1] units (unbounded, as STORM's), the
    batch channels-last."""

    def __init__(self, shape: tuple[int, int, int], channels: int, stages: int, d_in: int, kernels: str = "ref"):
        super().__init__()
        check_frames(shape, stages)
        self.shape, self.kernels = tuple(shape), kernels
        chans = [shape[0]] + _channels(channels, stages)  # chans[i]: channels at sizes[i]
        sizes = stage_sizes(shape[1], shape[2], stages)
        self.first = (*sizes[-1], chans[-1])  # (h, w, c) the first Linear's output, viewed
        self.inp = nn.Linear(d_in, sizes[-1][0] * sizes[-1][1] * chans[-1], bias=False)
        self.inp_norm = nn.LayerNorm(chans[-1])
        # stage i goes from sizes[i + 1] to sizes[i]: 2·n, plus the pixel ⌊n/2⌋ dropped
        self.deconvs = nn.ModuleList(
            Conv(chans[i + 1], chans[i], transposed=True, bias=i == 0,
                 output_padding=(sizes[i][0] - 2 * sizes[i + 1][0], sizes[i][1] - 2 * sizes[i + 1][1]))
            for i in reversed(range(stages)))
        self.norms = nn.ModuleList(nn.LayerNorm(chans[i]) for i in reversed(range(1, stages)))  # not after the last

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        x = self.inp(z.reshape(-1, z.shape[-1])).view(-1, *self.first)  # (M, h, w, c)
        x = norm(self.inp_norm, x, self.kernels, "silu").permute(0, 3, 1, 2)  # (M, c, h, w) channels-last
        for i, conv in enumerate(self.deconvs):
            x = conv(x)
            if i < len(self.norms):
                x = channel_norm(self.norms[i], x, self.kernels)
        return x.reshape(*lead, *self.shape)  # (..., C, H, W): a view
