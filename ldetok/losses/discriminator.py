"""PatchGAN discriminator, hinge losses, the VQGAN adaptive weight and LeCam regularisation.

References: Isola et al., pix2pix (PatchGAN, CVPR 2017); Esser et al., VQGAN / taming-transformers
(adaptive weight, CVPR 2021); Tseng et al., "Regularizing GANs under limited data" (LeCam, CVPR 2021).
The official l-DeTok uses the PatchGAN with BatchNorm and hinge losses, and neither the adaptive
weight nor LeCam (both are off by default here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LeCamEMA",
    "NLayerDiscriminator",
    "adaptive_gan_weight",
    "dcgan_init",
    "hinge_d_loss",
    "hinge_g_loss",
]


def dcgan_init(m: nn.Module) -> None:
    """DCGAN init as in taming: conv weights ~ N(0, 0.02) (conv biases keep PyTorch's default);
    BatchNorm weight ~ N(1, 0.02), bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: 4x4 convs, LeakyReLU 0.2, BatchNorm; input_nc -> ndf -> 2ndf -> 4ndf (stride 2),
    -> 8ndf (stride 1) -> 1-channel logit map. Convs followed by BatchNorm have no bias.

    With the defaults (3 layers, ndf 64, 3 channels): 2,765,633 parameters (a 32 px image gives a
    2x2 logit map, a 256 px one 30x30). Expects images in [0, 1], as the official code.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        kw, pad = 4, 1
        layers = [nn.Conv2d(input_nc, ndf, kw, stride=2, padding=pad), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=2, padding=pad, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=1, padding=pad, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=pad)]
        self.main = nn.Sequential(*layers)
        self.n_layers = n_layers
        self.apply(dcgan_init)

    def output_size(self, size: int) -> int:
        """Side of the logit map for a ``size`` px input (< 1: too small for this discriminator)."""
        for _ in range(self.n_layers):
            size = (size - 2) // 2 + 1  # 4x4, stride 2, padding 1
        return size - 2  # two 4x4, stride 1, padding 1 convs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(self.output_size(x.shape[-2]), self.output_size(x.shape[-1])) < 1:
            raise ValueError(f"images of {tuple(x.shape[-2:])} px are too small for a {self.n_layers}-layer "
                             f"PatchGAN (24 px at least for 3 layers)")
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean D(fake)."""
    return -logits_fake.mean()


def adaptive_gan_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """VQGAN's balance: ||d nll / d W|| / (||d g / d W|| + eps), clamped to [0, max_weight], detached.

    ``W`` is the decoder's last layer weight. The graph is kept (``retain_graph``) for the real
    backward. The caller multiplies by the configured GAN weight.
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.linalg.vector_norm(nll_grads) / (torch.linalg.vector_norm(g_grads) + eps)
    return w.clamp(0.0, max_weight).detach()


class LeCamEMA(nn.Module):
    """EMAs of D's mean outputs on real and fake images, and the LeCam regulariser built on them.

    ``reg = mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2)``, using the EMAs as
    they stood *before* this step's ``update`` (call ``reg`` first, then ``update``). The EMAs are
    persistent buffers (they travel with the loss module's checkpoint) and start at 0.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def reg(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        return (F.relu(logits_real - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - logits_fake).pow(2).mean())

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        d = self.decay
        self.ema_real.mul_(d).add_(logits_real.detach().float().mean(), alpha=1.0 - d)
        self.ema_fake.mul_(d).add_(logits_fake.detach().float().mean(), alpha=1.0 - d)
