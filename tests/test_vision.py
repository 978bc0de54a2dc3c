"""Image observations (matwm_fast/vision.py): STORM's encoder and decoder at any frame size, uint8
frames scaled inside the model, channels-last (and bf16) convolutions, the pixel reconstruction
loss, the vector path untouched, compiled equal to eager, capture-ready phases, exact resume, and
imagination's decode steps independent of the pixels."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from frames import frames, image_config, image_spec, sequences
from matwm_fast import checkpoint, steps
from matwm_fast.acting import policy_step
from matwm_fast import imagination as imag
from matwm_fast.config import LATER, check_fields, load_config, preset
from matwm_fast.env import EnvSpec
from matwm_fast.graphs import Graph, Staged
from matwm_fast.imagination import ImagCaches, Pieces
from matwm_fast.losses import pixel_reconstruction, world_model_loss
from matwm_fast.nn import LowPrecisionCopy, mlp
from matwm_fast.policy import build_networks
from matwm_fast.runtime import Runtime, adam, autocast
from matwm_fast.tools import launches
from matwm_fast.vision import Conv, ConvDecoder, ConvEncoder, stage_sizes, unit_pixels
from matwm_fast.world_model import WorldModel

SHAPE = (3, 16, 12)
SPEC = image_spec(SHAPE)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small models: a second thread beside the machine's other work only waits."""


def channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# ----------------------------------------------------------------------------- encoder and decoder
@pytest.mark.parametrize("shape, stages", [((3, 64, 64), 4), ((3, 13, 11), 3), ((1, 9, 16), 2), ((4, 5, 7), 1)])
def test_shapes_and_gradients_at_any_frame_size(shape, stages):
    """STORM's 64×64 to 4×4, and odd sides: the decoder gives back the frame's own size, and a
    loss on it reaches every parameter of both."""
    torch.manual_seed(0)
    enc, dec = ConvEncoder(shape, 4, stages, 12), ConvDecoder(shape, 4, stages, 12)
    assert [c.weight.shape[0] for c in enc.convs] == [4 * 2**i for i in range(stages)]
    if shape == (3, 64, 64):
        assert stage_sizes(64, 64, 4)[-1] == (4, 4) and enc.out.in_features == 4 * 4 * 32
    logits = enc(frames(2, 3, shape=shape))  # (R, T, C, H, W) uint8 → (R, T, 12)
    assert logits.shape == (2, 3, 12)
    out = dec(logits)
    assert out.shape == (2, 3, *shape) and out.dtype == torch.float32
    out.square().mean().backward()
    for name, p in [*enc.named_parameters(), *dec.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradcheck_in_float64():
    """The analytic gradients of both stacks (odd sides, output padding) against finite differences."""
    torch.manual_seed(0)
    shape = (2, 4, 5)
    enc, dec = ConvEncoder(shape, 2, 2, 3).double(), ConvDecoder(shape, 2, 2, 3).double()
    x = torch.rand(2, *shape, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(enc, (x,)) and torch.autograd.gradcheck(dec, (z,))


def test_too_small_frames_are_refused_naming_the_flag():
    with pytest.raises(ValueError, match=r"--wm.cnn-stages 5: 16×12 frames vanish .* at most 3"):
        WorldModel(replace(preset("smoke").wm, cnn_stages=5), SPEC)
    for key, bad in (("cnn_stages", 0), ("cnn_channels", 0), ("cnn_stages", 11)):
        c = preset("smoke")
        with pytest.raises(ValueError, match=f"--wm.{key.replace('_', '-')} {bad}"):
            check_fields(replace(c, wm=replace(c.wm, **{key: bad})))


def test_train_refuses_a_bad_conv_setting_with_exit_2(capsys):
    from matwm_fast.train import main

    with pytest.raises(SystemExit) as e:
        main(["--preset", "smoke", "--wm.cnn-stages", "0", "--device", "cpu"])
    assert e.value.code == 2 and "--wm.cnn-stages 0: must be an integer in [1, 10]" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pixels in
def test_uint8_frames_are_scaled_inside_the_model():
    """uint8 in, [0, 1] float inside: the same logits as the frames divided by 255 by hand, and
    the world model's posterior the same for either (same draws)."""
    torch.manual_seed(0)
    u = frames(4, 2, shape=SHAPE)
    x = unit_pixels(u)
    assert x.dtype == torch.float32 and torch.equal(x, u.float() / 255) and 0 <= x.min() and x.max() <= 1
    assert channels_last(unit_pixels(u[0]))  # a batch of frames (M, C, H, W) comes back channels-last
    wm = WorldModel(image_config(SPEC).wm, SPEC).double()
    torch.testing.assert_close(wm.encoder(u), wm.encoder(u.double() / 255), rtol=1e-12, atol=1e-12)
    noise = torch.rand(4, 2, wm.K, dtype=torch.float64)
    za, pa = wm.posterior(u, noise)
    zb, pb = wm.posterior(u.double() / 255, noise)
    assert torch.equal(za, zb)
    torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)


def _conv_outputs(module, fn):
    outs = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for m in module.modules() if isinstance(m, Conv)]
    try:
        result = fn()
    finally:
        for h in hooks:
            h.remove()
    return outs, result


