"""The demo's logic as plain functions: no gradio here, so every piece is testable without a server.

- input images (``ldetok.demo.images``, re-exported here): ``read_image``, ``prepare_image``,
  ``bundled_photo``, ``fashion_mnist_image``;
- tokenizers: ``parse_spec`` / ``load_tokenizer_spec`` (our run folders and exports, the released
  ``.pth`` files) and ``load_tokenizers`` (never raises: a missing one carries its error and the
  command that makes it); ``default_tokenizer_sets`` (the ``cpu-photos`` runs of ``--prepare`` and
  the Fashion-MNIST runs of ``make run``);
- ``corrupt_and_decode`` (clean and corrupted reconstruction, PSNRs, latents, mask),
  ``latent_pca_image`` (first three principal components as RGB, masked tokens grey),
  ``compare_tokenizers`` (the main panel), ``sweep_gallery`` (the official demo's two sweeps);
- ``prepare_demo_tokenizers`` (trains the two photo tokenizers), ``load_generator`` / ``sample_grid``.

Every tokenizer runs at its own image size (the input is ADM centre-cropped and resized to it); the
outputs are shown at a common display size, upscaled with nearest neighbour so that the tokenizer's
real resolution stays visible.
"""

from __future__ import annotations

import hashlib
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import corruption as C
from ..config import resolve_reproduce_config, resolve_tokenizer_config
from ..data import FASHION_CLASSES, to_uint8
from ..engine.tokenizer_trainer import train_tokenizer
from ..eval.recon import psnr as eval_psnr
from ..main_job import MAIN_PRESET, link_name
from ..reproduce import variant_label
from ..runs import (RunKind, describe, load_generator_run, load_tokenizer, run_corruption, run_kind, run_train_config,
                    tokenizer_meta)
from ..sampling import generate_images
from ..tokenizers import REGISTRY, OfficialCheckpointError, load_official_detok, load_official_marvae
from ..viz import image_grid
from ..weights import MissingWeightsError, is_spec, resolve
from .images import (MAX_INPUT_SIDE, DemoError, InputImage, _to_uint8, bundled_photo, display_size,
                     fashion_mnist_choices, fashion_mnist_image, prepare_image, read_image, to_display,
                     to_model_input)

__all__ = [
    "DemoError", "InputImage", "TokenizerSpec", "DemoTokenizer", "Reconstruction", "DemoGenerator",
    "MAX_INPUT_SIDE", "SWEEP_VALUES", "GREY", "PHOTO_SET", "FMNIST_SET", "CUSTOM_SET",
    "read_image", "prepare_image", "to_model_input", "psnr",
    "parse_spec", "load_tokenizer_spec", "load_tokenizers", "default_tokenizer_sets",
    "corrupt_and_decode", "latent_pca_basis", "latent_pca_image", "compare_tokenizers", "sweep_gallery",
    "display_size", "to_display", "prepare_demo_tokenizers", "load_generator", "sample_grid",
    "bundled_photo", "fashion_mnist_choices", "fashion_mnist_image",
]

SWEEP_VALUES = tuple(round(0.1 * i, 1) for i in range(10))  # t and mask ratio 0 .. 0.9, as the official demo
GREY = 128  # masked tokens in the latent pictures
PHOTO_SET, FMNIST_SET, CUSTOM_SET = "photos", "Fashion-MNIST", "--tokenizer"
PREPARE_HINT = "ldetok demo --prepare"
MAIN_HINT = "make run  (or: ldetok main --out runs/main)"


# =============================================================================================
# Tokenizers
# =============================================================================================
@dataclass
class TokenizerSpec:
    path: str
    label: Optional[str] = None
    hint: Optional[str] = None  # the command that makes it, for the "missing" message


@dataclass
class DemoTokenizer:
    name: str
    source: str
    tok: Optional[torch.nn.Module] = None
    error: Optional[str] = None
    corruption: Optional[C.CorruptionConfig] = None  # what the tokenizer was trained with, when known

    @property
    def ok(self) -> bool:
        return self.tok is not None

    @property
    def image_size(self) -> int:
        cfg = self.tok.config_dict()
        return int(cfg.get("image_size", cfg.get("resolution", 256)))

    @property
    def channels(self) -> int:
        return int(self.tok.config_dict().get("in_channels", 3))


