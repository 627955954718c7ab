"""Typed training configs, named presets (the paper's recipes and CPU-sized ones), and ``key=value``
overrides with type checking.

A training config is a tree of dataclasses: the tokenizer's ``model`` (architecture and size),
``corruption`` (``ldetok.corruption.CorruptionConfig``), ``data``, ``losses``, and the sub-configs both
trainers share, ``optim`` (optimizer, schedule, length, EMA) and ``run`` (seed, placement, bookkeeping).
Every field is reachable by its dotted path (``corruption.gamma=0``) or, where the name is unique in the
tree, by its own name (``gamma=0``, ``max_steps=200``). A preset is a dict of such overrides on top of the
defaults; ``resolve(...)`` returns a validated config, refusing unknown keys or badly typed values
before any work starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import generators, tokenizers
from .corruption import CorruptionConfig
from .data import DATASETS
from .losses import PERCEPTUAL_NAMES

__all__ = ["TokenizerModelConfig", "DataConfig", "TokenizerLossConfig", "OptimConfig", "RunConfig",
           "TokenizerTrainConfig", "GeneratorTrainConfig", "TOKENIZER_PRESETS", "GENERATOR_PRESETS", "VARIANTS",
           "variant_settings",
           "resolve_tokenizer_config", "resolve_generator_config", "parse_overrides", "apply_overrides",
           "config_diff", "config_from_dict", "flatten", "to_json", "SCHEDULES", "PRECISIONS", "ReproduceConfig",
           "REPRODUCE_PRESETS", "resolve_reproduce_config", "SamplingProtocol", "OFFICIAL_SAMPLING",
           "SAMPLING_KEYS", "parse_family_settings", "DECODER_FT_PRESETS", "PRESET_MODEL_ARGS", "generator_arg_names",
           "model_args_errors"]

SCHEDULES = ("cosine", "constant", "linear")
PRECISIONS = ("auto", "fp32", "bf16")
PIXEL_LOSSES = ("l2", "l1", "l2+l1")
STAGES = ("pretrain", "decoder_ft")


# ---------------------------------------------------------------------------------------------
# Sub-configs
# ---------------------------------------------------------------------------------------------
@dataclass
class TokenizerModelConfig:
    name: str = "detok_MM"  # a tokenizer registry name (ldetok.tokenizers.available())
    image_size: int = 32
    patch_size: int = 8
    in_channels: int = 3
    latent_channels: int = 16

    def validate(self, errs: List[str]) -> None:
        if self.image_size < 8 or self.patch_size < 1 or self.latent_channels < 1:
            errs.append(f"image_size must be >= 8, patch_size and latent_channels >= 1 (got image_size "
                        f"{self.image_size}, patch_size {self.patch_size}, latent_channels {self.latent_channels})")
        if self.in_channels not in (1, 3):
            errs.append(f"in_channels must be 1 or 3, got {self.in_channels}")


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"
    data_root: Optional[str] = None
    eval_split: str = "test"


@dataclass
class TokenizerLossConfig:
    pixel_loss: str = "l2"
    kl_weight: float = 1e-6
    perceptual: str = "none"  # "lpips-convnext" (paper), "lpips", "effnet_lite0" (offline), "none"
    perceptual_weight: float = 1.0
    disc_weight: float = 0.1
    disc_start_epoch: Optional[float] = None  # None: no GAN
    adaptive_disc_weight: bool = False
    lecam_weight: float = 0.0


@dataclass
class OptimConfig:
    """Optimizer, schedule, length and EMA; shared by both trainers."""

    batch_size: int = 128  # global (all ranks, one optimizer step incl. accumulation)
    grad_accum: int = 1
    max_steps: int = 1000
    # when set, max_steps = ceil(epochs * len(data) / batch_size). A max_steps given as an override (the
    # command line) without epochs clears a preset's epochs: the one given last decides, and the saved
    # config shows which (epochs null: max_steps)
    epochs: Optional[float] = None
    base_lr: float = 1e-4  # lr = base_lr * batch_size / 256 (official rule) unless lr is set
    lr: Optional[float] = None
    schedule: str = "cosine"
    warmup_frac: float = 0.25
    min_lr: float = 0.0
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 3.0
    ema_decay: float = 0.999
    ema_warmup: bool = False  # decay min(ema_decay, (1+n)/(10+n)): short runs are not dominated by the init

    def validate(self, errs: List[str]) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            errs.append("batch_size and grad_accum must be >= 1")
        elif self.batch_size % self.grad_accum:
            errs.append(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.max_steps < 1 and self.epochs is None:
            errs.append("max_steps must be >= 1")
        if self.epochs is not None and self.epochs <= 0:
            errs.append(f"epochs must be > 0, got {self.epochs}")
        if self.schedule not in SCHEDULES:
            errs.append(f"schedule must be one of {'|'.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= self.warmup_frac < 1:
            errs.append("warmup_frac must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            errs.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not (self.base_lr > 0 and (self.lr is None or self.lr > 0)):
            errs.append(f"base_lr and lr must be > 0, got base_lr {self.base_lr}, lr {self.lr}")
        if self.min_lr < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            errs.append(f"min_lr, weight_decay and grad_clip must be >= 0 (grad_clip 0: no clipping), got "
                        f"{self.min_lr}, {self.weight_decay}, {self.grad_clip}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            errs.append(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")


@dataclass
class RunConfig:
    """Seed, placement and bookkeeping; shared by both trainers."""

    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    num_workers: int = 0  # DataLoader worker processes
    dist_timeout_min: float = 240.0  # minutes a torchrun collective waits for the slowest rank (= init_distributed's default)
    log_every: int = 20
    ckpt_every: int = 200
    keep_ckpts: int = 2
    milestone_every: int = 0
    max_nonfinite_steps: int = 20  # consecutive skipped (non-finite loss or gradient) steps that stop a run
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    # ---- throughput (how a run executes; none of them changes what a CPU run computes) ------------
    tf32: bool = True  # TF32 matmuls/convolutions on CUDA (no effect on CPU); tf32=false for full fp32
    compile: bool = False  # torch.compile the model's forward passes (tokenizer encoder/decoder, generator)
    # Recompute each transformer block in backward (less activation memory, ~1/3 more compute). A run
    # setting, not a model one: it changes neither the weights nor the math, so the exported model does not
    # carry it and a run may turn it on when it resumes (e.g. after running out of memory).
    grad_checkpointing: bool = False

    def validate(self, errs: List[str]) -> None:
        if self.precision not in PRECISIONS:
            errs.append(f"precision must be one of {'|'.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("log_every", "ckpt_every", "keep_ckpts", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                errs.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.milestone_every < 0:
            errs.append("num_workers and milestone_every must be >= 0")
        if not self.dist_timeout_min > 0:
            errs.append(f"dist_timeout_min must be > 0 (minutes), got {self.dist_timeout_min}")


# ---------------------------------------------------------------------------------------------
# Training configs
# ---------------------------------------------------------------------------------------------
@dataclass
class TokenizerTrainConfig:
    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    losses: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # ---- stages ------------------------------------------------------------------------------
    stage: str = "pretrain"  # or "decoder_ft": encoder frozen, corruption off
    init_from: Optional[str] = None  # run dir / exported tokenizer / official .pth for decoder_ft
    image_every: int = 250
    # the per-channel latent statistics: None = the whole training split (the official protocol); N = a
    # class-stratified sample of N images (evenly spaced over the split). Never flipped.
    stats_images: Optional[int] = None

    ALIASES: typing.ClassVar[Dict[str, str]] = {"model": "model.name"}  # the registry name's short form

    def validate(self) -> "TokenizerTrainConfig":
        errs: List[str] = []
        self.model.validate(errs)
        self.optim.validate(errs)
        self.run.validate(errs)
        errs += self.corruption.errors()
        if self.stage not in STAGES:
            errs.append(f"stage must be one of {'|'.join(STAGES)}, got {self.stage!r}")
        if self.stage == "decoder_ft" and not self.init_from:
            errs.append("stage=decoder_ft needs init_from=<tokenizer run or checkpoint>")
        if self.model.name not in tokenizers.available():
            errs.append(f"model {self.model.name!r} is no tokenizer; available: {', '.join(tokenizers.available())}")
        elif self.corruption.masking_on and not tokenizers.can_mask(self.model.name):
            errs.append(f"{self.model.name} has no tokens to mask: set max_mask_ratio=0")
        if self.data.dataset not in DATASETS:
            errs.append(f"dataset {self.data.dataset!r} is unknown; available: {', '.join(sorted(DATASETS))}")
        if self.losses.perceptual not in PERCEPTUAL_NAMES:
            errs.append(f"perceptual must be one of {'|'.join(PERCEPTUAL_NAMES)}, got {self.losses.perceptual!r}")
        if self.losses.pixel_loss not in PIXEL_LOSSES:
            errs.append(f"pixel_loss must be one of {'|'.join(PIXEL_LOSSES)}, got {self.losses.pixel_loss!r}")
        if self.image_every < 0 or (self.stats_images is not None and self.stats_images < 2):
            errs.append("image_every must be >= 0 and stats_images >= 2 (or none: the whole training split)")
        if errs:
            raise ValueError("invalid tokenizer config:\n  " + "\n  ".join(e.strip() for e in errs))
        return self

    def train_corruption(self) -> CorruptionConfig:
        """The corruption this run trains with: off for decoder fine-tuning (its one home), else ``corruption``."""
        return CorruptionConfig.off() if self.stage == "decoder_ft" else self.corruption


# the generator class behind each registry prefix (``sit_tiny`` -> SiT), for checking ``model_args``
_GENERATOR_CLASSES = {"mar": generators.MAR, "randomar": generators.ARDiff, "rasterar": generators.ARDiff,
                      "dit": generators.DiT, "sit": generators.SiT, "lightningdit": generators.LightningDiT}
# constructor arguments the generator trainer sets itself (from the tokenizer and the config)
_TRAINER_SET_ARGS = ("latent_shape", "num_classes", "class_dropout")


def generator_arg_names(model: str) -> Optional[List[str]]:
    """The keyword arguments the generator ``model`` (a registry or family name) accepts, from its class's
    constructor signatures (following ``**kwargs`` up to the base class); None for an unknown model."""
    name = generators.FAMILIES.get(model, model)
    cls = _GENERATOR_CLASSES.get(generators.family_of(name)) if name in generators.REGISTRY else None
    if cls is None:
        return None
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.name != "self"
                  and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return sorted(names)


def model_args_errors(model: str, model_args: str) -> List[str]:
    """What is wrong with ``model_args`` (JSON of constructor arguments) for the generator ``model``."""
    try:
        args = json.loads(model_args)
    except ValueError:
        args = None
    if not isinstance(args, dict):
        return [f"model_args must be a JSON object, e.g. {{\"depth\": 4}}, got {model_args!r}"]
    known = generator_arg_names(model)
    if known is None:
        return []  # the unknown model is reported on its own
    errs = [f"model_args: {k} is set by the trainer (from the tokenizer run and the config), not by model_args"
            for k in args if k in _TRAINER_SET_ARGS]
    settable = [k for k in known if k not in _TRAINER_SET_ARGS]
    errs += [f"unknown model argument {k} for {model}; known: {', '.join(settable)}"
             for k in args if k not in known]
    return errs


@dataclass
class GeneratorTrainConfig:
    # a generator registry name (ldetok.generators.available()); None (the ImageNet presets): must be given
    model: Optional[str] = "sit_tiny"
    model_args: str = ""  # JSON of extra constructor arguments, e.g. {"depth": 4}
    tokenizer: Optional[str] = None  # a tokenizer run folder (its exported EMA tokenizer + statistics)
    class_dropout: float = 0.1
    unconditional: bool = False
    # ---- latents -----------------------------------------------------------------------------
    latents: str = "cache"  # "cache" (encode once, sample from moments) or "online" (tokenize each step)
    flip: bool = False  # also cache/encode horizontally flipped images (MAR's main_cache)
    cache_dir: Optional[str] = None
    # the paper's generator recipe: constant 2e-4, no decay/clip/warm-up, EMA 0.9999
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        batch_size=1024, lr=2e-4, schedule="constant", warmup_frac=0.0, weight_decay=0.0, grad_clip=0.0,
        ema_decay=0.9999))
    run: RunConfig = field(default_factory=lambda: RunConfig(log_every=50, ckpt_every=500))
    # ---- sampling for logs and the final grid ------------------------------------------------
    sample_every: int = 0
    sample_guidance_scale: float = 1.0
    sample_steps: Optional[int] = None
    sample_temperature: float = 1.0

    ALIASES: typing.ClassVar[Dict[str, str]] = {}

    def validate(self) -> "GeneratorTrainConfig":
        errs: List[str] = []
        self.optim.validate(errs)
        self.run.validate(errs)
        if not self.tokenizer:
            errs.append("tokenizer=<tokenizer run folder> is required")
        if self.model is None:
            errs.append("model=<generator> is required: this preset trains at ImageNet scale and has no default "
                        "size (e.g. model=mar_base or model=sit_base)")
        elif generators.FAMILIES.get(self.model, self.model) not in generators.REGISTRY:
            errs.append(f"model {self.model!r} is no generator; available: {', '.join(generators.available())} "
                        f"(or a family, meaning its tiny size: {', '.join(generators.FAMILIES)})")
        if self.latents not in ("cache", "online"):
            errs.append(f"latents must be 'cache' or 'online', got {self.latents!r}")
        if self.sample_every < 0:
            errs.append(f"sample_every must be >= 0, got {self.sample_every}")
        if self.model_args and self.model is not None:
            errs += model_args_errors(self.model, self.model_args)
        if self.sample_steps is not None and self.sample_steps < 1:
            errs.append(f"sample_steps must be >= 1 (or none for the family's default), got {self.sample_steps}")
        if not 0 <= self.class_dropout < 1:
            errs.append(f"class_dropout must be in [0, 1), got {self.class_dropout}")
        if errs:
            raise ValueError("invalid generator config:\n  " + "\n  ".join(errs))
        return self


_GEN_PAPER = dict(batch_size=1024, lr=2e-4, schedule="constant", warmup_frac=0.0, weight_decay=0.0, grad_clip=0.0,
                  ema_decay=0.9999, flip=True, log_every=100, ckpt_every=2500, keep_ckpts=1, num_workers=10)
# CPU: the 2-core pilot's generator recipe (AdamW 1e-3, short warm-up, cosine to 0.1x, clip 1, EMA 0.999
# with warm-up): the paper's constant 2e-4 at batch 1024 for 100 epochs does not transfer to 1500 steps.
_GEN_CPU = dict(batch_size=128, max_steps=1500, lr=1e-3, schedule="cosine", warmup_frac=0.07, min_lr=1e-4,
                weight_decay=0.0, grad_clip=1.0, ema_decay=0.999, ema_warmup=True, log_every=25, ckpt_every=250,
                sample_every=0, sample_guidance_scale=1.5)

GENERATOR_PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper's tokenizer comparison / ablation recipe: every family, 100 epochs at batch 1024. No default
    # model: a forgotten model= would otherwise train a tiny generator on ImageNet without a word.
    "paper-100ep": dict(_GEN_PAPER, epochs=100, model=None),
    # System-level MAR (800 epochs), diffusion heads d6/w1024 (B) and d8/w1280 (L) are the builders' defaults.
    "mar_base-800ep": dict(_GEN_PAPER, model="mar_base", epochs=800),
    "mar_large-800ep": dict(_GEN_PAPER, model="mar_large", epochs=800),
    "cpu-fmnist": dict(_GEN_CPU),
    "cpu-fmnist-long": dict(_GEN_CPU, max_steps=4000),
}


# Model arguments a generator preset gives one model, beneath any model_args the run sets itself.
PRESET_MODEL_ARGS: Dict[str, Dict[str, Dict[str, Any]]] = {
    # The official 100-epoch MAR-B command (README, edited Dec 2025) uses --diffloss_d 3; earlier versions
    # of that README said 6 (the 800-epoch system runs' head, mar_base's builder default).
    "paper-100ep": {"mar_base": {"diffloss_d": 3}},
}


def resolve_generator_config(preset: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None):
    cfg = _resolve(GeneratorTrainConfig(), GENERATOR_PRESETS, "generator preset", preset, overrides)
    base = PRESET_MODEL_ARGS.get(preset or "", {}).get(cfg.model or "")
    if base:
        own = json.loads(cfg.model_args) if cfg.model_args else {}
        cfg = dataclasses.replace(cfg, model_args=json.dumps({**base, **own}, sort_keys=True)).validate()
    return cfg


# The paper's corruption ablation: name -> (gamma, max mask ratio)
VARIANTS = {"ae": (0.0, 0.0), "mask": (0.0, 0.7), "noise": (3.0, 0.0), "detok": (3.0, 0.7)}
_VARIANT_GRID = re.compile(r"^g(?P<g>\d+(?:\.\d+)?)_m(?P<m>\d+(?:\.\d+)?)(?P<add>_add)?$")


def variant_settings(v: str) -> Dict[str, Any]:
    """The tokenizer overrides of a reproduce variant: a named one (``VARIANTS``), or ``gG_mM`` (γ = G,
    maximum mask ratio M; ``_add`` appended: additive instead of interpolative noise), e.g. ``g0.5_m0.7``."""
    if v in VARIANTS:
        g, m = VARIANTS[v]
        return {"gamma": g, "max_mask_ratio": m}
    hit = _VARIANT_GRID.match(str(v))
    if hit is None:
        raise ValueError(f"unknown variant {v!r}: one of {', '.join(VARIANTS)}, or gG_mM[_add] (e.g. g0.5_m0.7, "
                         "g3_m0_add)")
    out = {"gamma": float(hit["g"]), "max_mask_ratio": float(hit["m"])}
    if hit["add"]:
        out["noise_type"] = "additive"
    return out

_IMAGENET = dict(dataset="imagenet", image_size=256, patch_size=16, latent_channels=16, in_channels=3,
                 num_workers=10, batch_size=1024, base_lr=1e-4, warmup_frac=0.25, schedule="cosine",
                 min_lr=0.0, weight_decay=1e-4, grad_clip=3.0, ema_decay=0.999, kl_weight=1e-6,
                 perceptual="lpips-convnext", perceptual_weight=1.0, disc_weight=0.1, eval_split="val",
                 log_every=100, image_every=2000, ckpt_every=2500, keep_ckpts=1, milestone_every=125100)

# CPU presets: 32 px, patch 8 (16 tokens x 16 channels), the 128x2 ViT; the sizes a 2-core pilot
# measured at ~0.2 s/step. lr/warm-up/weight decay follow that pilot (AdamW 1.5e-3 absolute, short
# warm-up), not the ImageNet recipe, which is tuned for batch 1024 over 200 epochs.
_CPU = dict(model="detok_MM", image_size=32, patch_size=8, latent_channels=16, batch_size=128,
            max_steps=1500, lr=1.5e-3, warmup_frac=0.07, min_lr=1.5e-4, weight_decay=0.05,
            grad_clip=3.0, ema_decay=0.999, ema_warmup=True, perceptual="none", log_every=25, image_every=500,
            ckpt_every=250)

TOKENIZER_PRESETS: Dict[str, Dict[str, Any]] = {
    # The released detok_BB recipe: 200 epochs, batch 1024, gamma 3, M 0.7, GAN from epoch 100.
    "detok_BB-imagenet256": dict(_IMAGENET, model="detok_BB", epochs=200, gamma=3.0, max_mask_ratio=0.7,
                                 disc_start_epoch=100),
    # Its second stage: decoder only, no corruption (stage=decoder_ft turns it off; the run's corruption
    # settings record what the frozen encoder was trained with), perceptual 0.1, blr 5e-5, 5% warm-up,
    # 100 epochs, GAN from the start (init_from=<stage-1 run> must be given).
    "detok_BB-imagenet256-decoder_ft": dict(_IMAGENET, model="detok_BB", epochs=100, stage="decoder_ft",
                                            perceptual_weight=0.1,
                                            base_lr=5e-5, warmup_frac=0.05, disc_start_epoch=0),
    # The ablation tokenizer: detok_SB, 50 epochs, no GAN (its start epoch 100 is never reached).
    "detok_SB-imagenet256-ablation": dict(_IMAGENET, model="detok_SB", epochs=50, gamma=3.0,
                                          max_mask_ratio=0.7, disc_start_epoch=None),
    "cpu-fmnist": dict(_CPU, dataset="fashion_mnist", gamma=3.0, max_mask_ratio=0.7),
    "cpu-photos": dict(_CPU, dataset="photos", eval_split="val", gamma=3.0, max_mask_ratio=0.7),
}
for _base in ("cpu-fmnist", "cpu-photos", "detok_SB-imagenet256-ablation"):
    for _v, (_g, _m) in VARIANTS.items():
        if _v != "detok":
            TOKENIZER_PRESETS[f"{_base}-{_v}"] = dict(TOKENIZER_PRESETS[_base], gamma=_g, max_mask_ratio=_m)

# The decoder fine-tuning recipe for each base preset (what ``reproduce --decoder-ft`` runs after every
# variant): the released recipe's changes to its pre-training (blr 1e-4 -> 5e-5, warm-up 25% -> 5%,
# perceptual weight 1.0 -> 0.1, GAN from the start, 100 epochs), applied to each base. On CPU (no GAN, no
# perceptual loss) that is half the learning rate and a 5% warm-up.
_FT = dict(stage="decoder_ft", perceptual_weight=0.1, warmup_frac=0.05)
TOKENIZER_PRESETS["detok_SB-imagenet256-ablation-decoder_ft"] = dict(
    TOKENIZER_PRESETS["detok_SB-imagenet256-ablation"], **_FT, epochs=100, base_lr=5e-5, disc_start_epoch=0)
for _base in ("cpu-fmnist", "cpu-photos"):
    TOKENIZER_PRESETS[f"{_base}-decoder_ft"] = dict(TOKENIZER_PRESETS[_base], **_FT, lr=_CPU["lr"] / 2,
                                                    min_lr=_CPU["min_lr"] / 2)
DECODER_FT_PRESETS = {"detok_BB-imagenet256": "detok_BB-imagenet256-decoder_ft",
                      "detok_SB-imagenet256-ablation": "detok_SB-imagenet256-ablation-decoder_ft",
                      "cpu-fmnist": "cpu-fmnist-decoder_ft", "cpu-photos": "cpu-photos-decoder_ft"}

# ---------------------------------------------------------------------------------------------
# Reproductions of the corruption ablation (``ldetok reproduce``): presets of the same kind
# ---------------------------------------------------------------------------------------------
@dataclass
class ReproduceConfig:
    """A reproduction of the corruption ablation (``ldetok reproduce``): which tokenizer and generator
    presets, variants, seeds and budgets, and the evaluation protocol."""

    tokenizer_preset: str = "cpu-fmnist"  # the base preset; variants append -ae/-mask/-noise ("detok" is the base)
    generator_preset: str = "cpu-fmnist"
    variants: Sequence[str] = ("ae", "mask", "noise", "detok")
    generators: Sequence[str] = ("sit", "mar")
    seeds: Sequence[int] = (0,)
    budgets: Sequence[Tuple[int, int]] = ((1000, 1500),)  # (tokenizer steps, generator steps)
    n_eval: int = 1000  # samples and real/reconstructed images per evaluation
    features: Sequence[str] = ("classifier", "inception")
    # Inception features on the first n_inception images of each (class-balanced) set; None: all n_eval.
    # On a CPU the 299 px Inception runs at ~9 img/s on 2 cores (channels-last; 32 px images upsampled),
    # so the CPU presets use fewer images there (KID, unbiased, is the metric to read at such counts; FID
    # at small n is biased upwards).
    n_inception: Optional[int] = None
    # with decoder fine-tuning, the spaces in which the untuned decoder (its reconstructions and its
    # renderings of the shared samples) is measured; None: all of ``features``. The tuned decoder is
    # measured in all of them. E.g. ("classifier",): the slow Inception space on the tuned rows only.
    untuned_features: Optional[Sequence[str]] = None
    noise_levels: Sequence[float] = (0.3, 0.5, 0.7)
    # robustness is measured under one noise for every variant (so the variants compare), not each run's
    # own corruption: the paper's γ and interpolative noise
    noise_gamma: float = 3.0
    noise_type: str = "interpolative"
    # the decoder fine-tuning stage after each tokenizer (encoder frozen, no corruption; the released
    # `-decoder_tuned` recipe): steps, 0 for none. Generators then train on the fine-tuned tokenizer
    # (same latents: only the decoder changes). Its preset: decoder_ft_preset, else the base preset's
    # decoder fine-tuning recipe (DECODER_FT_PRESETS).
    decoder_ft_steps: int = 0
    decoder_ft_preset: Optional[str] = None
    # ---- sampling and its evaluation: defaults for every family, replaced per family by ``families``
    guidance_scale: float = 1.5  # classifier-free guidance scale of the samples (when there is no search)
    # a guidance-scale search before the final evaluation (``eval.guidance_sweep``): each scale samples
    # n_search images, the one with the lowest FD to the reference (Inception when measured, else the
    # first space) is used; () for none
    guidance_scales: Sequence[float] = ()
    n_search: int = 5000
    sample_steps: Optional[int] = None  # the final samples' steps (MAR: num_iter); None: the model's default
    search_steps: Optional[int] = None  # the search's steps; None: sample_steps
    temperature: float = 1.0
    # per generator family ("mar") or name ("mar_base"; a name beats its family): any of SAMPLING_KEYS
    # and generator config overrides (e.g. model_args) for that family only
    families: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # what gFID and the guidance search are measured against (``eval.Reference.parse`` forms: an ADM
    # .npz, released:NAME, DATASET:SPLIT[:N], a folder); None: the first n_eval images of the tokenizer's
    # evaluation split (also the reference of rFID and of the classifier space)
    reference: Optional[str] = None
    tok_overrides: Dict = field(default_factory=dict)
    gen_overrides: Dict = field(default_factory=dict)

    def family_settings(self, name: str) -> Dict[str, Any]:
        """``families``' entries for generator ``name``: its family's, then its own name's."""
        fam = generators.family_of(name)
        return {**self.families.get(fam, {}), **(self.families.get(name, {}) if name != fam else {})}

    def sampling(self, name: str) -> "SamplingProtocol":
        """The sampling and search settings of generator ``name`` (``mar_base``, ``sit``, ...)."""
        own = {k: v for k, v in self.family_settings(name).items() if k in SAMPLING_KEYS}
        base = dict(guidance_scale=self.guidance_scale, guidance_scales=tuple(self.guidance_scales),
                    n_search=self.n_search, final_steps=self.sample_steps,
                    search_steps=self.search_steps if self.search_steps is not None else self.sample_steps,
                    temperature=self.temperature)
        if "final_steps" in own and "search_steps" not in own and self.search_steps is None:
            own["search_steps"] = own["final_steps"]
        base.update(own)
        base["guidance_scales"] = tuple(float(g) for g in base["guidance_scales"])
        return SamplingProtocol(**base)

    def generator_overrides(self, name: str) -> Dict[str, Any]:
        """The generator config overrides ``families`` gives generator ``name`` (not its sampling keys)."""
        return {k: v for k, v in self.family_settings(name).items() if k not in SAMPLING_KEYS}

    def decoder_ft(self) -> Optional[str]:
        """The tokenizer preset of the decoder fine-tuning stage."""
        return self.decoder_ft_preset or DECODER_FT_PRESETS.get(self.tokenizer_preset)


    def validate(self) -> "ReproduceConfig":
        errs: List[str] = []
        bases = [self.tokenizer_preset] + ([self.decoder_ft_preset] if self.decoder_ft_preset else [])
        for v in self.variants:
            try:
                variant_settings(v)
            except ValueError as e:
                errs.append(str(e))
        errs += [f"unknown tokenizer preset {p!r}" for p in bases if p not in TOKENIZER_PRESETS]
        if self.generator_preset not in GENERATOR_PRESETS:
            errs.append(f"unknown generator preset {self.generator_preset!r}")
        errs += [f"generator {g!r} is unknown" for g in self.generators
                 if generators.FAMILIES.get(g, g) not in generators.REGISTRY]
        if not self.seeds or not self.budgets or any(len(b) != 2 or min(b) < 0 for b in self.budgets):
            errs.append("seeds and budgets must be non-empty; each budget is (tokenizer steps, generator steps) >= 0")
        if self.n_eval < 1 or self.n_search < 1 or self.decoder_ft_steps < 0:
            errs.append("n_eval and n_search must be >= 1, decoder_ft_steps >= 0")
        if not all(0 <= t <= 1 for t in self.noise_levels):
            errs.append(f"noise_levels must be in [0, 1], got {list(self.noise_levels)}")
        if self.untuned_features is not None and not set(self.untuned_features) <= set(self.features):
            errs.append(f"untuned_features {list(self.untuned_features)} must be among features {list(self.features)}")
        if self.decoder_ft_steps and self.decoder_ft() not in TOKENIZER_PRESETS:
            errs.append(f"decoder fine-tuning needs a recipe for {self.tokenizer_preset!r}: set decoder_ft_preset")
        errs += self._family_errors()
        if errs:
            raise ValueError("invalid reproduce config:\n  " + "\n  ".join(errs))
        return self

    def _family_errors(self) -> List[str]:
        errs = []
        for key, settings in self.families.items():
            if generators.family_of(key) not in generators.FAMILIES:
                errs.append(f"families: {key!r} is no generator family or name; families: {', '.join(generators.FAMILIES)}")
            others = {k: v for k, v in settings.items() if k not in SAMPLING_KEYS}
            try:
                parse_overrides(GeneratorTrainConfig, [f"{k}={v}" for k, v in others.items()])
            except ValueError as e:
                errs.append(f"families[{key!r}]: {e} (sampling keys: {', '.join(SAMPLING_KEYS)})")
        for name in self.generators:
            sp = self.sampling(name)
            if sp.n_search < 1 or sp.temperature <= 0 or sp.guidance_scale < 1 or any(g < 1 for g in sp.guidance_scales):
                errs.append(f"{name}: n_search must be >= 1, temperature > 0, guidance scales >= 1; got {sp}")
            if any(s is not None and s < 1 for s in (sp.search_steps, sp.final_steps)):
                errs.append(f"{name}: sampling steps must be >= 1, got search {sp.search_steps}, final {sp.final_steps}")
        return errs


