"""VQGAN training losses: L1/L2 + LPIPS reconstruction, codebook term, PatchGAN terms.

The recipe is taming's (`taming/modules/losses/vqperceptual.py`): hinge GAN loss, generator
term -mean(fake logits), adaptive weight ||grad rec|| / ||grad gan|| at the decoder's last
layer, GAN switched on after `disc_start` steps. The discriminator lives outside this module
(the training loop owns and optimises it); nothing here calls `.backward`.

Under torch.distributed the two batch-level statistics are taken over the global batch, so N
processes with batch B follow one process with batch N*B: the last-layer gradients behind the
adaptive weight and the LeCam EMAs' batch means are averaged over processes (one all-reduce each).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.distributed import mean_over_processes

DISC_LOSSES = ("hinge", "non_saturating")


@dataclass
class LossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0
    perceptual_weights: str | None = None  # path to the VGG16 backbone (see perceptual.py)
    codebook_weight: float = 1.0
    disc_weight: float = 0.8  # taming configs/imagenet_vqgan.yaml
    disc_start: int = 10000  # step at which the GAN terms switch on
    disc_loss: str = "hinge"  # "hinge" | "non_saturating"
    disc_channels: int = 64
    disc_layers: int = 3
    disc_norm: str = "batch"
    adaptive_weight: bool = True  # taming's ||grad rec|| / ||grad gan|| at the decoder's last layer
    max_adaptive_weight: float = 1e4
    lecam_weight: float = 0.0  # LeCam regulariser (Tseng et al. 2021), 0 = off
    lecam_decay: float = 0.999

    def __post_init__(self) -> None:
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError(f"loss.disc_loss: expected one of {list(DISC_LOSSES)}, got {self.disc_loss!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_weight") and isinstance(value, (int, float)) and value < 0:
                raise ValueError(f"loss.{f.name} must be >= 0, got {value}")
        if self.disc_start < 0:
            raise ValueError(f"loss.disc_start must be >= 0, got {self.disc_start}")
        if not 0.0 <= self.lecam_decay < 1.0:
            raise ValueError(f"loss.lecam_decay must be in [0, 1), got {self.lecam_decay}")


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))), as taming."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean(softplus(-real)) + mean(softplus(fake))): binary cross-entropy on logits."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """-mean(fake logits) (taming's generator term)."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: Tensor) -> Tensor:
    """mean(softplus(-fake)) = -log sigmoid(fake), Goodfellow et al.'s non-saturating loss."""
    return F.softplus(-logits_fake).mean()


_D_LOSSES = {"hinge": hinge_d_loss, "non_saturating": non_saturating_d_loss}
_G_LOSSES = {"hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}


def adaptive_gan_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """||d rec/d last_layer|| / (||d gan/d last_layer|| + 1e-4), clamped to [0, max_weight], detached.

    Balances the GAN gradient against the reconstruction gradient at the decoder's output layer
    (Esser et al. 2021, eq. 7). Both graphs are retained for the caller's backward.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    rec_grad, gan_grad = _global_gradients(rec_grad, gan_grad)
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def _global_gradients(rec_grad: Tensor, gan_grad: Tensor) -> tuple[Tensor, Tensor]:
    """Both last-layer gradients averaged over processes in one all-reduce: the gradients of the
    global batch's mean losses, so every process takes the weight one process with the whole
    batch would (the norm of a mean is not the mean of per-process norms)."""
    both = mean_over_processes(torch.stack([rec_grad, gan_grad]))
    return both[0], both[1]


def _adaptive_gan_total(rec: Tensor, g_loss: Tensor, quantizer_term: Tensor, reconstructions: Tensor,
                        last_layer: Tensor, disc_weight: float, max_weight: float) -> tuple[Tensor, Tensor]:
    """(weight, total) for total = rec + quantizer_term + weight * g_loss, with the backward through
    LPIPS and the discriminator run once instead of twice.

    `adaptive_gan_weight` takes d rec/d last_layer and d gan/d last_layer through the whole loss
    graphs, and the caller's backward then runs those graphs again. Both losses reach the parameters
    only through `reconstructions`, so their gradients there (one pass through LPIPS, one through D)
    give the last-layer gradients by the short path reconstructions -> last_layer, and the caller's
    backward only needs x . (g_rec + w g_gan) in place of rec + w gan. The returned total has the
    true value and the true gradients (up to summation order); the loss graphs are freed here."""
    grad_rec = torch.autograd.grad(rec, reconstructions)[0]
    grad_gan = torch.autograd.grad(g_loss, reconstructions)[0]
    rec_w, gan_w = _global_gradients(*(torch.autograd.grad(reconstructions, last_layer, grad, retain_graph=True)[0]
                                       for grad in (grad_rec, grad_gan)))
    weight = disc_weight * (rec_w.norm() / (gan_w.norm() + 1e-4)).clamp(0.0, max_weight).detach()
    pulled = (reconstructions.float() * (grad_rec.float() + weight * grad_gan.float()).detach()).sum()
    value = (rec + quantizer_term + weight * g_loss).detach()
    return weight, value + (quantizer_term - quantizer_term.detach()) + (pulled - pulled.detach())


class LeCamEMA(nn.Module):
    """LeCam regulariser (Tseng et al. 2021): keeps D's logits near EMAs of the other side's logits.

    penalty = mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2). The EMAs are buffers
    so they travel with state_dicts; the first update copies the value (the paper's warm start).
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, real_mean: Tensor, fake_mean: Tensor) -> None:
        """Fold this step's mean real / fake logits into the EMAs. Under torch.distributed every
        process must call it: the means are averaged over processes first, so the EMAs follow the
        global batch and stay identical everywhere."""
        real_mean, fake_mean = mean_over_processes(torch.stack([real_mean.detach().float(),
                                                                fake_mean.detach().float()]))
        decay = self.decay if self.num_updates > 0 else 0.0
        self.ema_real.mul_(decay).add_((1.0 - decay) * real_mean.detach().float())
        self.ema_fake.mul_(decay).add_((1.0 - decay) * fake_mean.detach().float())
        self.num_updates += 1

    def penalty(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """Scalar LeCam penalty for logits of any shape."""
        return (F.relu(logits_real - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - logits_fake).pow(2).mean())


class VQGANLoss(nn.Module):
    """Generator and discriminator objectives of a VQGAN; the discriminator is passed in per call.

    The LPIPS network is a frozen submodule (moves with `.to`) but is left out of `state_dict`,
    so checkpoints carry only the LeCam EMAs, not 59 MB of fixed VGG weights.
    """

    def __init__(self, config: LossConfig, *, lpips_model: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.g_loss_fn = _G_LOSSES[config.disc_loss]
        self.d_loss_fn = _D_LOSSES[config.disc_loss]
        self.perceptual: nn.Module | None = None
        if config.perceptual_weight > 0:
            if lpips_model is None:
                from .perceptual import build_lpips

                lpips_model = build_lpips(config.perceptual_weights)
            self.perceptual = lpips_model.eval().requires_grad_(False)
        self.lecam = LeCamEMA(config.lecam_decay) if config.lecam_weight > 0 else None
        self.register_state_dict_post_hook(_drop_perceptual_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_perceptual_keys)

    def train(self, mode: bool = True) -> "VQGANLoss":
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()  # LPIPS's dropout must stay off: it is a fixed metric
        return self

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms are on at `step`."""
        return step >= self.config.disc_start and self.config.disc_weight > 0

    def perceptual_loss(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        """Mean LPIPS distance, in fp32 even under autocast (a loss, and VGG features overflow fp16)."""
        assert self.perceptual is not None
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.perceptual(images.float(), reconstructions.float()).mean()

    def generator_loss(
        self,
        images: Tensor,
        reconstructions: Tensor,
        quantizer_loss: Tensor,
        *,
        step: int,
        last_layer: Tensor | None,
        discriminator: Callable[[Tensor], Tensor] | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Tokenizer objective: rec + w * gan_g + codebook_weight * quantizer_loss.

        images, reconstructions: (B, 3, H, W) in [-1, 1]. `last_layer` is the decoder's output
        conv weight (for the adaptive weight); `discriminator` should have requires_grad off.
        Returns (scalar loss, detached logs).
        """
        cfg = self.config
        diff = images.float() - reconstructions.float()
        l1 = diff.abs().mean()
        rec = cfg.l1_weight * l1
        logs: dict[str, Tensor] = {"loss/l1": l1.detach()}
        if cfg.l2_weight > 0:
            l2 = diff.pow(2).mean()
            rec = rec + cfg.l2_weight * l2
            logs["loss/l2"] = l2.detach()
        if self.perceptual is not None:
            p_loss = self.perceptual_loss(images, reconstructions)
            rec = rec + cfg.perceptual_weight * p_loss
            logs["loss/perceptual"] = p_loss.detach()

        quantizer_loss = quantizer_loss.float().mean()
        total = rec + cfg.codebook_weight * quantizer_loss

        if self.gan_active(step):
            if discriminator is None:
                raise ValueError(f"generator_loss: step {step} >= disc_start {cfg.disc_start} needs a discriminator")
            g_loss = self.g_loss_fn(discriminator(reconstructions).float())
            if not cfg.adaptive_weight:
                weight = torch.tensor(cfg.disc_weight, device=total.device)
            elif torch.is_grad_enabled() and g_loss.requires_grad:
                if last_layer is None:
                    raise ValueError("generator_loss: adaptive_weight needs the decoder's last_layer")
                if reconstructions.requires_grad:
                    weight, total = _adaptive_gan_total(rec, g_loss, cfg.codebook_weight * quantizer_loss,
                                                        reconstructions, last_layer, cfg.disc_weight,
                                                        cfg.max_adaptive_weight)
                    logs["loss/gan_g"], logs["gan/weight"] = g_loss.detach(), weight
                    logs.update({"loss/rec": rec.detach(), "loss/quantizer": quantizer_loss.detach(),
                                 "loss/total": total.detach()})
                    return total, logs
                weight = cfg.disc_weight * adaptive_gan_weight(rec, g_loss, last_layer, cfg.max_adaptive_weight)
            else:  # evaluation under no_grad: the adaptive weight is undefined, drop the GAN term
                weight = torch.zeros((), device=total.device)
            total = total + weight * g_loss
            logs["loss/gan_g"] = g_loss.detach()
            logs["gan/weight"] = weight.detach()

        logs["loss/rec"] = rec.detach()
        logs["loss/quantizer"] = quantizer_loss.detach()
        logs["loss/total"] = total.detach()
        return total, logs

    def discriminator_loss(
        self,
        images: Tensor,
        reconstructions: Tensor,
        *,
        step: int,
        discriminator: Callable[[Tensor], Tensor],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator objective on real `images` and (detached) `reconstructions`, (B, 3, H, W).

        Returns (scalar loss, detached logs); updates the LeCam EMAs when LeCam is on. Before
        `disc_start` the loss is multiplied by 0 (as taming's `disc_factor`), so a step is a no-op.
        """
        active = self.gan_active(step)
        logits_real = discriminator(images.detach()).float()
        logits_fake = discriminator(reconstructions.detach()).float()
        d_loss = self.d_loss_fn(logits_real, logits_fake)
        logs = {
            "disc/logits_real": logits_real.detach().mean(),
            "disc/logits_fake": logits_fake.detach().mean(),
        }
        if self.lecam is not None:
            if active and torch.is_grad_enabled():  # only real training steps move the EMAs
                self.lecam.update(logits_real.mean(), logits_fake.mean())
            lecam = self.lecam.penalty(logits_real, logits_fake)
            d_loss = d_loss + self.config.lecam_weight * lecam
            logs["disc/lecam"] = lecam.detach()
        if not active:
            d_loss = 0.0 * d_loss  # keeps the graph (no unused parameters) but moves nothing
        logs["loss/disc"] = d_loss.detach()
        return d_loss, logs


def _drop_perceptual_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual.")]:
        del state_dict[key]


def _ignore_missing_perceptual_keys(module: nn.Module, incompatible_keys) -> None:
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if ".perceptual." not in f".{k}"]