def test_convolutions_run_channels_last_from_contiguous_weights():
    """Every convolution's output is channels-last, and so are the reconstructed frames; the
    weights are stored contiguous (checkpoints and Adam's moments keep their layout) and reach
    the convolution as a channels-last view."""
    torch.manual_seed(0)
    wm = WorldModel(image_config(SPEC).wm, SPEC)
    obs, act, first, agent = (t for i, t in enumerate(sequences(SPEC, 4, 3)) if i in (0, 1, 4, 6))
    outs, out = _conv_outputs(wm, lambda: wm.observe(obs, act, first, agent))
    assert len(outs) == 2 * wm.cfg.cnn_stages and all(channels_last(o) for o in outs)
    assert channels_last(out.recon.flatten(0, 1))  # (R·T, C, H, W) of the batch, a view
    for m in wm.modules():
        if isinstance(m, Conv):
            assert m.weight.is_contiguous() and channels_last(m.weight.permute(0, 3, 1, 2))


def test_bf16_convolutions_under_autocast_and_on_imaginations_twins():
    """Under the runs' bf16 autocast the convolutions compute in bf16, channels-last; imagination's
    bf16 twin (every parameter copied) runs them in bf16 with autocast off, and its posterior
    stays close to the float32 model's."""
    torch.manual_seed(0)
    wm = WorldModel(image_config(SPEC, channels=4).wm, SPEC)
    obs = frames(4, 2, shape=SHAPE)
    with autocast(torch.device("cpu"), torch.bfloat16):
        outs, _ = _conv_outputs(wm, lambda: wm.decoder(wm.posterior(obs)[0]))
    assert all(o.dtype == torch.bfloat16 and channels_last(o) for o in outs)
    twin = LowPrecisionCopy(wm, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in twin.module.encoder.parameters())
    torch.nn.init.normal_(wm.encoder.out.weight, std=0.5)  # a change the twin sees only after a refresh
    twin.refresh()
    noise = torch.rand(4, 2, wm.K)
    with torch.no_grad():
        outs, (_, p16) = _conv_outputs(twin.module, lambda: twin.module.posterior(obs, noise))
        _, p32 = wm.posterior(obs, noise)
    assert all(o.dtype == torch.bfloat16 and channels_last(o) for o in outs)
    torch.testing.assert_close(p16.float(), p32, atol=0.03, rtol=0.05)