def parse_spec(spec) -> TokenizerSpec:
    """``PATH`` or ``LABEL=PATH`` (a path that exists as written wins over the split)."""
    if isinstance(spec, TokenizerSpec):
        return spec
    if isinstance(spec, (tuple, list)):
        return TokenizerSpec(str(spec[1]), str(spec[0]))
    s = str(spec)
    if "=" in s and not Path(s).exists():
        label, path = s.split("=", 1)
        if label.strip():
            return TokenizerSpec(path, label.strip())
    return TokenizerSpec(s)


_OFFICIAL_RE = re.compile(r"(detok|vitok)[-_]?([A-Za-z]{2,4})", re.IGNORECASE)


def _official_model_and_label(p: Path) -> Tuple[str, str]:
    """``detok-BB-gamm3.0-m0.7-decoder_tuned.pth`` -> ("detok_BB", "l-DeTok BB decoder-tuned")."""
    m = _OFFICIAL_RE.search(p.stem)
    code = m.group(2).upper() if m else "BB"
    model = f"detok_{code}" if f"detok_{code}" in REGISTRY else "detok_BB"
    code = model.split("_", 1)[1]
    stem = p.stem.lower()
    if stem.startswith("vitok"):
        return model, f"ViTok {code} (γ=0, M=0)"
    if "detok" in stem:
        return model, f"l-DeTok {code}" + (" decoder-tuned" if "decoder" in stem else "")
    return model, p.stem


def _run_label(d: Path, corruption: C.CorruptionConfig) -> str:
    name = d.name if d.name != "tokenizer" else d.parent.name
    return f"{name} (γ={corruption.gamma:g}, M={corruption.max_mask_ratio:g})"


def _released_corruption(p: Path) -> Optional[C.CorruptionConfig]:
    """The released files' names carry their recipe: ``detok-BB-gamm3.0-m0.7`` (γ 3, M 0.7); ``vitok``: none."""
    stem = p.stem.lower()
    if stem.startswith("vitok"):
        return C.CorruptionConfig.off()
    g, m = re.search(r"gamm([0-9.]+)", stem), re.search(r"-m([0-9.]+)", stem)
    if g and m:
        return C.CorruptionConfig(gamma=float(g.group(1).rstrip(".")), max_mask_ratio=float(m.group(1).rstrip(".")))
    return None


def load_tokenizer_spec(spec) -> DemoTokenizer:
    """Load one tokenizer; raises ``DemoError`` naming the path (and the command that makes it).

    Accepted: a training run folder (its ``tokenizer/`` export), an exported tokenizer folder
    (``save_tokenizer``), a released l-DeTok ``.pth`` (``detok-BB-gamm3.0-m0.7.pth``, its
    ``-decoder_tuned`` twin, ``vitok-BB.pth``: the size is read from the name, ``detok_BB`` otherwise)
    or MAR's ``kl16.ckpt``; or a released name, ``released:detok_BB`` (``_decoder_tuned``,
    ``released:vitok_BB``, ``released:marvae``), found in the caches or downloaded (``ldetok.weights``).
    """
    s = parse_spec(spec)
    if is_spec(s.path.strip()):
        try:
            s = TokenizerSpec(str(resolve(s.path.strip())), s.label, s.hint)
        except (KeyError, MissingWeightsError) as e:
            raise DemoError(f"{s.path}: {e.args[0]}") from None
    p = Path(s.path).expanduser()
    make = f" Make it with: {s.hint}" if s.hint else ""
    if not p.exists():
        raise DemoError(f"{p}: no such tokenizer (expected a run folder, an exported tokenizer folder or a "
                        f"released .pth file).{make}")
    corruption = None
    try:
        if p.is_file() and p.suffix == ".ckpt":
            tok, label, corruption = load_official_marvae(p), "MAR KL-16 VAE", C.CorruptionConfig.off()
        elif p.is_file():
            model, label = _official_model_and_label(p)
            tok, corruption = load_official_detok(p, model=model), _released_corruption(p)
        else:
            try:
                tok = load_tokenizer(p)
            except FileNotFoundError:
                raise DemoError(f"{p}: holds no finished tokenizer ({describe(p)}; the trainer exports it to "
                                f"tokenizer/ when the run ends).{make}") from None
            corruption = run_corruption(p)
            label = _run_label(p, corruption)
    except (OfficialCheckpointError, KeyError, RuntimeError, OSError, ValueError) as e:
        raise DemoError(f"{p}: could not be loaded as a tokenizer ({e})") from None
    tok = tok.eval().requires_grad_(False)
    return DemoTokenizer(s.label or label, str(p), tok, corruption=corruption)


