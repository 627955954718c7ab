"""Convolutional KL-VAE (LDM / MAR style); trained with l-DeTok latent noise through the denoising pass.

The module layout and state-dict key names follow the LDM ``AutoencoderKL`` as released with MAR
(``kl16.ckpt``: ch 128, ch_mult (1, 1, 2, 2, 4), two res blocks per level, attention at resolution 16
in the encoder only, 16 latent channels at stride 16), so that checkpoint loads strictly into the
``marvae`` config. The same class, at tiny sizes, is the CPU-trainable conv baseline, and trained with
``corruption.gamma > 0`` it is the paper's "latent denoising applied to a conv VAE" variant (noise only:
it has no tokens to mask, ``num_tokens`` is None).

Key layout (``i`` = level, 0 = full resolution; ``j`` = block)::

    encoder.conv_in | encoder.down.{i}.block.{j} | encoder.down.{i}.attn.{j}
    encoder.down.{i}.downsample.conv (all levels but the last)
    encoder.mid.{block_1, attn_1, block_2} | encoder.norm_out | encoder.conv_out
    quant_conv | post_quant_conv
    decoder.conv_in | decoder.mid.{block_1, attn_1, block_2}
    decoder.up.{i}.block.{j} | decoder.up.{i}.attn.{j} | decoder.up.{i}.upsample.conv (i > 0)
    decoder.norm_out | decoder.conv_out

A ResnetBlock holds ``norm1, conv1, norm2, conv2`` (+ ``nin_shortcut`` 1x1 when channels change);
an AttnBlock holds ``norm, q, k, v, proj_out`` (all 1x1 convs).

References: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022);
Li et al., "Autoregressive Image Generation without Vector Quantization" (MAR, NeurIPS 2024);
Yang et al., "Latent Denoising Makes Good Tokenizers" (ICLR 2026).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import is_spec, resolve
from .base import Tokenizer

__all__ = [
    "CONVVAE_CONFIGS",
    "MAR_SCALE_FACTOR",
    "AttnBlock",
    "ConvVAE",
    "OfficialLoadReport",
    "ResnetBlock",
    "build_convvae",
    "load_official_marvae",
]

log = logging.getLogger(__name__)

# MAR multiplies KL-16 posterior samples by this constant ("normalize the std of latent to be 1").
MAR_SCALE_FACTOR = 0.2325


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------
def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # eps 1e-6 and affine, as in LDM: the released weights were trained with exactly this norm.
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1 when channels change) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, channels as the head dim, residual."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # (B, 1, hw, c): one head; SDPA's default scale 1/sqrt(c) is LDM's scale.
        q, k, v = (m(n).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom only (LDM's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block`` (res blocks), ``attn`` (empty or one per block), a resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for j, blk in enumerate(self.block):
            h = blk(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


# ---------------------------------------------------------------------------------------------
# Encoder / decoder
# ---------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, out_channels,
                 groups, dropout):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in, res = ch, resolution
        for i, m in enumerate(ch_mult):
            c_out = ch * m
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, groups, dropout))
                c_in = c_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(c_out, groups))
            level = _Level(blocks, attns)
            if i != len(ch_mult) - 1:  # no downsample after the last level
                level.downsample = Downsample(c_out)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(c_in, groups, dropout)
        self.norm_out = _norm(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Mirror of the encoder with ``num_res_blocks + 1`` blocks per level.

    ``up[i]`` is the level at resolution ``resolution / 2**i`` (``up[0]`` is full resolution), as in LDM,
    which builds the list from the bottom and prepends; the forward pass runs it from the last index down.
    """

    def __init__(self, z_channels, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, out_channels,
                 groups, dropout):
        super().__init__()
        n = len(ch_mult)
        c_bottom = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_bottom, 3, padding=1)
        self.mid = _Mid(c_bottom, groups, dropout)
        levels = []
        for i in range(n):
            c_in = ch * ch_mult[i + 1] if i < n - 1 else c_bottom  # what the level below hands up
            c_out = ch * ch_mult[i]
            res = resolution // 2**i
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out, groups, dropout))
                c_in = c_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(c_out, groups))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(c_out)
            levels.append(level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch * ch_mult[0], groups)
        self.conv_out = nn.Conv2d(ch * ch_mult[0], out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------
class ConvVAE(Tokenizer):
    """LDM/MAR KL-VAE as a ``Tokenizer``.

    ``attn_resolutions_*`` are feature-map sizes at the nominal input ``resolution`` (other input sizes
    work; they only decide which levels carry attention). ``stride = 2 ** (len(ch_mult) - 1)``.
    """

    kind = "convvae"

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions_enc: Sequence[int] = (16,),
        attn_resolutions_dec: Sequence[int] = (),
        resolution: int = 256,
        z_channels: int = 16,
        embed_dim: int = 16,
        norm_groups: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_enc = tuple(int(r) for r in attn_resolutions_enc)
        attn_dec = tuple(int(r) for r in attn_resolutions_dec)
        self._validate(ch, ch_mult, num_res_blocks, attn_enc, attn_dec, resolution, z_channels, embed_dim,
                       norm_groups, dropout)
        self.config = {
            "in_channels": in_channels, "out_channels": out_channels, "ch": ch, "ch_mult": ch_mult,
            "num_res_blocks": num_res_blocks, "attn_resolutions_enc": attn_enc,
            "attn_resolutions_dec": attn_dec, "resolution": resolution, "z_channels": z_channels,
            "embed_dim": embed_dim, "norm_groups": norm_groups, "dropout": dropout,
        }
        self.stride = 2 ** (len(ch_mult) - 1)
        self.latent_channels = embed_dim

        # Registration order = official key order: encoder, decoder, quant_conv, post_quant_conv.
        self.encoder = Encoder(in_channels, ch, ch_mult, num_res_blocks, attn_enc, resolution,
                               2 * z_channels, norm_groups, dropout)  # double_z: mean and logvar
        self.decoder = Decoder(z_channels, ch, ch_mult, num_res_blocks, attn_dec, resolution,
                               out_channels, norm_groups, dropout)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self._init_stats(embed_dim)

    def config_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items()}

    def freeze_all_but_decoder(self) -> None:
        """Decoder fine-tuning: the decoder and ``post_quant_conv`` train, the rest is frozen."""
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))

    @staticmethod
    def _validate(ch, ch_mult, num_res_blocks, attn_enc, attn_dec, resolution, z_channels, embed_dim,
                  norm_groups, dropout) -> None:
        if not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult}")
        for name, v in (("ch", ch), ("num_res_blocks", num_res_blocks), ("resolution", resolution),
                        ("z_channels", z_channels), ("embed_dim", embed_dim), ("norm_groups", norm_groups)):
            if int(v) < 1:
                raise ValueError(f"{name} must be a positive int, got {v}")
        bad = sorted({ch * m for m in ch_mult if (ch * m) % norm_groups})
        if bad:
            raise ValueError(f"GroupNorm needs channel counts divisible by norm_groups={norm_groups}; "
                             f"ch={ch} x ch_mult={ch_mult} gives {bad}")
        levels = {resolution // 2**i for i in range(len(ch_mult))}
        for name, rs in (("attn_resolutions_enc", attn_enc), ("attn_resolutions_dec", attn_dec)):
            missing = [r for r in rs if r not in levels]
            if missing:
                raise ValueError(f"{name} {missing} match no level; at resolution {resolution} the "
                                 f"levels are {sorted(levels, reverse=True)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    # ---- Tokenizer hooks --------------------------------------------------------------------
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> NCHW ``[mean, logvar]`` (B, 2 * embed_dim, H / stride, W / stride)."""
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        if x.shape[-1] % self.stride or x.shape[-2] % self.stride:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the stride {self.stride}")
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, embed_dim, h, w) -> images in [-1, 1] space (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def extra_repr(self) -> str:
        c = self.config
        return f"ch={c['ch']}, ch_mult={c['ch_mult']}, stride={self.stride}, embed_dim={c['embed_dim']}"


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
def _cfg(ch, ch_mult, num_res_blocks, attn_enc, resolution, norm_groups, embed_dim=16) -> dict:
    return {
        "in_channels": 3, "out_channels": 3, "ch": ch, "ch_mult": ch_mult, "num_res_blocks": num_res_blocks,
        "attn_resolutions_enc": attn_enc, "attn_resolutions_dec": (), "resolution": resolution,
        "z_channels": embed_dim, "embed_dim": embed_dim, "norm_groups": norm_groups,
    }


CONVVAE_CONFIGS: dict[str, dict] = {
    # MAR's KL-16 (kl16.ckpt), 66.5M params: LDM encoder/decoder, attention only in the encoder's
    # 16x16 level (and in both mid blocks); MAR builds its decoder with the default attn_resolutions=().
    "marvae": _cfg(128, (1, 1, 2, 2, 4), 2, (16,), 256, 32),
    # CPU sizes for 32x32 images. tiny: stride 8 -> 4x4x16 latents (1.3M params);
    # tiny_f16: stride 16 -> 2x2x16 (3.2M params).
    "convvae_tiny": _cfg(32, (1, 2, 2, 2), 1, (4,), 32, 8),
    "convvae_tiny_f16": _cfg(32, (1, 1, 2, 2, 4), 1, (2,), 32, 8),
    # A mid size for 64x64 images (stride 16 -> 4x4x16, 16.7M params): marvae's layout at half width.
    "convvae_small": _cfg(64, (1, 1, 2, 2, 4), 2, (4,), 64, 32),
}


def build_convvae(name: str, **overrides) -> ConvVAE:
    """A ``ConvVAE`` from a registry name; ``overrides`` replace config entries (e.g. ``resolution=32``)."""
    if name not in CONVVAE_CONFIGS:
        raise ValueError(f"unknown ConvVAE config {name!r}; expected one of {sorted(CONVVAE_CONFIGS)}")
    cfg = dict(CONVVAE_CONFIGS[name])
    cfg.update(overrides)
    try:
        return ConvVAE(**cfg)
    except TypeError as e:  # an override that is no constructor argument
        raise TypeError(f"bad override for ConvVAE config {name!r}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Official weights
# ---------------------------------------------------------------------------------------------
@dataclass
class OfficialLoadReport:
    """What ``load_official_marvae`` did: loaded key count and the training-only keys it dropped."""

    path: str
    container: str  # "model", "state_dict" or "raw"
    loaded: int
    dropped: list[str] = field(default_factory=list)  # ``loss.*`` keys (LPIPS, discriminator, logvar)


_DROPPABLE_PREFIXES = ("loss.",)


def _extract_state_dict(ckpt, path) -> tuple[Mapping[str, torch.Tensor], str]:
    if not isinstance(ckpt, Mapping):
        raise TypeError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    for key in ("model", "state_dict"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            return ckpt[key], key
    return ckpt, "raw"


def load_official_marvae(path, map_location="cpu", **overrides) -> ConvVAE:
    """Load MAR's released KL-16 VAE (``kl16.ckpt``; a path or ``released:marvae``, resolved by
    ``ldetok.weights``) strictly into the ``marvae`` config, in eval mode.

    The file may hold ``{"model": sd}`` (MAR's layout), ``{"state_dict": sd}`` (LDM/Lightning) or the raw
    state dict. ``loss.*`` keys (an LDM training checkpoint's LPIPS/discriminator) are dropped, counted and
    reported in ``model.official_load_report``; any other missing, unexpected or mis-shaped key is an error
    listing them. ``overrides`` change the config (a tiny variant in tests).

    Latent statistics: MAR feeds generators ``posterior.sample() * 0.2325`` with no mean shift, so the
    stats are set to mean 0, std 1 / 0.2325 in every channel; ``tokenize(x) == encode(x) * 0.2325``.
    """
    path = resolve(path) if is_spec(path) else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MAR KL-16 VAE checkpoint not found: {path}. It is the file `kl16.ckpt` of the MAR release "
            "(github.com/LTH14/mar; the l-DeTok code reads it as pretrained_models/vae/marvae_kl16.ckpt). "
            "Pass its path, or "
            "released:marvae (`ldetok weights download released:marvae` on a machine with network, or "
            "set LDETOK_MARVAE_WEIGHTS)."
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # never fall back to unpickling arbitrary objects
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers, so it cannot be loaded with "
            "weights_only=True. Re-save just its state dict (torch.save({'model': sd}, ...)) on a machine "
            f"you trust. Original error: {e}"
        ) from e
    sd, container = _extract_state_dict(ckpt, path)

    with torch.device("meta"):  # no init work or memory for weights about to be replaced
        model = build_convvae("marvae", **overrides)
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in Tokenizer.STATS_KEYS}

    dropped = sorted(k for k in sd if k.startswith(_DROPPABLE_PREFIXES))
    kept = {k: v for k, v in sd.items() if not k.startswith(_DROPPABLE_PREFIXES)}
    missing = sorted(set(expected) - set(kept))
    unexpected = sorted(set(kept) - set(expected))
    bad_shape = sorted(
        f"{k}: file {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__} "
        f"vs model {tuple(expected[k])}"
        for k, v in kept.items()
        if k in expected and (not isinstance(v, torch.Tensor) or v.shape != expected[k])
    )
    if missing or unexpected or bad_shape:
        lines = [f"{path} ({container} state dict) does not match the marvae layout:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if bad_shape:
            lines.append(f"  shape mismatches ({len(bad_shape)}): {bad_shape}")
        if any(k.startswith("module.") for k in unexpected):
            lines.append("  (keys start with 'module.': the file was saved from a DDP wrapper; "
                         "strip the prefix)")
        raise ValueError("\n".join(lines))

    # fp32 copies (a half-precision file still gives an fp32 model, as loading into MAR's would).
    full = {k: (v.float() if v.is_floating_point() else v) for k, v in kept.items()}
    dev = next(iter(full.values())).device if full else torch.device("cpu")
    full["latent_mean"] = torch.zeros(model.latent_channels, device=dev)
    full["latent_std"] = torch.ones(model.latent_channels, device=dev)
    full["stats_set"] = torch.zeros((), dtype=torch.bool, device=dev)
    model.load_state_dict(full, strict=True, assign=True)
    model.set_latent_stats(mean=0.0, std=1.0 / MAR_SCALE_FACTOR)
    model.eval()

    model.official_load_report = OfficialLoadReport(str(path), container, len(kept), dropped)
    if dropped:
        log.info("load_official_marvae: dropped %d training-only keys (%s...) from %s",
                 len(dropped), ", ".join(dropped[:3]), path)
    log.info("load_official_marvae: loaded %d tensors from %s (%s)", len(kept), path, container)
    return model