# ----------------------------------------------------------------------------- the loss
def test_pixel_loss_on_a_hand_made_image():
    """Squared error summed over every pixel and channel, averaged over batch and time, on [0, 1]
    pixels: frame 0 = [[0, 255], [51, 102]] against a black reconstruction costs 0 + 1 + 0.04 +
    0.16 = 1.2, frame 1 (white) against grey 0.5 costs 4 × 0.25 = 1; their mean is 1.1."""
    obs = torch.tensor([[[[[0, 255], [51, 102]]], [[[255, 255], [255, 255]]]]], dtype=torch.uint8)  # (1, 2, 1, 2, 2)
    recon = torch.zeros(1, 2, 1, 2, 2)
    recon[0, 1] = 0.5
    torch.testing.assert_close(pixel_reconstruction(recon, obs), torch.tensor(1.1))
    torch.testing.assert_close(pixel_reconstruction(recon.double(), obs.double() / 255), torch.tensor(1.1, dtype=torch.float64))
    # in world_model_loss, as the rec term of Eq. 3 (the frames' shape picks it; obs_mask unused)
    spec = image_spec((1, 2, 2))
    torch.manual_seed(0)
    wm = WorldModel(image_config(spec, stages=1).wm, spec)
    act, first, agent = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.bool), torch.tensor([0])
    out = wm.observe(obs, act, first, agent)
    assert out.recon.shape == obs.shape
    out.recon = recon
    _, m = world_model_loss(out, obs, torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2, 1, dtype=torch.long),
                            wm.obs_mask[agent], wm.bins, wm.cfg)
    torch.testing.assert_close(m["rec"], torch.tensor(1.1))


def test_the_object_weight_counts_the_bright_pixels_error_that_many_times():
    """The hand-made image above with ``recon_object_weight`` 3 (level 0.3): frame 0's pixels 255 and
    102 (1.0, 0.4) are objects, 0 and 51 (0, 0.2) are not, so 0 + 3·1 + 0.04 + 3·0.16 = 3.52;
    frame 1 is all object, 3 × 1 = 3; the mean 3.26.  At weight 1 the paper's term, bit for bit."""
    obs = torch.tensor([[[[[0, 255], [51, 102]]], [[[255, 255], [255, 255]]]]], dtype=torch.uint8)  # (1, 2, 1, 2, 2)
    recon = torch.zeros(1, 2, 1, 2, 2)
    recon[0, 1] = 0.5
    torch.testing.assert_close(pixel_reconstruction(recon, obs, 3.0, 0.3), torch.tensor(3.26))
    assert torch.equal(pixel_reconstruction(recon, obs, 1.0, 0.3), pixel_reconstruction(recon, obs))
    torch.testing.assert_close(pixel_reconstruction(recon, obs, 3.0, 0.5), torch.tensor(3.1))  # 102 is not, now: (3.2 + 3) / 2
    spec = image_spec((1, 2, 2))
    torch.manual_seed(0)
    wm = WorldModel(replace(image_config(spec, stages=1).wm, recon_object_weight=3.0), spec)
    act, first, agent = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.bool), torch.tensor([0])
    out = wm.observe(obs, act, first, agent)
    out.recon = recon
    _, m = world_model_loss(out, obs, torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2, 1, dtype=torch.long),
                            wm.obs_mask[agent], wm.bins, wm.cfg)
    torch.testing.assert_close(m["rec"], torch.tensor(3.26))


def test_image_world_model_loss_reaches_every_parameter():
    torch.manual_seed(0)
    wm = WorldModel(image_config(SPEC).wm, SPEC)
    obs, act, rew, cont, first, team_act, agent = sequences(SPEC, 4, 6)
    loss, m = world_model_loss(wm.observe(obs, act, first, agent), obs, rew, cont, team_act, wm.obs_mask[agent],
                               wm.bins, wm.cfg)
    loss.backward()
    assert [n for n, p in wm.named_parameters() if p.grad is None] == []
    assert m["rec"] > 100  # ~ C·H·W / 12 pixels' worth of error from an untrained decoder


# ----------------------------------------------------------------------------- the vector path
VECTOR = EnvSpec(agents=("adversary_0", "agent_0"), obs_sizes=(16, 14), action_counts=(5, 5))