def default_corruption(tokenizers: Sequence[DemoTokenizer]) -> C.CorruptionConfig:
    """The sliders' starting settings: those of the first loaded tokenizer trained with noise (the
    paper's recipe when none is)."""
    for e in tokenizers:
        if e.ok and e.corruption is not None and e.corruption.noise_on:
            return e.corruption
    return C.CorruptionConfig()


def load_tokenizers(specs) -> List[DemoTokenizer]:
    """Load each spec; never raises: a failure becomes an entry with ``error`` set (shown by the app)."""
    out = []
    for spec in specs:
        s = parse_spec(spec)
        try:
            out.append(load_tokenizer_spec(s))
        except DemoError as e:
            out.append(DemoTokenizer(s.label or Path(s.path).name, s.path, None, str(e)))
    return out


def default_tokenizer_sets(demo_dir="runs/demo", main_dir="runs/main") -> Dict[str, List[TokenizerSpec]]:
    """The default comparison: l-DeTok vs a γ=0/M=0 tokenizer, for photos and for Fashion-MNIST. The
    Fashion-MNIST set holds what the main job links: the tokenizers of its preset (``make run``: l-DeTok at
    the setting confirmed at this scale, and the autoencoder), and the paper's γ=3/M=0.7 l-DeTok as well
    when one is there (``ldetok main --preset cpu-quick``)."""
    demo_dir, main_dir = Path(demo_dir), Path(main_dir)
    variants = [v for v in resolve_reproduce_config(MAIN_PRESET).variants if v != "ae"]
    if "detok" not in variants and (main_dir / link_name("detok")).exists():
        variants.append("detok")
    return {
        PHOTO_SET: [TokenizerSpec(str(demo_dir / "cpu-photos"), "l-DeTok", PREPARE_HINT),
                    TokenizerSpec(str(demo_dir / "cpu-photos-ae"), "AE (γ=0, M=0)", PREPARE_HINT)],
        FMNIST_SET: [TokenizerSpec(str(main_dir / link_name(v)), variant_label(v), MAIN_HINT)
                     for v in variants + ["ae"]],
    }


