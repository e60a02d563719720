"""Losses, PatchGAN discriminator and the offline LPIPS backbone loader."""
from __future__ import annotations

import copy
import math
import urllib.error

import pytest
import torch
from torch import nn

from conftest import asset
from stage1_tokenizer import perceptual
from stage1_tokenizer.discriminator import NLayerDiscriminator
from stage1_tokenizer.losses import (
    LeCamEMA,
    LossConfig,
    VQGANLoss,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from stage1_tokenizer.perceptual import PerceptualWeightsMissing, build_lpips

VGG_ASSET_NAME = "lpips/vgg16-features-imagenet.safetensors"


@pytest.fixture(scope="module")
def random_lpips():
    return build_lpips(random_backbone=True)


@pytest.fixture(scope="module")
def features_state(random_lpips):
    """A correctly shaped vgg16().features state dict (random values), read back from LPIPS."""
    state = {}
    for key, tensor in random_lpips.state_dict().items():
        if key.startswith("net.slice"):
            index_name = key.split(".", 2)[2]  # net.slice2.5.weight -> 5.weight
            state[index_name] = torch.randn_like(tensor)
    return state


def smooth_images(seed: int, size: int = 32, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    return nn.functional.avg_pool2d(images, 5, 1, 2)  # (B, 3, size, size) in [-1, 1]


# --- GAN losses ----------------------------------------------------------------------------

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def test_hinge_losses_known_values():
    # relu(1 - real) = [0, .5, 2], relu(1 + fake) = [0, 1, 2.5] -> 0.5 * (2.5/3 + 3.5/3) = 1
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(1.0)
    assert hinge_g_loss(FAKE).item() == pytest.approx(1 / 6)


def test_non_saturating_losses_known_values():
    d = 0.5 * ((sp(-2) + sp(-0.5) + sp(1)) / 3 + (sp(-2) + sp(0) + sp(1.5)) / 3)
    assert non_saturating_d_loss(REAL, FAKE).item() == pytest.approx(d, rel=1e-6)
    g = (sp(2) + sp(0) + sp(-1.5)) / 3
    assert non_saturating_g_loss(FAKE).item() == pytest.approx(g, rel=1e-6)


# --- adaptive weight -----------------------------------------------------------------------

def tiny_decoder_setup(seed: int = 0):
    torch.manual_seed(seed)
    decoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 3, 3, padding=1))
    critic = nn.Conv2d(3, 1, 3).requires_grad_(False)
    images = torch.randn(2, 3, 8, 8)
    return decoder, critic, images


def test_adaptive_weight_matches_direct_autograd_and_is_clamped():
    decoder, critic, images = tiny_decoder_setup()
    last = decoder[-1].weight

    def losses():
        recon = decoder(images)
        return (images - recon).abs().mean(), -critic(recon).mean()

    rec, gan = losses()
    weight = adaptive_gan_weight(rec, gan, last)
    assert not weight.requires_grad

    rec, gan = losses()
    rec.backward(retain_graph=True)
    rec_norm = last.grad.norm().item()
    decoder.zero_grad()
    gan.backward()
    gan_norm = last.grad.norm().item()
    assert weight.item() == pytest.approx(rec_norm / (gan_norm + 1e-4), rel=1e-5)

    rec, gan = losses()
    assert adaptive_gan_weight(rec, 1e-9 * gan, last, max_weight=5.0).item() == 5.0
    assert adaptive_gan_weight(0 * rec, gan, last).item() == 0.0


# --- discriminator -------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("size", [32, 64])
def test_discriminator_shapes(norm, n_layers, size):
    torch.manual_seed(0)
    disc = NLayerDiscriminator(channels=8, n_layers=n_layers, norm=norm)
    logits = disc(torch.randn(2, 3, size, size))
    side = size // 2**n_layers - 2  # each stride-1 k4 p1 conv loses one pixel
    assert logits.shape == (2, 1, side, side)


def test_discriminator_matches_taming_layout_and_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    keys = set(disc.state_dict())
    # taming's NLayerDiscriminator(3, 64, 3) with BatchNorm: convs at 0, 2, 5, 8, 11; norms at 3, 6, 9
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_mean",
            "main.8.weight", "main.9.weight", "main.11.weight", "main.11.bias"} <= keys
    assert "main.2.bias" not in keys and "main.8.bias" not in keys
    assert disc.main[8].out_channels == 512 and disc.main[11].out_channels == 1
    for module in disc.modules():
        if isinstance(module, nn.Conv2d):
            assert abs(module.weight.mean().item()) < 0.005
            assert module.weight.std().item() == pytest.approx(0.02, rel=0.1)
            if module.bias is not None:
                assert torch.all(module.bias == 0)
        elif isinstance(module, nn.BatchNorm2d):
            assert module.weight.mean().item() == pytest.approx(1.0, abs=0.01)
            assert 0.01 < module.weight.std().item() < 0.03
            assert torch.all(module.bias == 0)
    group = NLayerDiscriminator(channels=16, n_layers=2, norm="group")
    assert isinstance(group.main[3], nn.GroupNorm) and group.main[3].num_groups == 32
    assert NLayerDiscriminator(channels=8, n_layers=1, norm="group").main[3].num_groups == 16