def test_the_vector_path_is_the_mlps_as_before():
    """A vector spec builds what it built before this module existed: the MLP encoder and decoder
    with the same parameter names and shapes, drawn first from the same seed, no convolution
    anywhere, and the symlogged input (the whole vector path was checked bit for bit against the
    previous commit on the smoke and cpu presets and 50 training steps of a trainer)."""
    cfg = preset("smoke").wm
    torch.manual_seed(0)
    wm = WorldModel(cfg, VECTOR)
    kc = cfg.latent_vars * cfg.latent_classes
    torch.manual_seed(0)
    enc, dec = mlp(16, cfg.mlp_width, cfg.mlp_layers, kc, "ref"), mlp(kc, cfg.mlp_width, cfg.mlp_layers, 16, "ref")
    for ours, ref in ((wm.encoder, enc), (wm.decoder, dec)):
        assert type(ours) is type(ref)
        a, b = ours.state_dict(), ref.state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not wm.image and wm.obs_shape == (16,) and wm.obs_mask.shape == (2, 16)
    assert not any(isinstance(m, (Conv, ConvEncoder, ConvDecoder)) for m in wm.modules())
    x = torch.randn(3, 16)
    torch.testing.assert_close(wm.posterior(x, torch.full((3, wm.K), 0.5))[1],
                               torch.softmax(enc(torch.sign(x) * torch.log1p(x.abs())).view(3, wm.K, wm.C), -1)
                               * (1 - cfg.unimix) + cfg.unimix / wm.C)


def test_configs_saved_before_the_conv_and_object_fields_load_with_their_presets_values():
    for name in ("paper", "cpu", "smoke"):
        d = preset(name).to_dict()
        del d["wm"]["cnn_channels"], d["wm"]["cnn_stages"]
        cfg = load_config(d)
        assert (cfg.wm.cnn_channels, cfg.wm.cnn_stages) == (preset(name).wm.cnn_channels, preset(name).wm.cnn_stages)
    d = preset("cpu", "cooperative_pong").to_dict()
    del d["wm"]["recon_object_weight"], d["wm"]["recon_object_level"], d["wm"]["reward_weight"]
    assert (load_config(d).wm.recon_object_weight, load_config(d).wm.recon_object_level,
            load_config(d).wm.reward_weight) == (1.0, 0.3, 1.0)  # the paper's loss
    d = preset("cpu").to_dict()
    del d["wm"]["width"]
    with pytest.raises(ValueError, match="missing field wm.width"):  # only fields marked LATER
        load_config(d)
    assert LATER == {"later": True}


# ----------------------------------------------------------------------------- imagination sees the latent
def test_decode_steps_dispatch_the_same_ops_for_frames_and_vectors():
    """The decode steps of a rollout, counted op by op: the same ops, FLOPs and bytes for frames of
    two sizes and for a vector observation — the context frames are encoded once, in the prefill."""
    n, b, ctx, h = 2, 3, 4, 3

    def step_tally(spec, obs):
        torch.manual_seed(0)
        wm, ac = build_networks(image_config(small), spec)
        counter = launches.LaunchCounter(record=True)

        def counted(*args):
            with counter:
                return imag.step(*args)

        act, first = torch.zeros(n * b, ctx, dtype=torch.long), torch.zeros(n * b, ctx, dtype=torch.bool)
        caches = ImagCaches.allocate(wm, n * b, ctx, h, "cpu", ac=ac)
        with torch.no_grad():
            imag.imagine(wm, ac, obs, act, first, torch.arange(n), h, caches, pieces=Pieces(step=counted, unrolled=True))
        return counter.sequence, counter.tallies["other"]

    small, large = image_spec((3, 16, 12)), image_spec((3, 64, 64))
    vector = EnvSpec(agents=small.agents, obs_sizes=(10, 10), action_counts=small.action_counts)
    runs = [step_tally(small, frames(n * b, ctx, shape=small.obs_shape)),
            step_tally(large, frames(n * b, ctx, shape=large.obs_shape)),
            step_tally(vector, torch.randn(n * b, ctx, 10))]
    for seq, tally in runs[1:]:
        assert seq == runs[0][0]
        assert (tally.kernel, tally.flops, tally.bytes) == (runs[0][1].kernel, runs[0][1].flops, runs[0][1].bytes)
    assert not any("convolution" in op for _, op in runs[0][0])


# ----------------------------------------------------------------------------- compiled equals eager
def pixel_terms(wm, obs, noise):
    """What the image model adds to the world-model update: frames → posterior draw → decoded
    frames → the pixel loss (the rest of the update is the vector path's, tests/test_steps.py)."""
    z, post = wm.posterior(obs, noise)
    return pixel_reconstruction(wm.decoder(z), obs, wm.cfg.recon_object_weight, wm.cfg.recon_object_level), z, post