# =============================================================================================
# Corruption and decoding
# =============================================================================================
@dataclass
class Reconstruction:
    input: np.ndarray  # uint8 (S, S, 3): the input at the tokenizer's size, what the PSNRs compare with
    clean: np.ndarray
    corrupted: np.ndarray
    psnr_clean: float
    psnr_corrupted: float
    z_clean: torch.Tensor  # (C, h, w)
    z_corrupted: torch.Tensor  # (C, h, w), zeros where masked
    mask: Optional[torch.Tensor]  # (h, w) bool, True = masked; None without masking
    notices: List[str] = field(default_factory=list)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of one image (a batch of one) in [-1, 1], by ``ldetok.eval.psnr``; inf when equal."""
    return eval_psnr(x, y)[0]


# Clean reconstructions do not depend on the sliders: a few are cached per tokenizer (weakly, so a
# dropped tokenizer takes its cache with it).
# The app serves several events at once (one worker each), hence the lock.
_CLEAN_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_CLEAN_LOCK = threading.Lock()


def _clean_pass(tok, x: torch.Tensor):
    key = hashlib.sha1(x.numpy().tobytes()).hexdigest() + str(tuple(x.shape))
    with _CLEAN_LOCK:
        cache = _CLEAN_CACHE.setdefault(tok, OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    z = tok.encode(x)
    rec = tok.decode(z).clamp(-1, 1)
    with _CLEAN_LOCK:
        cache[key] = (z, rec)
        while len(cache) > 8:
            cache.popitem(last=False)
    return z, rec


def check_settings(t: float, gamma: float, mask_ratio: float, noise_type: str, seed) -> Tuple[float, float, float, str, int]:
    try:
        t, gamma, mask_ratio = float(t), float(gamma), float(mask_ratio)
    except (TypeError, ValueError):
        raise DemoError(f"settings must be numbers: t={t!r}, gamma={gamma!r}, mask ratio={mask_ratio!r}") from None
    if not 0.0 <= t <= 1.0:
        raise DemoError(f"noise level t must be in [0, 1], got {t}")
    if not 0.0 <= gamma <= 100.0:
        raise DemoError(f"gamma must be in [0, 100], got {gamma}")
    if not 0.0 <= mask_ratio < 1.0:
        raise DemoError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    if noise_type not in C.NOISE:
        raise DemoError(f"noise type must be one of {', '.join(C.NOISE)}, got {noise_type!r}")
    return t, gamma, mask_ratio, noise_type, check_seed(seed)


def check_seed(seed) -> int:
    """A seed for ``torch.Generator.manual_seed``: a whole number in [0, 2**63 - 1] (an int, or a float or
    text holding one, as a number box sends it), else a ``DemoError`` saying so (never wrapped around)."""
    value = None
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        value = int(seed)
    else:
        try:
            f = float(seed)
            value = int(f) if f == int(f) else None
        except (TypeError, ValueError, OverflowError):
            pass
    if value is None or not 0 <= value < 2**63:
        raise DemoError(f"seed must be a whole number in 0 .. {2**63 - 1}, got {seed!r}")
    return value


def _corrupt(tok, x, t, gamma, mask_ratio, noise_type, generator, noise=None, notices=None, z_clean=None):
    """(recon, corrupted latents NCHW, mask (B, L) or None) through the denoising pass with the sliders'
    draw (``ldetok.corruption.denoising_forward``, posterior mean). γ = 0 means no noise (as in training).

    Without masking, the cached clean latents are noised in the working layout (the same draws and values
    as the denoising pass at mask ratio 0) and only the decoder runs: half the work per slider move.
    """
    cfg = C.CorruptionConfig(noise_type=noise_type, gamma=gamma, max_mask_ratio=0.0)
    if mask_ratio > 0 and tok.num_tokens is None:
        if notices is not None:
            notices.append("this tokenizer has no token masking: mask ratio ignored")
        mask_ratio = 0.0
    if mask_ratio <= 0 and z_clean is not None:
        zt = tok.nchw_to_visible(z_clean)
        if gamma > 0:
            zt = C.apply_noise(zt, t, gamma, noise_type, generator, noise)
        return tok.decode_visible(zt).clamp(-1, 1), tok.visible_to_nchw(zt), None
    draw = C.CorruptionDraw(mask_ratio, torch.full((x.shape[0],), float(t)))
    out = C.denoising_forward(tok, x, cfg, generator, draw=draw, sample=False, noise=noise)
    return out.recon.clamp(-1, 1), out.latents, out.mask


@torch.no_grad()
def corrupt_and_decode(tok, image, t: float = 0.5, gamma: float = 3.0, mask_ratio: float = 0.0,
                       noise_type: str = "interpolative", seed: int = 0) -> Reconstruction:
    """Decode the clean latents and the latents corrupted as the sliders say, at the tokenizer's size.

    Noise ``(1 - t) z + t γ ε`` (interpolative) or ``z + t γ ε`` (additive) on the visible latents;
    MAE masking at ``mask_ratio`` in the encoder, mask tokens in the decoder (the denoising pass);
    ε and the mask are drawn from ``seed``, so moving t keeps the same ε. ``tok`` is a ``DemoTokenizer``
    or a tokenizer; ``image`` anything ``prepare_image`` takes.
    """
    t, gamma, mask_ratio, noise_type, seed = check_settings(t, gamma, mask_ratio, noise_type, seed)
    entry = tok if isinstance(tok, DemoTokenizer) else DemoTokenizer("tokenizer", "", tok)
    if not entry.ok:
        raise DemoError(entry.error or f"{entry.name}: not loaded")
    model = entry.tok
    img = prepare_image(image)
    x = to_model_input(img.pixels, entry.image_size, entry.channels)
    z, clean = _clean_pass(model, x)
    notices: List[str] = []
    g = torch.Generator().manual_seed(seed)
    rec, zc, mask = _corrupt(model, x, t, gamma, mask_ratio, noise_type, g, notices=notices, z_clean=z)
    h, w = z.shape[-2:]
    mask_hw = None if mask is None else (mask[0] > 0.5).reshape(h, w)
    return Reconstruction(_to_uint8(x), _to_uint8(clean), _to_uint8(rec), psnr(x, clean), psnr(x, rec),
                          z[0].float(), zc[0].float(), mask_hw, notices)


# =============================================================================================
# Latent pictures
# =============================================================================================
def latent_pca_basis(z: torch.Tensor):
    """(mean, components (3, C), lo (3,), hi (3,)) of the tokens of ``z`` (C, h, w) or (1, C, h, w).

    Components are signed so that each one's largest loading is positive (stable colours); lo/hi
    are the 1st/99th percentiles of the projections, the colour range.
    """
    z = z.detach().float().cpu()
    if z.ndim == 4:
        z = z[0]
    c = z.shape[0]
    tokens = z.reshape(c, -1).T  # (N, C)
    mean = tokens.mean(0)
    centred = tokens - mean
    comps = torch.zeros(3, c)
    if centred.abs().max() > 0:
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        k = min(3, vh.shape[0])
        comps[:k] = vh[:k]
    idx = comps.abs().argmax(1)
    sign = torch.sign(comps[torch.arange(3), idx])
    comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]
    proj = centred @ comps.T
    lo = torch.quantile(proj, 0.01, dim=0)
    hi = torch.quantile(proj, 0.99, dim=0)
    return mean, comps, lo, hi


def latent_pca_image(z: torch.Tensor, mask: Optional[torch.Tensor] = None, basis=None) -> np.ndarray:
    """Latents (C, h, w) as a uint8 (h, w, 3) picture: the first three principal components as RGB.

    ``basis`` (from ``latent_pca_basis``, default: that of ``z`` itself) lets the corrupted latents be
    drawn in the clean latents' colours. Tokens where ``mask`` (h, w) is true are grey (``GREY``).
    """
    z = z.detach().float().cpu()
    if z.ndim == 4:
        z = z[0]
    if z.ndim != 3:
        raise ValueError(f"latents must be (C, h, w) or (1, C, h, w), got {tuple(z.shape)}")
    c, h, w = z.shape
    mean, comps, lo, hi = basis if basis is not None else latent_pca_basis(z)
    proj = (z.reshape(c, -1).T - mean) @ comps.T  # (N, 3)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    img = to_uint8(rgb, value_range=(0.0, 1.0)).reshape(h, w, 3).numpy().copy()
    if mask is not None:
        m = torch.as_tensor(mask).reshape(h, w).bool().numpy()
        img[m] = GREY
    return img


# =============================================================================================
# The panels
# =============================================================================================
def _fmt_db(v: float) -> str:
    return "∞" if v == float("inf") else f"{v:.2f} dB"


def compare_tokenizers(tokenizers: Sequence[DemoTokenizer], image, t=0.5, gamma=3.0, mask_ratio=0.0,
                       noise_type="interpolative", seed=0, display: Optional[int] = None):
    """The main panel: ``(gallery items, markdown table)``.

    Gallery: five pictures per tokenizer (input at its size, clean reconstruction, corrupted
    reconstruction, clean latents, corrupted latents), each ``(uint8 image, caption)`` at the common
    display size. Table: one row per tokenizer with its size and PSNRs, or what is missing and how
    to make it.
    """
    t, gamma, mask_ratio, noise_type, seed = check_settings(t, gamma, mask_ratio, noise_type, seed)
    img = prepare_image(image)
    ready = [e for e in tokenizers if e.ok]
    size = display or display_size([e.image_size for e in ready])
    items, rows = [], []
    corr = f"Corrupted: t = {t:g}, γ = {gamma:g}, mask ratio {mask_ratio:g}, {noise_type} noise, seed {seed}."
    for e in tokenizers:
        if not e.ok:
            rows.append(f"| {e.name} | – | – | – | {e.error} |")
            continue
        r = corrupt_and_decode(e, img, t, gamma, mask_ratio, noise_type, seed)
        basis = latent_pca_basis(r.z_clean)
        zc_img = latent_pca_image(r.z_corrupted, r.mask, basis)
        c, h, w = r.z_clean.shape
        items += [  # a row per tokenizer; its name leads the row, short captions fit under thumbnails
            (to_display(r.input, size), f"{e.name}, {e.image_size} px"),
            (to_display(r.clean, size), f"clean: {_fmt_db(r.psnr_clean)}"),
            (to_display(r.corrupted, size), f"corrupted: {_fmt_db(r.psnr_corrupted)}"),
            (to_display(latent_pca_image(r.z_clean, None, basis), size), f"latents {c}x{h}x{w}"),
            (to_display(zc_img, size), "corrupted latents" + (" (grey: masked)" if r.mask is not None else "")),
        ]
        rows.append(f"| {e.name} | {e.image_size} px, {c}x{h}x{w} | {_fmt_db(r.psnr_clean)} | "
                    f"{_fmt_db(r.psnr_corrupted)} | {'; '.join(r.notices)} |")
    head = (f"{corr}\n\n| tokenizer | size, latents | PSNR clean | PSNR corrupted | note |\n"
            "|---|---|---|---|---|\n")
    table = head + "\n".join(rows)
    if not ready:
        table += "\n\n**No tokenizer is available yet.** See the notes above for the command that makes one."
    if gamma == 0:
        table += "\n\nγ = 0: no noise is added (t has no effect)."
    return items, table


def _sweep_caption(name: str, what: str, value, first: bool) -> str:
    """The row's first picture names the tokenizer; the others only their value (thumbnail captions are short)."""
    return f"{name}: {what}={float(value):g}" if first else f"{what}={float(value):g}"