def test_discriminator_bad_norm():
    with pytest.raises(ValueError, match=r"norm='layer'.*batch.*group.*none"):
        NLayerDiscriminator(norm="layer")


# --- LPIPS ---------------------------------------------------------------------------------

def test_random_backbone_lpips_is_frozen(random_lpips):
    assert not random_lpips.training
    assert not any(p.requires_grad for p in random_lpips.parameters())
    x = smooth_images(0)
    assert random_lpips(x, x).abs().max().item() < 1e-6


def test_missing_weights_raise_helpful_error(tmp_path, monkeypatch):
    import torchvision.models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(perceptual.ENV_VAR, raising=False)
    calls = []
    real_vgg16 = torchvision.models.vgg16

    def offline_vgg16(*args, weights=None, **kwargs):
        calls.append(weights)
        if weights is not None:
            raise urllib.error.URLError("network unreachable (test)")
        return real_vgg16(*args, **kwargs)

    monkeypatch.setattr(torchvision.models, "vgg16", offline_vgg16)
    with pytest.raises(PerceptualWeightsMissing) as info:
        build_lpips()
    assert calls and calls[0] is not None  # the download was attempted (and failed)
    message = str(info.value)
    for needle in ("VGG16", "loss.perceptual_weights=PATH", "VQGAN_LPIPS_VGG", "vgg16-397923af.pth",
                   "loss.perceptual_weight=0", str(tmp_path)):
        assert needle in message


def test_bad_backbone_files_name_the_file(tmp_path, features_state):
    from safetensors.torch import save_file

    incomplete = tmp_path / "incomplete.safetensors"
    save_file({k: v for k, v in features_state.items() if k != "28.bias"}, str(incomplete))
    with pytest.raises(ValueError, match=r"incomplete\.safetensors.*28\.bias"):
        build_lpips(str(incomplete))

    wrong = dict(features_state)
    wrong["5.weight"] = torch.zeros(128, 64, 1, 1)
    wrong_file = tmp_path / "wrong.safetensors"
    save_file(wrong, str(wrong_file))
    with pytest.raises(ValueError, match=r"wrong\.safetensors.*5\.weight"):
        build_lpips(str(wrong_file))

    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_lpips(str(tmp_path / "nope.safetensors"))


def test_torchvision_pth_via_env_var_and_hub_cache(tmp_path, monkeypatch, features_state):
    full = {f"features.{k}": v for k, v in features_state.items()}
    full["classifier.0.weight"] = torch.zeros(4, 4)  # full vgg16 state dicts carry the classifier
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(full, checkpoints / "vgg16-397923af.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(perceptual.ENV_VAR, raising=False)

    from_cache = build_lpips()  # no argument, no env var: torchvision's cache
    assert torch.equal(from_cache.state_dict()["net.slice2.5.weight"], features_state["5.weight"])
    assert torch.equal(from_cache.state_dict()["net.slice5.28.bias"], features_state["28.bias"])

    other = {k: v + 1 for k, v in full.items()}
    torch.save(other, tmp_path / "other.pth")
    monkeypatch.setenv(perceptual.ENV_VAR, str(tmp_path / "other.pth"))
    state, source = perceptual.resolve_backbone()  # the env var wins over the cache
    assert source.endswith("other.pth") and torch.equal(state["0.weight"], features_state["0.weight"] + 1)
    _, source = perceptual.resolve_backbone(str(checkpoints / "vgg16-397923af.pth"))  # the argument wins
    assert source.endswith("vgg16-397923af.pth")


def test_real_vgg_backbone_asset(random_lpips):
    vgg_asset = asset(VGG_ASSET_NAME)
    # build_lpips(path) end to end is covered by the .pth test; reuse the random model's build here
    model = copy.deepcopy(random_lpips)
    perceptual.load_vgg_backbone(model, *perceptual.resolve_backbone(str(vgg_asset)))
    x = smooth_images(1, size=48, batch=1).expand(3, -1, -1, -1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.0, 0.05, 0.2]).view(3, 1, 1, 1)
    with torch.no_grad():
        same, small, large = model(x, x + sigma * noise).flatten().tolist()
        random_small = random_lpips(x[1:2], x[1:2] + 0.05 * noise[1:2]).item()
    assert same == pytest.approx(0.0, abs=1e-6)
    assert 0 < small < large
    assert abs(small - random_small) > 1e-3


