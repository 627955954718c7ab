"""The tokenizer training loss: pixel + perceptual + KL + PatchGAN, in one module.

Follows the official l-DeTok ``ReconstructionLoss`` (Jiawei-Yang/DeTok):
pixel loss on [0, 1] images, "lpips-convnext_s-1.0-0.1" perceptual loss, KL weight 1e-6, hinge GAN
with weight 0.1 from a start step, everything in float32.

Checkpoint contents: ``state_dict()`` holds only the discriminator (and the LeCam EMAs when LeCam is
on). The perceptual nets are frozen pretrained weights; they are kept out of the registered
submodules (so they are neither saved, nor seen by DDP or ``parameters()``) yet follow ``.to()``,
device moves through ``_apply``, always staying float32.

Engine contract:
- ``loss, logs = loss_fn.generator_loss(target, out.recon, out.posterior, step, last_layer=...)``
- if ``loss_fn.disc_active(step)``: ``d_loss, d_logs = loss_fn.discriminator_loss(target, out.recon, step)``
  and step an optimizer built from ``loss_fn.discriminator.parameters()``. Before the start step
  ``discriminator_loss`` returns a constant 0 that cannot be backpropagated: do not step D then.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .discriminator import LeCamEMA, NLayerDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from .perceptual import _ALIASES, PERCEPTUAL_NAMES, FrozenNet, build_perceptual
from .pixel import PIXEL_LOSSES, kl_loss, pixel_loss, to_unit

__all__ = ["LossConfig", "TokenizerLoss"]

logger = logging.getLogger("ldetok.losses")


@dataclass
class LossConfig:
    pixel_loss: str = "l2"  # "l2" | "l1" | "l2+l1"
    pixel_weight: float = 1.0
    kl_weight: float = 1e-6
    perceptual: str = "lpips-convnext"  # | "lpips" | "convnext" | "effnet_lite0" (offline) | "none"
    perceptual_weight: float = 1.0
    # The paper effectively trained with 0.1: the official CLI flag --discriminator_weight (default
    # 0.5) is never passed to the loss, so its class default 0.1 always applied. Here the configured
    # value is what is used.
    disc_weight: float = 0.1
    disc_start: int = 0  # optimizer step from which the GAN term is on and D is trained
    adaptive_disc_weight: bool = False  # VQGAN last-layer gradient balance (not in the official code)
    lecam_weight: float = 0.0  # LeCam regularisation of D (not in the official code)
    disc_ndf: int = 64
    disc_layers: int = 3
    image_channels: int = 3

    def validate(self) -> LossConfig:
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"LossConfig.pixel_loss must be one of {PIXEL_LOSSES}, got {self.pixel_loss!r}")
        if self.perceptual not in PERCEPTUAL_NAMES and self.perceptual not in _ALIASES:
            raise ValueError(f"LossConfig.perceptual must be one of {PERCEPTUAL_NAMES}, got {self.perceptual!r}")
        for f in ("pixel_weight", "kl_weight", "perceptual_weight", "disc_weight", "lecam_weight"):
            if getattr(self, f) < 0:
                raise ValueError(f"LossConfig.{f} must be >= 0, got {getattr(self, f)}")
        if self.disc_start < 0:
            raise ValueError(f"LossConfig.disc_start must be >= 0, got {self.disc_start}")
        if self.image_channels not in (1, 3):
            raise ValueError(f"LossConfig.image_channels must be 1 or 3, got {self.image_channels}")
        if self.disc_ndf < 1 or self.disc_layers < 1:
            raise ValueError("LossConfig.disc_ndf and disc_layers must be >= 1")
        return self


@contextlib.contextmanager
def _no_param_grads(module: nn.Module):
    """Run ``module`` without building graph edges to its parameters (the generator step must not
    leave gradients on D)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _fp32(device: torch.device):
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


