"""MAR: masked autoregressive generation with a per-token diffusion loss, as l-DeTok trains it.

An MAE-style encoder sees the known tokens (plus a buffer of class tokens), a decoder fills the
masked positions with conditions ``z``, and a small diffusion MLP (``DiffLoss``) models each masked
token given its ``z``. Sampling reveals tokens in a random order over ``num_iter`` steps with a
cosine schedule, and classifier-free guidance doubles the batch with the null class.

Parameter names follow ``LTH14/mar`` / l-DeTok's ``models/mar.py`` exactly (``class_emb``,
``fake_latent``, ``z_proj``, ``encoder_blocks.N.attn.qkv``, ``diffloss.net...``), so the released
``mar_base.pth`` / ``mar_large.pth`` load strictly through ``load_official_mar``.

References: Li et al., "Autoregressive Image Generation without Vector Quantization" (NeurIPS 2024),
github.com/LTH14/mar; Yang et al., l-DeTok (ICLR 2026), github.com/Jiawei-Yang/DeTok.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..tokenizers import OfficialCheckpointError
from ..weights import entry, is_spec, resolve
from .base import Generator, patchify, unpatchify
from .diffloss import DiffLoss

__all__ = [
    "MAR", "MAR_models", "MAR_SIZES", "load_official_mar",
    "Attention", "Mlp", "Block", "truncnorm_mask_ratio", "cosine_mask_schedule",
    "random_orders",
]


# ---------------------------------------------------------------------------------------------
# Small helpers shared with ardiff.py
# ---------------------------------------------------------------------------------------------
def _rand(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """U(0,1) drawn on the generator's device (a CPU generator works for any model device)."""
    dev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=dev).to(device)


def random_orders(bsz: int, seq_len: int, generator=None, device="cpu") -> torch.Tensor:
    """(bsz, seq_len) independent random permutations (argsort of uniform noise)."""
    return torch.argsort(_rand((bsz, seq_len), generator, device), dim=1)


def truncnorm_mask_ratio(mask_ratio_min: float = 0.7, generator=None, device="cpu") -> float:
    """MAR's masking-schedule draw: one ratio from N(1.0, 0.25) truncated to [mask_ratio_min, 1]
    (inverse-CDF draw). (``corruption.sample_mask_ratio`` is the tokenizer's, a different distribution.)

    MAR draws one ratio per batch (scipy ``truncnorm((min - 1) / 0.25, 0, loc=1, scale=0.25)``).
    """
    a = torch.tensor((mask_ratio_min - 1.0) / 0.25, dtype=torch.float64)
    lo, hi = torch.special.ndtr(a), torch.tensor(0.5, dtype=torch.float64)
    u = _rand((), generator, "cpu").double()
    ratio = 1.0 + 0.25 * torch.special.ndtri(lo + u * (hi - lo))
    return float(ratio.clamp(mask_ratio_min, 1.0))


def cosine_mask_schedule(seq_len: int, num_iter: int) -> List[int]:
    """Number of tokens still masked *after* each of the ``num_iter`` steps (MaskGIT/MAR cosine).

    After step s, ``floor(L * cos(pi/2 * (s+1)/T))`` tokens stay masked, clipped so that every step
    reveals at least one token (and at least one stays masked until the last step, which reveals
    everything). Returned values are the "mask_len" MAR uses for its linear CFG ramp (the last entry
    is MAR's clipped 1, although 0 tokens remain).
    """
    remaining, out = seq_len, []
    for step in range(num_iter):
        target = math.floor(seq_len * math.cos(math.pi / 2.0 * (step + 1) / num_iter))
        mask_len = max(1, min(remaining - 1, target))
        out.append(mask_len)
        remaining = 0 if step == num_iter - 1 else mask_len
    return out


# ---------------------------------------------------------------------------------------------
# ViT pieces (timm-style names: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)
# ---------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention; optional causal masking and an incremental KV cache (``cache``).

    ``cache`` is any object with ``append(k, v) -> (k_all, v_all)``; queries are the *last* n
    positions of the cached sequence, so causal masking is offset accordingly.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, causal: bool = False, cache=None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = cache.append(k, v)
        m = k.shape[2]
        mask, is_causal = None, False
        if causal and n > 1:
            if m == n:
                is_causal = True
            else:  # n new queries at the end of m keys
                mask = torch.ones(n, m, dtype=torch.bool, device=x.device).tril(m - n)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm ViT block: LayerNorm(eps 1e-6) -> attention, LayerNorm -> GELU MLP."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0, mlp_drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=mlp_drop)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------