# --- VQGANLoss -----------------------------------------------------------------------------

def test_loss_config_validation():
    with pytest.raises(ValueError, match="disc_loss"):
        LossConfig(disc_loss="wasserstein")
    with pytest.raises(ValueError, match="perceptual_weight"):
        LossConfig(perceptual_weight=-1.0)
    with pytest.raises(ValueError, match="lecam_weight"):
        LossConfig(lecam_weight=-0.1)


def test_no_lpips_built_when_perceptual_weight_zero(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("build_lpips must not be called")

    monkeypatch.setattr(perceptual, "build_lpips", fail)
    loss = VQGANLoss(LossConfig(perceptual_weight=0.0))
    assert loss.perceptual is None
    assert list(loss.parameters()) == []

    seen = []
    monkeypatch.setattr(perceptual, "build_lpips", lambda weights: seen.append(weights) or nn.Identity())
    VQGANLoss(LossConfig(perceptual_weights="/some/vgg.safetensors"))
    assert seen == ["/some/vgg.safetensors"]


def gan_setup(random_lpips, **overrides):
    config = LossConfig(disc_start=5, l2_weight=0.5, codebook_weight=0.25, **overrides)
    loss = VQGANLoss(config, lpips_model=random_lpips)
    decoder, _, _ = tiny_decoder_setup()
    torch.manual_seed(1)
    disc = NLayerDiscriminator(channels=8, n_layers=1, norm="none")
    images = smooth_images(3, size=16)
    quantizer_loss = torch.tensor(0.4, requires_grad=True)
    return loss, decoder, disc, images, quantizer_loss


def test_gan_terms_switch_on_at_disc_start(random_lpips):
    loss, decoder, disc, images, q_loss = gan_setup(random_lpips)
    disc.requires_grad_(False)
    last = decoder[-1].weight

    before, logs = loss.generator_loss(images, decoder(images), q_loss, step=4, last_layer=last, discriminator=disc)
    assert not loss.gan_active(4) and loss.gan_active(5)
    assert "loss/gan_g" not in logs and "gan/weight" not in logs
    assert {"loss/total", "loss/rec", "loss/l1", "loss/l2", "loss/perceptual", "loss/quantizer"} <= set(logs)
    expected_rec = logs["loss/l1"] + 0.5 * logs["loss/l2"] + logs["loss/perceptual"]
    assert torch.allclose(logs["loss/rec"], expected_rec)
    assert torch.allclose(before, logs["loss/rec"] + 0.25 * q_loss)

    total, logs = loss.generator_loss(images, decoder(images), q_loss, step=5, last_layer=last, discriminator=disc)
    assert {"loss/gan_g", "gan/weight"} <= set(logs)
    assert logs["gan/weight"].item() > 0
    parts = logs["loss/rec"] + logs["gan/weight"] * logs["loss/gan_g"] + 0.25 * logs["loss/quantizer"]
    assert torch.allclose(total, parts)
    assert torch.allclose(logs["loss/total"], total.detach())
    assert all(not v.requires_grad for v in logs.values())
    total.backward()  # the caller's backward reaches the decoder and the quantizer, not D
    assert last.grad is not None and q_loss.grad is not None
    assert all(p.grad is None for p in disc.parameters())

    with torch.no_grad():  # evaluation: adaptive weight undefined -> GAN term dropped
        total, logs = loss.generator_loss(images, decoder(images), q_loss, step=5, last_layer=last,
                                          discriminator=disc)
    assert logs["gan/weight"].item() == 0.0
    assert torch.allclose(total, logs["loss/rec"] + 0.25 * logs["loss/quantizer"])


def test_single_pass_adaptive_weight_gives_taming_gradients(random_lpips):
    """generator_loss runs LPIPS's and D's backward once; the result must equal taming's recipe:
    weight from the two last-layer gradients, then backward through the whole total."""
    loss, decoder, disc, images, q_loss = gan_setup(random_lpips)
    disc.requires_grad_(False)
    last = decoder[-1].weight
    total, logs = loss.generator_loss(images, decoder(images), q_loss, step=5, last_layer=last, discriminator=disc)
    total.backward()
    fast = [p.grad.clone() for p in decoder.parameters()] + [q_loss.grad.clone()]

    decoder.zero_grad()
    q_loss.grad = None
    recon = decoder(images)
    diff = images - recon
    rec = diff.abs().mean() + 0.5 * diff.pow(2).mean() + loss.perceptual_loss(images, recon)
    g_loss = loss.g_loss_fn(disc(recon))
    weight = loss.config.disc_weight * adaptive_gan_weight(rec, g_loss, last)
    reference = rec + 0.25 * q_loss + weight * g_loss
    reference.backward()
    assert torch.allclose(logs["gan/weight"], weight) and torch.allclose(total, reference)
    for got, want in zip(fast, [p.grad for p in decoder.parameters()] + [q_loss.grad]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_fixed_gan_weight_without_adaptive(random_lpips):
    loss, decoder, disc, images, q_loss = gan_setup(random_lpips, adaptive_weight=False,
                                                    disc_loss="non_saturating")
    total, logs = loss.generator_loss(images, decoder(images), q_loss, step=10, last_layer=None,
                                      discriminator=disc)
    assert logs["gan/weight"].item() == pytest.approx(0.8)
    assert torch.allclose(total, logs["loss/rec"] + 0.8 * logs["loss/gan_g"] + 0.25 * logs["loss/quantizer"])


def test_lecam_penalty_known_values():
    lecam = LeCamEMA(decay=0.9)
    lecam.ema_real.fill_(1.0)
    lecam.ema_fake.fill_(-1.0)
    real = torch.tensor([0.5, -2.0, 2.0])  # relu(real + 1) = [1.5, 0, 3] -> (2.25 + 9) / 3
    fake = torch.tensor([0.0, 2.0, -1.0])  # relu(1 - fake) = [1, 0, 2] -> 5 / 3
    assert lecam.penalty(real, fake).item() == pytest.approx(3.75 + 5 / 3)

    fresh = LeCamEMA(decay=0.9)
    fresh.update(torch.tensor(2.0), torch.tensor(-4.0))  # first update copies
    fresh.update(torch.tensor(0.0), torch.tensor(0.0))
    assert fresh.ema_real.item() == pytest.approx(1.8) and fresh.ema_fake.item() == pytest.approx(-3.6)
    assert {"ema_real", "ema_fake"} <= set(fresh.state_dict())


def test_discriminator_loss_with_lecam(random_lpips):
    loss, decoder, disc, images, _ = gan_setup(random_lpips, lecam_weight=0.1)
    recon = decoder(images)
    d_loss, logs = loss.discriminator_loss(images, recon, step=5, discriminator=disc)
    assert {"loss/disc", "disc/logits_real", "disc/logits_fake", "disc/lecam"} <= set(logs)
    real, fake = disc(images), disc(recon.detach())
    # first EMA update copies the means, then the penalty uses them
    expected_lecam = (torch.relu(real - fake.mean()).pow(2).mean()
                      + torch.relu(real.mean() - fake).pow(2).mean())
    assert torch.allclose(logs["disc/lecam"], expected_lecam, atol=1e-6)
    assert torch.allclose(d_loss, hinge_d_loss(real, fake) + 0.1 * expected_lecam, atol=1e-6)
    assert loss.lecam.ema_real.item() == pytest.approx(real.mean().item())
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad is None for p in decoder.parameters())  # reconstructions detached

    before, _ = loss.discriminator_loss(images, recon, step=0, discriminator=disc)
    assert before.item() == 0.0 and loss.lecam.num_updates.item() == 1


def test_state_dict_keeps_lecam_and_drops_lpips(random_lpips):
    loss, *_ = gan_setup(random_lpips, lecam_weight=0.1)
    loss.lecam.ema_real.fill_(0.3)
    state = loss.state_dict()
    assert set(state) == {"lecam.ema_real", "lecam.ema_fake", "lecam.num_updates"}
    other, *_ = gan_setup(random_lpips, lecam_weight=0.1)
    other.load_state_dict(state, strict=True)
    assert other.lecam.ema_real.item() == pytest.approx(0.3)
    other.train()
    assert other.training and not other.perceptual.training  # LPIPS dropout stays off
    assert not any(p.requires_grad for p in other.parameters())


def test_lpips_stays_fp32_under_autocast(random_lpips):
    loss, decoder, disc, images, q_loss = gan_setup(random_lpips)
    recon = decoder(images).detach()
    _, ref = loss.generator_loss(images, recon, q_loss, step=0, last_layer=None, discriminator=None)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        total, logs = loss.generator_loss(images, recon, q_loss, step=0, last_layer=None, discriminator=None)
    assert total.dtype == torch.float32
    assert torch.allclose(logs["loss/perceptual"], ref["loss/perceptual"])