# the per-family sampling keys of ``ReproduceConfig.families`` (``--gen-for FAMILY KEY=VALUE``) and their
# aliases, the official command line's names
SAMPLING_KEYS = ("guidance_scale", "guidance_scales", "n_search", "search_steps", "final_steps", "temperature")
SAMPLING_ALIASES = {"cfg": "guidance_scale", "cfg_list": "guidance_scales", "num_iter": "final_steps",
                    "num_iter_final": "final_steps", "num_iter_search": "search_steps",
                    "num_images_for_eval_and_search": "n_search", "sample_steps": "final_steps"}


@dataclass(frozen=True)
class SamplingProtocol:
    """How one generator family is sampled and its guidance scale chosen (``ReproduceConfig.sampling``)."""

    guidance_scale: float  # used when guidance_scales is empty
    guidance_scales: Tuple[float, ...]  # the search grid; () for none
    n_search: int  # samples per searched scale
    search_steps: Optional[int]  # sampler steps during the search (MAR: num_iter); None: the model's default
    final_steps: Optional[int]  # sampler steps of the final samples
    temperature: float


def parse_family_settings(items: Sequence[str]) -> Dict[str, Any]:
    """``["final_steps=256", "cfg_list=3.0,3.5", "model_args={...}"]`` -> typed settings for ``families``
    (sampling keys by their names or aliases; any other key is a generator config override, checked)."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--gen-for setting {item!r} is not of the form key=value")
        key, raw = (t.strip() for t in item.split("=", 1))
        key = SAMPLING_ALIASES.get(key, key)
        try:
            if key == "guidance_scales":
                out[key] = tuple(float(v) for v in raw.replace(";", ",").split(",") if v.strip())
            elif key in ("n_search", "search_steps", "final_steps"):
                out[key] = None if raw.lower() in ("none", "") else int(raw)
            elif key in ("guidance_scale", "temperature"):
                out[key] = float(raw)
            else:
                out.update(parse_overrides(GeneratorTrainConfig, [f"{key}={raw}"]))
        except ValueError as e:
            raise ValueError(f"--gen-for {key}={raw!r}: {e}") from None
    return out


# The official per-family evaluation settings (Jiawei-Yang/DeTok README and main_diffusion.py), for the
# ImageNet presets. Generators with no official command take the nearest official family's grid.
OFFICIAL_SAMPLING: Dict[str, Dict[str, Any]] = {
    # MAR: cfg search --cfg_list 3.0 3.5 3.7 3.8 3.9 4.0 4.1 4.3 4.5 on --num_images_for_eval_and_search
    # 10000 at --num_iter 64, then the 50k evaluation at --num_iter 256; --temperature 1.0; --cfg 4.0
    # (the 100-epoch runs' default; linear cfg schedule is the model's default)
    "mar": dict(guidance_scale=4.0, guidance_scales=(3.0, 3.5, 3.7, 3.8, 3.9, 4.0, 4.1, 4.3, 4.5), n_search=10000,
                search_steps=64, final_steps=256, temperature=1.0),
    # SiT: --cfg 1.6, search list 1.3 ... 2.0 on 10000, --num_sampling_steps 250 (dopri5 output grid)
    "sit": dict(guidance_scale=1.6, guidance_scales=(1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0), n_search=10000,
                search_steps=250, final_steps=250, temperature=1.0),
    # DiT, LightningDiT: no official command (the README has none; issue #5 there asks for them); the code's
    # --num_sampling_steps default 100; SiT's grid (the same velocity/epsilon-space guidance range)
    "dit": dict(guidance_scale=1.6, guidance_scales=(1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0), n_search=10000,
                search_steps=100, final_steps=100, temperature=1.0),
    "lightningdit": dict(guidance_scale=1.6, guidance_scales=(1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0),
                         n_search=10000, search_steps=100, final_steps=100, temperature=1.0),
    # RandomAR / RasterAR: no official command; one token per step (256 steps, as the code's generate);
    # MAR's grid (the same DiffLoss head and linear cfg ramp)
    "randomar": dict(guidance_scale=4.0, guidance_scales=(3.0, 3.5, 3.7, 3.8, 3.9, 4.0, 4.1, 4.3, 4.5),
                     n_search=10000, search_steps=None, final_steps=None, temperature=1.0),
    "rasterar": dict(guidance_scale=4.0, guidance_scales=(3.0, 3.5, 3.7, 3.8, 3.9, 4.0, 4.1, 4.3, 4.5),
                     n_search=10000, search_steps=None, final_steps=None, temperature=1.0),
}


REPRODUCE_PRESETS: Dict[str, Dict[str, Any]] = {
    # baseline vs the paper's l-DeTok, one seed, SiT, both decoders fine-tuned for 500 steps (the released
    # l-DeTok's practice; it helped both in the cpu-map study), each generator reused by its tuned decoder;
    # Inception on the tuned decoders only (the untuned ones in the classifier's space), under 20 min on 2 cores
    "cpu-quick": dict(variants=("ae", "detok"), generators=("sit",), budgets=((1000, 1500),), n_eval=1000,
                      n_inception=200, decoder_ft_steps=500, untuned_features=("classifier",)),
    # make run: the fairest comparison the study supports. The same protocol as cpu-quick, with l-DeTok at
    # the setting that beat the autoencoder on held-out seeds 2-4 at this scale (additive noise z + t·γ·ε,
    # γ = 0.5, no masking: figures/study/confirm_additive.md) instead of the paper's γ=3/M=0.7 (cpu-quick).
    # Three pipelines do not fit the 20-minute budget on 2 cores, so the paper's setting is its own preset.
    "cpu-main": dict(variants=("ae", "g0.5_m0_add"), generators=("sit",), budgets=((1000, 1500),), n_eval=1000,
                     n_inception=200, decoder_ft_steps=500, untuned_features=("classifier",)),
    # baseline vs l-DeTok at four budgets, two seeds (about 75 min on 2 cores with one process per seed)
    "cpu-budget": dict(variants=("ae", "detok"), generators=("sit",), seeds=(0, 1),
                       budgets=((250, 375), (500, 750), (1000, 1500), (2000, 3000)), n_eval=1000, n_inception=250),
    # all four variants, three seeds, a budget sweep (hours on 2 cores)
    "cpu-full": dict(generators=("sit", "mar"), seeds=(0, 1, 2), budgets=((1000, 1500), (3000, 3000), (8000, 6000)),
                     n_eval=2000, n_inception=1000),
    # one modern GPU, a few hours: colour photo crops at 64 px, CPU sizes scaled up
    "gpu-photos": dict(tokenizer_preset="cpu-photos", generators=("sit", "mar"), seeds=(0, 1),
                       budgets=((5000, 10000), (20000, 40000)), n_eval=5000, features=("inception",),
                       tok_overrides=dict(model="detok_TT", image_size=64, patch_size=8, batch_size=256),
                       gen_overrides=dict(batch_size=256)),
    # the paper's ablation on an ImageNet folder (torchrun, several nodes): detok_SB 50 epochs, MAR-B and
    # SiT-B 100 epochs at batch 1024 (MAR-B's DiffLoss head at depth 3: PRESET_MODEL_ARGS), the official
    # per-family cfg search on 10k and 50k final samples, gFID against ADM's reference statistics
    "gpu-imagenet-ablation": dict(
        tokenizer_preset="detok_SB-imagenet256-ablation", generator_preset="paper-100ep",
        generators=("mar_base", "sit_base"), budgets=((0, 0),), n_eval=50000, features=("inception",),
        families=OFFICIAL_SAMPLING, reference="released:adm_in256_stats"),
    # Where does latent denoising pay off at small scale: a γ x M map (γ in {0, 0.5, 1, 2, 3}, M in {0, 0.7}),
    # each tokenizer also decoder-tuned (500 steps, its generator reused), at the cpu-quick budget and twice
    # it, seeds 0 and 1 (one process per seed: --seeds 0, --seeds 1); classifier-space FD (cheap), Inception
    # on the headline rows only (rerun those with --variants ... and features=inception)
    "cpu-map": dict(variants=("ae", "g0.5_m0", "g1_m0", "g2_m0", "noise", "mask", "g0.5_m0.7", "g1_m0.7",
                              "g2_m0.7", "detok"), generators=("sit",), seeds=(0, 1),
                    budgets=((1000, 1500), (2000, 3000)), decoder_ft_steps=500, n_eval=1000,
                    features=("classifier",)),
    # Is the baseline's gap a generator-capacity effect? Both tokenizers at the cpu-quick budget, measured as
    # the map measures them (decoders fine-tuned 500 steps, classifier-space FD), with a SiT of twice the
    # width (hidden 256 instead of 128: its folders are named sit-hidden_size256_...) and with twice the
    # generator steps. Run them with --out of the cpu-map runs: they reuse its tokenizers (and the map's
    # 1000/1500 rows are their baseline), so only the generators differ.
    "cpu-capacity-width": dict(variants=("ae", "detok"), generators=("sit",), seeds=(0, 1), budgets=((1000, 1500),),
                               decoder_ft_steps=500, n_eval=1000, features=("classifier",),
                               families={"sit": {"model_args": '{"hidden_size": 256}'}}),
    "cpu-capacity-steps": dict(variants=("ae", "detok"), generators=("sit",), seeds=(0, 1), budgets=((1000, 3000),),
                               decoder_ft_steps=500, n_eval=1000, features=("classifier",)),
    # The paper's corruption ablation (none / masking / noise / both; SiT and MAR; no decoder fine-tuning, as
    # the paper's 50-epoch ablation tokenizers) at CPU scale, three seeds: `ldetok study ablation OUT` lays it
    # out like the paper's table, with rFID. The budget is the largest that keeps the whole preset near 90
    # minutes on a 2-core machine: `ldetok reproduce --preset cpu-ablation --jobs 2` (two 1-thread processes)
    # took 82 minutes there; per (variant, seed) ~2 min tokenizer, ~3.5 min SiT (latent cache included),
    # ~4.5 min MAR and ~1.5 min for each generator's sampling and evaluation. At 1000/1500 it would take ~2.5 h.
    "cpu-ablation": dict(variants=("ae", "mask", "noise", "detok"), generators=("sit", "mar"), seeds=(0, 1, 2),
                         budgets=((500, 750),), n_eval=1000, n_inception=250, features=("classifier", "inception")),
    # for tests: seconds
    "tiny": dict(variants=("ae", "detok"), generators=("sit",), budgets=((2, 2), (3, 3)), n_eval=16, n_inception=12,
                 features=("inception",), sample_steps=4,
                 tok_overrides=dict(batch_size=16, stats_images=64, log_every=1, tensorboard=False),
                 gen_overrides=dict(batch_size=16, log_every=1, tensorboard=False, latents="online")),
}


def resolve_reproduce_config(preset: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None):
    return _resolve(ReproduceConfig(), REPRODUCE_PRESETS, "reproduce preset", preset, overrides)


# ---------------------------------------------------------------------------------------------
# key=value overrides on a tree of dataclasses
# ---------------------------------------------------------------------------------------------
def _fields_of(cls, prefix: str = "") -> Dict[str, Any]:
    """Dotted path -> type hint of every leaf field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_fields_of(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def _key_index(cls) -> Dict[str, str]:
    """Every accepted key -> its dotted path: the path itself, a leaf name unique in the tree, an alias."""
    paths = _fields_of(cls)
    index = {p: p for p in paths}
    leaves: Dict[str, List[str]] = {}
    for p in paths:
        leaves.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    for leaf, ps in leaves.items():
        if len(ps) == 1 and leaf not in index:
            index[leaf] = ps[0]
    index.update(getattr(cls, "ALIASES", {}))
    return index


def _canonical(cls, key: str) -> str:
    index = _key_index(cls)
    if key not in index:
        short = sorted(k for k in index if "." not in k)
        raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(short)} "
                         f"(or their dotted paths, e.g. corruption.gamma, optim.max_steps)")
    return index[key]