class TokenizerLoss(nn.Module):
    """Generator and discriminator losses of the tokenizer (images in [-1, 1])."""

    def __init__(self, config: LossConfig | None = None, perceptual_net: FrozenNet | None = None):
        """``perceptual_net`` overrides the net that ``config.perceptual`` names (tests, custom nets)."""
        super().__init__()
        self.config = cfg = (config or LossConfig()).validate()
        self.discriminator = NLayerDiscriminator(cfg.image_channels, cfg.disc_ndf, cfg.disc_layers)
        self.lecam = LeCamEMA() if cfg.lecam_weight > 0 else None
        net = perceptual_net
        if net is None and cfg.perceptual_weight > 0:
            net = build_perceptual(cfg.perceptual)
        elif net is None:
            logger.info("perceptual loss: off (perceptual_weight = 0)")
        # stored around nn.Module's registration: not in state_dict(), parameters(), DDP, apply()
        object.__setattr__(self, "_perceptual", net.float().eval() if net is not None else None)
        self.perceptual_name = "none" if net is None else net.name
        logger.info("TokenizerLoss: pixel=%s, perceptual=%s (weight %g), kl_weight=%g, disc_weight=%g from step %d%s%s",
                    cfg.pixel_loss, self.perceptual_name, cfg.perceptual_weight, cfg.kl_weight, cfg.disc_weight,
                    cfg.disc_start, ", adaptive" if cfg.adaptive_disc_weight else "",
                    f", lecam {cfg.lecam_weight:g}" if self.lecam is not None else "")

    @property
    def perceptual(self) -> FrozenNet | None:
        return self._perceptual

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if recurse and self._perceptual is not None:
            self._perceptual._apply(fn)
            self._perceptual.float()  # device moves follow; dtype casts do not (it computes in fp32)
        return self

    def extra_repr(self) -> str:
        return f"perceptual={self.perceptual_name}, config={asdict(self.config)}"

    # ---- schedule ---------------------------------------------------------------------------------
    def disc_active(self, step: int) -> bool:
        """Whether the GAN term is on and D should be trained at optimizer step ``step``."""
        return self.config.disc_weight > 0 and step >= self.config.disc_start

    # ---- losses -----------------------------------------------------------------------------------
    def _check(self, target: torch.Tensor, recon: torch.Tensor) -> None:
        if target.shape != recon.shape:
            raise ValueError(f"target and recon shapes differ: {tuple(target.shape)} vs {tuple(recon.shape)}")
        if target.ndim != 4 or target.shape[1] != self.config.image_channels:
            raise ValueError(f"images must be (B, {self.config.image_channels}, H, W) in [-1, 1] "
                             f"(LossConfig.image_channels), got {tuple(target.shape)}")

    def generator_loss(self, target: torch.Tensor, recon: torch.Tensor, posterior, step: int,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Total tokenizer loss and its logged terms (unweighted values, plus the effective GAN weight).

        ``last_layer``: the decoder's last weight, required when ``adaptive_disc_weight`` is on. Under
        ``torch.no_grad`` (validation) the adaptive weight cannot be computed and is 0, as in VQGAN.
        """
        cfg = self.config
        self._check(target, recon)
        with _fp32(target.device):
            target, recon = target.float(), recon.float()
            pix = pixel_loss(target, recon, cfg.pixel_loss)
            perc = (self._perceptual(target, recon).mean() if self._perceptual is not None and cfg.perceptual_weight > 0
                    else torch.zeros((), device=target.device))
            nll = cfg.pixel_weight * pix + cfg.perceptual_weight * perc
            kl = kl_loss(posterior) if posterior is not None else torch.zeros((), device=target.device)
            loss = nll + cfg.kl_weight * kl

            gan = torch.zeros((), device=target.device)
            gan_weight = torch.zeros((), device=target.device)
            if self.disc_active(step):
                with _no_param_grads(self.discriminator):
                    gan = hinge_g_loss(self.discriminator(to_unit(recon)).float())
                if cfg.adaptive_disc_weight:
                    if last_layer is None:
                        raise ValueError("adaptive_disc_weight=True needs last_layer (the decoder's last weight)")
                    if torch.is_grad_enabled() and gan.requires_grad:
                        gan_weight = adaptive_gan_weight(nll, gan, last_layer) * cfg.disc_weight
                else:
                    gan_weight = torch.full((), cfg.disc_weight, device=target.device)
                loss = loss + gan_weight * gan

        logs = {
            "loss": loss.item(),
            "pixel": pix.item(),
            "perceptual": perc.item(),
            "kl": kl.item(),
            "nll": nll.item(),
            "gan": gan.item(),
            "gan_weight": float(gan_weight),
        }
        return loss, logs

    def discriminator_loss(self, target: torch.Tensor, recon: torch.Tensor, step: int
                           ) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss of D on real ``target`` and detached ``recon`` (+ LeCam when on).

        Before ``disc_start`` (or with ``disc_weight`` 0) returns a constant 0 without running D.
        """
        self._check(target, recon)
        if not self.disc_active(step):
            return torch.zeros((), device=target.device), {"disc_loss": 0.0, "disc_active": 0.0}
        with _fp32(target.device):
            real = to_unit(target.detach().float())
            fake = to_unit(recon.detach().float())
            logits_real = self.discriminator(real).float()
            logits_fake = self.discriminator(fake).float()
            hinge = hinge_d_loss(logits_real, logits_fake)
            loss = hinge
            logs = {"disc_hinge": hinge.item()}
            if self.lecam is not None:
                reg = self.lecam.reg(logits_real, logits_fake)
                loss = loss + self.config.lecam_weight * reg
                if self.training and torch.is_grad_enabled():
                    self.lecam.update(logits_real, logits_fake)
                logs.update(lecam_reg=reg.item(), lecam_ema_real=self.lecam.ema_real.item(),
                            lecam_ema_fake=self.lecam.ema_fake.item())
        logs.update(disc_loss=loss.item(), disc_active=1.0, logits_real=logits_real.mean().item(),
                    logits_fake=logits_fake.mean().item())
        return loss, logs
