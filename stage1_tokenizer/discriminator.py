"""PatchGAN discriminator (pix2pix's NLayer), as used by taming's VQGAN.

Layer layout and init follow taming `taming/modules/discriminator/model.py`, so the
`main.N.*` state-dict keys of a taming checkpoint map one to one onto ours (norm="batch").
"""
from __future__ import annotations

import torch
from torch import nn

NORMS = ("batch", "group", "none")


def _num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= max_groups that divides `channels`."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(_num_groups(channels), channels)
    return nn.Identity()


def _init_weights(module: nn.Module) -> None:
    """taming's `weights_init`: conv N(0, 0.02), norm scale N(1, 0.02); biases zero."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: images (B, C, H, W) -> real/fake logits per patch (B, 1, h', w').

    Each of the `n_layers` stride-2 convs halves the resolution; two stride-1 k4 convs follow,
    so 256 px with n_layers=3 gives 30x30 logits, each seeing a 70x70 receptive field.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"NLayerDiscriminator: unknown norm={norm!r}; choose one of {list(NORMS)}")
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {n_layers}")
        use_bias = norm == "none"  # a norm's affine shift makes a conv bias redundant (pix2pix)

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev_mult, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(channels * prev_mult, channels * mult, kernel_size=4, stride=2, padding=1, bias=use_bias),
                _norm_layer(norm, channels * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        prev_mult, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(channels * prev_mult, channels * mult, kernel_size=4, stride=1, padding=1, bias=use_bias),
            _norm_layer(norm, channels * mult),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(channels * mult, 1, kernel_size=4, stride=1, padding=1),  # one logit per patch
        ]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in the tokenizer's range -> logits (B, 1, h', w')."""
        return self.main(images)