@torch.no_grad()
def sweep_gallery(tokenizers: Sequence[DemoTokenizer], image, gamma: float = 3.0, noise_type: str = "interpolative",
                  seed: int = 18, levels: Sequence[float] = SWEEP_VALUES, ratios: Sequence[float] = SWEEP_VALUES,
                  display: int = 96):
    """The official demo's two sweeps for each tokenizer: decode the latents noised at each ``t`` (one
    shared ε) and masked at each ratio (one mask draw per ratio from ``seed``).

    Returns gallery items ``(uint8 image, caption)``, row by row: per tokenizer a noise row
    (``len(levels)`` pictures) then a mask row (``len(ratios)``).
    """
    _, gamma, _, noise_type, seed = check_settings(0.0, gamma, 0.0, noise_type, seed)
    for v in list(levels) + list(ratios):
        if not 0 <= float(v) < 1.0 + 1e-9:
            raise DemoError(f"sweep values must be in [0, 1], got {v}")
    img = prepare_image(image)
    if not any(e.ok for e in tokenizers):
        raise DemoError("no tokenizer to sweep: " + ("; ".join(e.error or e.name for e in tokenizers) or "none given"))
    items = []
    for e in tokenizers:
        if not e.ok:
            continue
        model = e.tok
        x = to_model_input(img.pixels, e.image_size, e.channels)
        z, clean = _clean_pass(model, x)
        g = torch.Generator().manual_seed(seed)
        # the ε the denoising pass would draw first with this seed (mask ratio 0), shared by every t
        eps = torch.randn(model.nchw_to_visible(z).shape, generator=g)
        for tv in levels:
            rec, _, _ = _corrupt(model, x, float(tv), gamma, 0.0, noise_type, None, noise=eps, z_clean=z)
            items.append((to_display(_to_uint8(rec), display), _sweep_caption(e.name, "t", tv, tv == levels[0])))
        for rv in ratios:
            if float(rv) <= 0 or model.num_tokens is None:
                rec = clean
            else:
                g = torch.Generator().manual_seed(seed)
                rec, _, _ = _corrupt(model, x, 0.0, 0.0, min(float(rv), 0.999), noise_type, g)
            items.append((to_display(_to_uint8(rec), display), _sweep_caption(e.name, "mask", rv, rv == ratios[0])))
    return items