def _convert(name: str, tp, raw: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        if raw.lower() in ("none", "null", ""):
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected a boolean (true/false), got {raw!r}")
    if tp is int:
        try:
            f = float(raw)
        except ValueError:
            raise ValueError(f"{name}: expected an integer, got {raw!r}") from None
        if f != int(f):
            raise ValueError(f"{name}: expected an integer, got {raw!r}")
        return int(f)
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {raw!r}") from None
    return raw


def parse_overrides(cls, items: List[str]) -> Dict[str, Any]:
    """``["gamma=0", "optim.max_steps=200"]`` -> {dotted path: typed value}, checked against ``cls``."""
    types = _fields_of(cls)
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        path = _canonical(cls, key.strip())
        out[path] = _convert(key.strip(), types[path], raw.strip())
    return out


def _set(obj, path: str, value):
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(obj, **{head: value})
    return dataclasses.replace(obj, **{head: _set(getattr(obj, head), rest, value)})


def apply_overrides(cfg, overrides: Dict[str, Any]):
    """A copy of ``cfg`` with ``overrides`` ({key or dotted path: value}) set; unknown keys are refused."""
    bad = []
    for key, value in (overrides or {}).items():
        try:
            cfg = _set(cfg, _canonical(type(cfg), key), value)
        except ValueError:
            bad.append(key)
    if bad:
        raise ValueError(f"unknown config keys: {', '.join(sorted(bad))}")
    return cfg


def flatten(cfg) -> Dict[str, Any]:
    """A config (or its saved dict) as {dotted path: value}."""
    d = asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in flatten(v).items()})
        else:
            out[k] = v
    return out