# MAR
# ---------------------------------------------------------------------------------------------
class MAR(Generator):
    """Masked autoregressive model over latent tokens with a diffusion head (l-DeTok's MAR).

    ``latent_shape`` (C, h, w); ``patch_size`` p groups p x p latent positions into a token of C*p*p
    channels. The class condition fills a buffer of ``buffer_size`` tokens in front of the sequence;
    the null class (label dropout, CFG) uses the learned ``fake_latent`` instead of ``class_emb``.
    Dropout (attention probabilities, projections) draws from torch's global RNG; every other
    random draw (orders, mask ratio, label dropout, diffusion noise) takes ``generator``.
    """

    kind = "mar"

    def __init__(
        self,
        latent_shape: Sequence[int] = (16, 16, 16),
        num_classes: int = 1000,
        class_dropout: float = 0.1,
        patch_size: int = 1,
        encoder_embed_dim: int = 768,
        encoder_depth: int = 12,
        encoder_num_heads: int = 12,
        decoder_embed_dim: int = 768,
        decoder_depth: int = 12,
        decoder_num_heads: int = 12,
        mlp_ratio: float = 4.0,
        mask_ratio_min: float = 0.7,
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.1,
        no_dropout_in_mlp: bool = True,
        buffer_size: int = 64,
        diffloss_d: int = 3,
        diffloss_w: int = 1024,
        num_sampling_steps: str = "100",
        noise_schedule: str = "cosine",
        diffusion_batch_mul: int = 4,
        num_iter: int = 64,
        grad_checkpointing: bool = False,
    ):
        super().__init__(latent_shape, num_classes, class_dropout)
        c, h, w = self.latent_shape
        p = int(patch_size)
        if p < 1 or h % p or w % p:
            raise ValueError(f"patch_size {patch_size} must divide the latent grid {h}x{w}")
        if not 0.0 <= mask_ratio_min <= 1.0:
            raise ValueError(f"mask_ratio_min must be in [0, 1], got {mask_ratio_min}")
        self._cfg = dict(
            latent_shape=list(self.latent_shape), num_classes=self.num_classes, class_dropout=self.class_dropout,
            patch_size=p, encoder_embed_dim=encoder_embed_dim, encoder_depth=encoder_depth,
            encoder_num_heads=encoder_num_heads, decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, mask_ratio_min=mask_ratio_min,
            attn_dropout=attn_dropout, proj_dropout=proj_dropout, no_dropout_in_mlp=no_dropout_in_mlp,
            buffer_size=buffer_size, diffloss_d=diffloss_d, diffloss_w=diffloss_w,
            num_sampling_steps=str(num_sampling_steps), noise_schedule=noise_schedule,
            diffusion_batch_mul=diffusion_batch_mul, num_iter=num_iter, grad_checkpointing=grad_checkpointing,
        )
        self.patch_size, self.seq_h, self.seq_w = p, h // p, w // p
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = c * p * p
        self.buffer_size = int(buffer_size)
        self.mask_ratio_min = float(mask_ratio_min)
        self.num_iter = int(num_iter)
        self.grad_checkpointing = bool(grad_checkpointing)
        enc, dec = encoder_embed_dim, decoder_embed_dim
        mlp_drop = 0.0 if no_dropout_in_mlp else proj_dropout
        blk = dict(mlp_ratio=mlp_ratio, attn_drop=attn_dropout, proj_drop=proj_dropout, mlp_drop=mlp_drop)

        # Registration order matches the official module, so list-style EMA dumps line up too.
        self.class_emb = nn.Embedding(max(self.num_classes, 1), enc)
        self.fake_latent = nn.Parameter(torch.zeros(1, enc))  # the null-class condition
        # encoder: token projection, buffer + sequence positions, blocks
        self.z_proj = nn.Linear(self.token_embed_dim, enc)
        self.z_proj_ln = nn.LayerNorm(enc, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + self.buffer_size, enc))
        self.encoder_blocks = nn.ModuleList([Block(enc, encoder_num_heads, **blk) for _ in range(encoder_depth)])
        self.encoder_norm = nn.LayerNorm(enc, eps=1e-6)
        # decoder: mask tokens at the unknown positions, blocks, then diffusion positions
        self.decoder_embed = nn.Linear(enc, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + self.buffer_size, dec))
        self.decoder_blocks = nn.ModuleList([Block(dec, decoder_num_heads, **blk) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dec, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, dec))
        self._init_weights()
        # the diffusion head initialises itself (zeroed adaLN and output layers)
        self.diffloss = DiffLoss(
            target_channels=self.token_embed_dim, z_channels=dec, depth=diffloss_d, width=diffloss_w,
            num_sampling_steps=str(num_sampling_steps), schedule=noise_schedule,
            batch_mul=diffusion_batch_mul, grad_checkpointing=grad_checkpointing,
        )

    def _init_weights(self):
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # xavier-uniform as in JAX ViT / MAE
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def config_dict(self) -> dict:
        return dict(self._cfg)

    # -- pieces ---------------------------------------------------------------------------------
    def class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) labels in [0, num_classes] -> (B, D); the null class maps to ``fake_latent``."""
        null = labels == self.null_class
        emb = self.class_emb(labels.clamp(0, self.class_emb.num_embeddings - 1))
        return torch.where(null[:, None], self.fake_latent.to(emb.dtype).expand_as(emb), emb)

    def _run(self, blocks, x):
        for blk in blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x)
        return x

    def forward_mae_encoder(self, tokens: torch.Tensor, mask: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, Ct), mask (B, L) bool (True = unknown, same count per row), class_emb (B, D)."""
        x = self.z_proj(tokens)
        b, _, d = x.shape
        buffer = class_emb.to(x.dtype)[:, None, :].expand(b, self.buffer_size, d)
        x = torch.cat([buffer, x], dim=1) + self.encoder_pos_embed_learned
        x = self.z_proj_ln(x)
        keep = torch.cat([mask.new_zeros(b, self.buffer_size), mask], dim=1).logical_not()
        x = x[keep].view(b, -1, d)  # drop the masked tokens: the encoder sees buffer + known tokens
        return self.encoder_norm(self._run(self.encoder_blocks, x))

    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder output -> per-position conditions z (B, L, D_dec) for the diffusion head."""
        x = self.decoder_embed(x)
        b, _, d = x.shape
        keep = torch.cat([mask.new_zeros(b, self.buffer_size), mask], dim=1).logical_not()
        full = self.mask_token.to(x.dtype).expand(b, keep.shape[1], d).clone()
        full[keep] = x.reshape(-1, d)
        x = self.decoder_norm(self._run(self.decoder_blocks, full + self.decoder_pos_embed_learned))
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned

    # -- training -------------------------------------------------------------------------------
    def loss(self, latents: torch.Tensor, labels: Optional[torch.Tensor] = None, generator=None) -> torch.Tensor:
        self._check_latents(latents)
        b, dev = latents.shape[0], latents.device
        labels = self.prepare_labels(labels, b, dev, generator)
        target = patchify(latents, self.patch_size, channel_major=True)
        orders = random_orders(b, self.seq_len, generator, dev)
        ratio = truncnorm_mask_ratio(self.mask_ratio_min, generator, dev)
        n_masked = min(self.seq_len, max(1, math.ceil(self.seq_len * ratio)))
        mask = torch.zeros(b, self.seq_len, dtype=torch.bool, device=dev)
        mask.scatter_(1, orders[:, :n_masked], True)
        z = self.forward_mae_decoder(self.forward_mae_encoder(target, mask, self.class_embedding(labels)), mask)
        # Only masked tokens carry loss (the official masks a full-sequence loss; same objective).
        return self.diffloss(target[mask], z[mask], None, generator=generator)

    def forward(self, latents, labels=None, generator=None):
        return self.loss(latents, labels, generator)

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, labels=None, guidance_scale: float = 1.0, steps: Optional[int] = None,
               temperature: float = 1.0, generator: Optional[torch.Generator] = None,
               cfg_schedule: str = "linear") -> torch.Tensor:
        """n latents (n, C, h, w) in ``steps`` (default ``num_iter``) masked-AR steps.

        CFG (``guidance_scale != 1``) doubles the batch with the null class; ``cfg_schedule="linear"``
        ramps the scale as ``1 + (guidance_scale - 1) * (L - mask_len) / L`` with mask_len the tokens still
        masked after the step (MAR's formula), ``"constant"`` uses ``guidance_scale`` throughout.
        ``guidance_scale == 1`` never builds the
        null half. ``temperature`` scales the diffusion head's sampling noise. ``steps`` above the
        token count is clipped to it (each step reveals at least one token).
        """
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        num_iter = self.num_iter if steps is None else int(steps)
        if num_iter < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        num_iter = min(num_iter, self.seq_len)  # more steps than tokens would leave empty steps
        dev, L = self.device, self.seq_len
        labels = self.sample_labels(n, labels, dev)
        guided = guidance_scale != 1.0
        cls = self.class_embedding(labels)
        if guided:
            cls = torch.cat([cls, self.class_embedding(torch.full_like(labels, self.null_class))], dim=0)
        tokens = torch.zeros(n, L, self.token_embed_dim, device=dev, dtype=cls.dtype)
        mask = torch.ones(n, L, dtype=torch.bool, device=dev)
        orders = random_orders(n, L, generator, dev)
        schedule = cosine_mask_schedule(L, num_iter)
        for step, mask_len in enumerate(schedule):
            tok_in, mask_in = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
            z = self.forward_mae_decoder(self.forward_mae_encoder(tok_in, mask_in, cls), mask_in)
            if step == num_iter - 1:
                to_pred, mask_next = mask, torch.zeros_like(mask)
            else:
                mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :mask_len], True)
                to_pred = mask & ~mask_next
            scale = (1.0 + (guidance_scale - 1.0) * (L - mask_len) / L if cfg_schedule == "linear"
                     else float(guidance_scale))
            zsel = torch.cat([z[:n][to_pred], z[n:][to_pred]]) if guided else z[to_pred]
            if zsel.shape[0]:
                new = self.diffloss.sample(zsel, temperature=temperature, guidance_scale=scale if guided else 1.0,
                                           generator=generator)
                tokens[to_pred] = new[: int(to_pred.sum())].to(tokens.dtype)
            mask = mask_next
        c, h, w = self.latent_shape
        return unpatchify(tokens, self.patch_size, c, h, w, channel_major=True)


# ---------------------------------------------------------------------------------------------
# Size registry (official sizes configured for l-DeTok's 16-channel 16x16 latents, patch 1)
# ---------------------------------------------------------------------------------------------
_OFFICIAL = dict(latent_shape=(16, 16, 16), num_classes=1000, patch_size=1, buffer_size=64)


# The CPU size differs from the official ones in the DiffLoss noise schedule: linear, not cosine. The
# cosine schedule ends at alpha_bar ~ 2e-9, so the first sampling step multiplies the head's epsilon
# error by ~2e4 (1/sqrt(alpha_bar)); a small head trained for minutes cannot reach that precision and its
# samples blow up (measured: sample std ~900 on unit-variance latents), while the linear schedule
# (alpha_bar_T ~ 4e-5) samples correctly.
_TINY = dict(latent_shape=(16, 4, 4), num_classes=10, buffer_size=4, num_sampling_steps="20", num_iter=8,
             noise_schedule="linear")

# size: (width, depth, heads of encoder and decoder; DiffLoss depth, width; defaults)
MAR_SIZES = {
    "tiny": (128, 2, 4, 2, 128, _TINY),  # CPU: 16x4x4 latents, 10 classes, buffer 4
    "base": (768, 12, 12, 6, 1024, _OFFICIAL),  # DiffLoss d6 w1024 (released 800-ep; the 100-ep ablation uses d3)
    "large": (1024, 16, 16, 8, 1280, _OFFICIAL),  # DiffLoss d8 w1280 (released 800-ep)
    "huge": (1280, 20, 16, 12, 1536, _OFFICIAL),  # DiffLoss d12 w1536 (MAR's recipe)
}


def _mar_builder(size: str):
    width, depth, heads, diffloss_d, diffloss_w, base = MAR_SIZES[size]

    def build(**overrides) -> MAR:
        kw = dict(base, encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
                  decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads,
                  diffloss_d=diffloss_d, diffloss_w=diffloss_w)
        kw.update(overrides)
        return MAR(**kw)

    build.__name__ = build.__qualname__ = f"mar_{size}"
    build.__doc__ = f"MAR at size {size}: {width}/{depth}/{heads}, DiffLoss d{diffloss_d} w{diffloss_w}."
    return build


MAR_models = {f"mar_{size}": _mar_builder(size) for size in MAR_SIZES}


# ---------------------------------------------------------------------------------------------
# Released checkpoints
# ---------------------------------------------------------------------------------------------
def load_official_mar(path, model: Optional[str] = None, ema: bool = True, map_location="cpu", **overrides) -> MAR:
    """Load a released MAR checkpoint (l-DeTok's ``mar_base.pth`` / ``mar_large.pth``, or LTH14/mar's).

    ``path``: a file, or ``released:mar_base`` / ``released:mar_large`` (resolved by ``ldetok.weights``:
    the standard caches, a download where a network exists). ``model`` defaults to the released name's
    size, else ``mar_base``.

    The file is a dict holding ``model`` (a state dict) and ``model_ema`` (EMA parameters by name,
    or a list in parameter order); ``ema=True`` takes the EMA weights, as the official evaluation
    does. Keys and shapes must match exactly. ``overrides`` go to the size builder (``mar_base``...).
    Loaded with ``weights_only=True`` (``argparse.Namespace`` allowed, for LTH14/mar's ``args``).
    """
    if model is None:
        model = entry(path).name if is_spec(path) else "mar_base"
    p = resolve(path) if is_spec(path) else Path(path)
    err = OfficialCheckpointError
    if not p.exists():
        raise FileNotFoundError(
            f"{p}: no such file. The released l-DeTok generators (mar_base.pth, mar_large.pth) come from the "
            f"authors' Hugging Face repository jjiaweiyang/l-DeTok: pass released:mar_base or released:mar_large "
            f"(downloaded where a network exists; `ldetok weights download released:mar_base`), or a path."
        )
    if model not in MAR_models:
        raise ValueError(f"unknown MAR size {model!r}; expected one of {sorted(MAR_models)}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - report the file, keep the cause
        raise err(f"{p}: could not be read as a torch checkpoint with weights_only=True ({e})") from e
    net = MAR_models[model](**overrides)
    if not isinstance(ckpt, dict):
        raise err(f"{p}: expected a dict with 'model' / 'model_ema', found {type(ckpt).__name__}")
    if "model" in ckpt or "model_ema" in ckpt:
        key = "model_ema" if ema else "model"
        if ckpt.get(key) is None:
            other = "model" if ema else "model_ema"
            if ckpt.get(other) is None:
                raise err(f"{p}: neither 'model' nor 'model_ema' holds weights")
            warnings.warn(f"{p}: no {key!r} in the checkpoint; loading {other!r} instead")
            key = other
        state = ckpt[key]
    else:  # a bare state dict
        state = ckpt
    if isinstance(state, (list, tuple)):  # EMA saved as a list in named_parameters() order
        names = [n for n, _ in net.named_parameters()]
        if len(names) != len(state):
            raise err(f"{p}: EMA list holds {len(state)} tensors, model {model} has {len(names)} parameters")
        state = dict(zip(names, state))
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    ours = net.state_dict()
    params = {n for n, _ in net.named_parameters()}
    missing = sorted(k for k in ours if k not in state and k in params)  # derived buffers may be absent
    unexpected = sorted(k for k in state if k not in ours)
    shapes = sorted(k for k in state if k in ours and tuple(state[k].shape) != tuple(ours[k].shape))
    if missing or unexpected or shapes:
        lines = [f"{p}: checkpoint does not match {model} ({net.num_params() / 1e6:.1f}M params)"]
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                lines.append(f"  {what} ({len(keys)}): {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}")
        for k in shapes[:12]:
            lines.append(f"  shape of {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(ours[k].shape)}")
        lines.append("  (released l-DeTok MARs: mar_base with diffloss_d=6, diffloss_w=1024; mar_large with 8/1280)")
        raise err("\n".join(lines))
    full = dict(ours)
    full.update(state)
    net.load_state_dict(full, strict=True)
    return net.eval()
