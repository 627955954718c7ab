"""Tokenizer training losses: pixel, KL, perceptual (LPIPS-VGG16, ConvNeXt-S logits, offline
EfficientNet-Lite0), PatchGAN discriminator; ``TokenizerLoss`` ties them together."""

from .discriminator import (
    LeCamEMA,
    NLayerDiscriminator,
    adaptive_gan_weight,
    dcgan_init,
    hinge_d_loss,
    hinge_g_loss,
)
from .perceptual import (
    LPIPS,
    PERCEPTUAL_NAMES,
    ConvNeXtLogits,
    EffNetLite0Distance,
    FrozenNet,
    WeightedPerceptual,
    build_perceptual,
    load_efficientnet_lite0,
)
from .pixel import PIXEL_LOSSES, kl_loss, pixel_loss, to_unit
from .tokenizer_loss import LossConfig, TokenizerLoss
from .weights import MissingWeightsError, find_weights, hub_checkpoint_dir

__all__ = [
    "LPIPS",
    "PERCEPTUAL_NAMES",
    "PIXEL_LOSSES",
    "ConvNeXtLogits",
    "EffNetLite0Distance",
    "FrozenNet",
    "LeCamEMA",
    "LossConfig",
    "MissingWeightsError",
    "NLayerDiscriminator",
    "TokenizerLoss",
    "WeightedPerceptual",
    "adaptive_gan_weight",
    "build_perceptual",
    "dcgan_init",
    "find_weights",
    "hinge_d_loss",
    "hinge_g_loss",
    "hub_checkpoint_dir",
    "kl_loss",
    "load_efficientnet_lite0",
    "pixel_loss",
    "to_unit",
]