@pytest.mark.parametrize("object_weight", [1.0, 16.0])  # the paper's loss, and bright pixels weighed
def test_compiled_encoder_decoder_and_pixel_loss_equal_eager(object_weight):
    """The convolutions, the uint8 scaling and the pixel loss as Inductor compiles them for training
    on the CPU (the step functions' options), forward and backward, against eager.  The whole
    world-model update and rollout were compared once, by hand (tolerance 1e-4, equal actions)."""
    torch._dynamo.reset()
    rt = Runtime(torch.device("cpu"), "compile", "ref", None)
    compiled = torch.compile(pixel_terms, fullgraph=True, dynamic=False, options=steps.compile_options(rt))
    torch.manual_seed(0)
    wm = WorldModel(replace(image_config(SPEC).wm, recon_object_weight=object_weight), SPEC)
    twin = copy.deepcopy(wm)
    obs, noise = frames(4, 8, shape=SHAPE), torch.rand(4, 8, wm.K)
    outs = {}
    for name, fn, model in (("eager", pixel_terms, wm), ("compile", compiled, twin)):
        rec, z, post = outs[name] = fn(model, obs, noise)
        (rec + post.square().sum()).backward()
    assert torch.equal(outs["eager"][1], outs["compile"][1])  # the same draws of z
    for a, b in zip(outs["compile"], outs["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(wm.named_parameters(), twin.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)


# ----------------------------------------------------------------------------- exact resume
def test_resume_through_a_checkpoint_is_exact():
    """Parameters and fused Adam's moments through a checkpoint file and back: the next update is
    bit for bit the one the uninterrupted model makes (no state outside the parameters; the
    convolutions' weights keep their layout through the file, so Adam's moments line up)."""
    from matwm_fast.trainer import _load_optimizer

    rt = Runtime(torch.device("cpu"), "eager", "ref", None)
    cfg = image_config(SPEC)

    def model():
        torch.manual_seed(0)
        wm = WorldModel(cfg.wm, SPEC)
        return wm, adam(wm.parameters(), 1e-3, 1e-8, rt)

    def update(wm, opt, seed):
        torch.manual_seed(seed)
        loss, _ = steps.wm_loss(wm, *sequences(SPEC, 4, 6, seed=seed), None, "ref")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        steps.wm_opt_step(wm, opt, 1000.0)

    wm, opt = model()
    for seed in (1, 2):
        update(wm, opt, seed)
    assert wm.state_dict().keys() == dict(wm.named_parameters()).keys()  # buffers: derived, not saved
    saved = checkpoint.loads(checkpoint.dumps({"wm": wm.state_dict(), "opt": opt.state_dict()}))
    again, opt2 = model()
    again.load_state_dict(saved["wm"])
    _load_optimizer(opt2, saved["opt"])
    update(wm, opt, 3)
    update(again, opt2, 3)
    for (name, p), q in zip(wm.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name


# ----------------------------------------------------------------------------- capture readiness
class ImagePhases(torch.nn.Module):
    """The trainer's four phases (Trainer._act_phase ... _ac_phase) for the image model, on a fixed
    pool of uint8 frames standing in for the replay: until an image env trains through the real
    trainer, what proves the model half capture-ready (tests/capture.py traces it)."""

    def __init__(self, spec, cfg, amp):
        super().__init__()
        dev = torch.device("cpu")
        self.rt = Runtime(dev, "graphs", "ref", amp)
        self.cfg, self.spec, self.n = cfg, spec, spec.n_agents
        self.wm, self.ac = build_networks(cfg, spec, "ref", dev)
        self.wm_opt = adam(self.wm.parameters(), cfg.wm.lr, cfg.wm.adam_eps, self.rt)
        self.ac_opt = adam([{"params": self.ac.actor_params()}, {"params": self.ac.critic_params()}], cfg.ac.lr,
                           cfg.ac.adam_eps, self.rt)
        self.caches = ImagCaches.allocate(self.wm, self.n * cfg.ac.imag_batch, cfg.ac.context_len, cfg.ac.horizon,
                                          dev, self.rt.cache_dtype, ac=self.ac)
        pool = 2 * max(cfg.wm.seq_len, cfg.ac.context_len) + 8
        self.pool = sequences(spec, self.n, pool, seed=5)  # (N, P, ...) the "replay storage"
        self.slots = torch.arange(max(cfg.wm.seq_len, cfg.ac.context_len))
        self.wm_start = Staged((cfg.wm.batch_size,), torch.long, dev)
        self.ctx_start = Staged((self.n * cfg.ac.imag_batch,), torch.long, dev)
        self.wm_agent = torch.arange(self.n).repeat_interleave(cfg.wm.batch_per_agent)
        self.ctx_agent = torch.arange(self.n).repeat_interleave(cfg.ac.imag_batch)
        self.agents = torch.arange(self.n)
        self.queue = frames(self.n, cfg.train.act_context, shape=spec.obs_shape, seed=6)
        self.queue_act = torch.zeros(self.n, cfg.train.act_context, dtype=torch.long)
        self.count = torch.zeros((), dtype=torch.long)
        self.now = frames(self.n, shape=spec.obs_shape, seed=7)
        self.rollout = None
        self.graphs = {name: Graph(fn, dev, name=name) for name, fn in (
            ("act", self._act), ("wm_update", self._wm), ("imagine", self._imagine), ("ac_update", self._ac))}
        self.g = torch.Generator().manual_seed(0)

    def _gather(self, agent, start, length):
        s = start[:, None] + self.slots[:length]  # (R, T)
        obs, act, rew, cont, first, team, _ = self.pool
        a = agent[:, None]
        return obs[a, s], act[a, s], rew[a, s], cont[a, s], first[a, s], team[a, s]

    def _act(self):
        return policy_step(self.wm, self.ac, self.queue, self.queue_act, self.count, self.now)

    def _wm(self):
        obs, act, rew, cont, first, team = self._gather(self.wm_agent, self.wm_start.device, self.cfg.wm.seq_len)
        self.wm.train()
        loss, m = steps.wm_loss(self.wm, obs, act, rew, cont, first, team, self.wm_agent, self.rt.amp, "ref")
        self.wm.eval()
        self.wm_opt.zero_grad(set_to_none=True)
        loss.backward()
        m["grad_norm"] = steps.wm_opt_step(self.wm, self.wm_opt, self.cfg.wm.grad_clip)
        return m

    def _imagine(self):
        obs, act, _, _, first, _ = self._gather(self.ctx_agent, self.ctx_start.device, self.cfg.ac.context_len)
        return steps.rollout(self.wm, self.ac, obs, act, first, self.agents, self.cfg.ac.horizon, self.caches, None,
                             self.rt.amp)

    def _ac(self):
        r = self.rollout
        loss, scale, m = steps.ac_loss(self.ac, r.states, r.actions, r.rewards, r.continues, self.cfg.ac, self.rt.amp,
                                       "ref")
        self.ac_opt.zero_grad(set_to_none=True)
        loss.backward()
        steps.ac_opt_step(self.ac, self.ac_opt, scale, self.cfg.ac)
        return m

    def train_step(self):
        self.graphs["act"]()
        top = self.pool[0].shape[1]
        self.wm_start.put(torch.randint(0, top - self.cfg.wm.seq_len, self.wm_start.host.shape, generator=self.g).numpy())
        self.graphs["wm_update"]()
        self.ctx_start.put(torch.randint(0, top - self.cfg.ac.context_len, self.ctx_start.host.shape,
                                         generator=self.g).numpy())
        self.rollout = self.graphs["imagine"]()
        self.graphs["ac_update"]()


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_image_phases_are_capture_ready(amp):
    """Every phase that touches frames — acting over a queue of frames, the world-model update,
    imagination's prefill (on bf16 twins under bf16) — replays the ops of its capture: no sync, no
    host data, no moved tensor (tests/capture.py)."""
    from capture import CaptureCheck

    spec = image_spec((3, 16, 16))
    phases = ImagePhases(spec, image_config(spec), {"fp32": None, "bf16": torch.bfloat16}[amp])
    assert (phases.caches.weights is not None) == (amp == "bf16")
    with CaptureCheck(phases) as check:
        for _ in range(5):
            phases.train_step()
    check.assert_ready()