# =============================================================================================
# Preparing the default tokenizers
# =============================================================================================
def _finished_step(run: Path) -> int:
    if run_kind(run) != RunKind.TOKENIZER_RUN:
        return -1
    try:
        return int(tokenizer_meta(run).get("step", 0))
    except (ValueError, OSError):
        return -1


def prepare_demo_tokenizers(out_dir="runs/demo", steps: int = 800, presets: Sequence[str] = ("cpu-photos", "cpu-photos-ae"),
                            overrides: Optional[dict] = None, log: Callable[[str], None] = print) -> List[Path]:
    """Train the photo tokenizers the demo compares (l-DeTok and γ=0/M=0) into ``out_dir/<preset>``.

    A run already exported at ``>= steps`` is kept; an unfinished one resumes. Progress is printed by
    the trainer. Returns the run folders.
    """
    if int(steps) < 1:
        raise DemoError(f"steps must be >= 1, got {steps}")
    runs = []
    for preset in presets:
        run = Path(out_dir) / preset
        runs.append(run)
        done = _finished_step(run)
        if done >= steps:
            log(f"{run}: ready (trained {done} steps)")
            continue
        log(f"{run}: training preset {preset} for {steps} steps (a few minutes on a CPU)")
        cfg = resolve_tokenizer_config(preset, {"max_steps": int(steps), "tensorboard": False, **(overrides or {})})
        train_tokenizer(cfg, run)
    return runs