def config_from_dict(cls, d: Dict[str, Any]):
    """A config from its saved dict: nested (``asdict``) or flat (exports written before sub-configs;
    each flat key is read by its leaf name). Unknown keys are refused; missing ones take the defaults."""
    return apply_overrides(cls(), flatten(d)).validate()


def _length_rule(cfg, overrides: Dict[str, Any]) -> Dict[str, Any]:
    """The one rule for a run's length: ``epochs``, when set, decides; but a ``max_steps`` given in
    ``overrides`` (the command line, ``--budgets``, ``--decoder-ft STEPS``) without ``epochs`` beats a
    preset's ``epochs``, which is then cleared, so the run's saved config says that ``max_steps`` decides."""
    if not overrides or not hasattr(cfg, "optim"):
        return dict(overrides or {})
    keys = {_canonical(type(cfg), k) for k in overrides}
    out = dict(overrides)
    if "optim.max_steps" in keys and "optim.epochs" not in keys:
        out["optim.epochs"] = None
    return out


def _resolve(base, presets: Dict[str, Dict[str, Any]], what: str, preset: Optional[str], overrides):
    """Defaults <- the preset's fields <- ``overrides``, validated before any work starts. A ``max_steps``
    override beats the preset's ``epochs`` (``_length_rule``)."""
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"unknown {what} {preset!r}; available: {', '.join(sorted(presets))}")
        base = apply_overrides(base, presets[preset])
    return apply_overrides(base, _length_rule(base, overrides)).validate()


def resolve_tokenizer_config(preset: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None):
    return _resolve(TokenizerTrainConfig(), TOKENIZER_PRESETS, "preset", preset, overrides)


def config_diff(a, b) -> Dict[str, Tuple[Any, Any]]:
    """{dotted path: (a's value, b's value)} where two configs (or saved dicts, nested or flat) differ."""
    da, db = flatten(a), flatten(b)
    return {k: (da.get(k), db.get(k)) for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)}


def to_json(cfg) -> str:
    return json.dumps(asdict(cfg), indent=2, sort_keys=True)