# =============================================================================================
# Generators
# =============================================================================================
@dataclass
class DemoGenerator:
    name: str
    source: str
    gen: Optional[torch.nn.Module] = None
    tok: Optional[torch.nn.Module] = None
    meta: dict = field(default_factory=dict)
    class_names: List[str] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.gen is not None


def _class_names(meta: dict, n: int) -> List[str]:
    try:
        dataset = run_train_config(str(meta.get("tokenizer", ""))).data.dataset
    except (ValueError, OSError):
        dataset = None
    if dataset in ("fashion_mnist", "fmnist") and n == 10:
        return list(FASHION_CLASSES)
    return [f"class {i}" for i in range(n)]


def load_generator(run) -> DemoGenerator:
    """A finished generator run (``load_generator_run``); never raises: errors go to ``.error``."""
    p = Path(run).expanduser()
    hint = "train one with: ldetok train-generator --preset cpu-fmnist --tokenizer runs/main/cpu-fmnist --out RUN"
    if not p.exists():
        return DemoGenerator(p.name, str(p), error=f"{p}: no such generator run; {hint}")
    try:
        gen, tok, meta = load_generator_run(p)
    except (FileNotFoundError, KeyError, RuntimeError, ValueError, OSError) as e:
        return DemoGenerator(p.name, str(p), error=f"{p}: could not be loaded as a generator run ({e}); {hint}")
    gen.requires_grad_(False)
    tok.requires_grad_(False)
    name = f"{meta.get('name', gen.kind)} ({p.name})"
    return DemoGenerator(name, str(p), gen, tok, meta, _class_names(meta, gen.num_classes))


@torch.no_grad()
def sample_grid(g: DemoGenerator, class_index: Optional[int] = None, cfg: float = 1.5, steps: Optional[int] = 50,
                seed: int = 0, n: int = 16, display: int = 64) -> np.ndarray:
    """``n`` samples of one class (``None``: class-balanced) as a uint8 grid image, tiles at ``display`` px."""
    if not g.ok:
        raise DemoError(g.error or "no generator loaded")
    try:
        cfg, n = float(cfg), int(n)
        steps = None if steps in (None, "", 0) else int(steps)
    except (TypeError, ValueError, OverflowError):
        raise DemoError(f"cfg, steps and n must be numbers (got {cfg!r}, {steps!r}, {n!r})") from None
    seed = check_seed(seed)
    if not 1 <= n <= 64:
        raise DemoError(f"n must be in 1 .. 64, got {n}")
    if cfg < 0 or (steps is not None and not 1 <= steps <= 1000):
        raise DemoError(f"cfg must be >= 0 and steps in 1 .. 1000 (got cfg {cfg}, steps {steps})")
    labels = None
    if class_index is not None and g.gen.num_classes:
        c = int(class_index)
        if not 0 <= c < g.gen.num_classes:
            raise DemoError(f"class must be in 0 .. {g.gen.num_classes - 1}, got {c}")
        labels = [c] * n
    images, _ = generate_images(g.gen, g.tok, n, guidance_scale=cfg, steps=steps, seed=seed, labels=labels)
    tiles = np.stack([to_display(_to_uint8(im), display) for im in images])  # (n, display, display, 3)
    return image_grid(torch.from_numpy(tiles).permute(0, 3, 1, 2), nrow=int(np.ceil(np.sqrt(n))))

