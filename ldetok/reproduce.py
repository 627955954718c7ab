"""``ldetok reproduce``: the paper's corruption ablation end to end, at any budget.

For each budget (tokenizer steps, generator steps), seed and tokenizer variant (by default the paper's
four: γ=0/M=0, masking only, noise only, both) it trains the tokenizer, builds its latent cache, trains
the same generator(s) on it, and measures, in each feature space (Inception; and the Fashion-MNIST
classifier where the data allows):

- the reconstruction ceiling: PSNR of clean reconstructions, and FD(reconstructions, real);
- robustness of the latents: PSNR when the raw latents are corrupted by interpolative noise at fixed t
  (γ=3; ``eval.psnr_under_noise``: each image's ε seeded by the run's seed and the image's index) before
  decoding;
- sample quality: FD(samples, real) (gFID in Inception space) and KID(samples, real);
- the modelability of the latents, free of the reconstruction ceiling: FD(samples, reconstructions),
  i.e. how close the generator gets to what its own tokenizer can render;
- the generator's final (smoothed) training loss on its normalised latents.

Every stage writes its result to disk and is skipped when found, so an interrupted reproduction resumes
where it stopped. Results: ``results.csv`` (one row per run), ``results.md`` (mean ± std over seeds),
``figures/reproduce_<preset>_*.png`` (each metric against the budget), and a sample grid per variant.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import (GeneratorTrainConfig, ReproduceConfig, TokenizerTrainConfig, resolve_generator_config,
                     resolve_reproduce_config, resolve_tokenizer_config, variant_settings)
from .data import build_dataset, from_uint8, to_uint8
from .engine.distributed import (barrier, broadcast_object, cleanup, gather_objects, init_distributed, is_distributed,
                                 resolve_device)
from .engine.common import check_resume_config
from .engine.generator_trainer import train_generator
from .engine.stats import fetch_batch
from .engine.tokenizer_trainer import train_tokenizer
from . import generators
from . import weights as W
from .eval import Reference, fd_from_features, guidance_sweep, kid_from_features, psnr, psnr_under_noise, ssim
from .eval.classifier import ClassifierFeatures
from .eval.fid import InceptionFeatures, fid_from_stats, inception_score_from_logits, stats_from_features
from .eval.inception import inception_score_available
from .runs import atomic_write_text, load_generator_run, load_tokenizer, run_train_config
from .sampling import generate_images
from .viz import save_grid

__all__ = ["reproduce", "headline_table", "parse_budgets", "warm_extractors", "tokenizer_tags", "tokenizer_config",
           "generator_config", "generator_label", "collect_rows", "protocol_table"]

PAPER_VARIANTS = {"ae": "γ=0, M=0", "mask": "masking only (M=0.7)", "noise": "noise only (γ=3)",
                  "detok": "noise + masking (l-DeTok)"}

LABELS = {"detok": "l-DeTok (γ=3, M=0.7)", "ae": "AE (γ=0, M=0)", "mask": "masking only (M=0.7)",
          "noise": "noise only (γ=3)", "g0.5_m0_add": "l-DeTok (additive γ=0.5, M=0)"}


# ---------------------------------------------------------------------------------------------
def _done(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def _save(path: Path, obj) -> dict:
    atomic_write_text(json.dumps(obj, indent=2, default=float), path)
    return obj


class _Progress:
    """One line per stage with elapsed time and an estimate of the time left.

    Stages have a kind (tokenizer training, generator training, evaluation) and a size (steps, or
    images); the estimate charges each remaining stage the measured seconds per unit of its kind,
    falling back to the overall rate while a kind has not been timed yet."""

    def __init__(self, plan: Sequence[Tuple[str, float]], verbose: bool = True):
        self.plan, self.verbose = list(plan), verbose
        self.done, self.t0 = 0, time.time()
        self.spent: Dict[str, List[float]] = {}  # kind -> [seconds, units]

    def _rate(self, kind: str) -> Optional[float]:
        if kind in self.spent and self.spent[kind][1] > 0:
            return self.spent[kind][0] / self.spent[kind][1]
        return None

    def left(self) -> Optional[float]:
        total, fallback = 0.0, None
        timed = [v for v in self.spent.values() if v[1] > 0]
        if timed:
            fallback = sum(v[0] for v in timed) / sum(v[1] for v in timed)
        for kind, units in self.plan[self.done:]:
            rate = self._rate(kind) if self._rate(kind) is not None else fallback
            if rate is None:
                return None
            total += rate * units
        return total

    def stage(self, msg: str):
        el = time.time() - self.t0
        left = self.left()
        eta = "?" if left is None else f"{left / 60:.1f} min"
        if self.verbose:
            print(f"[{el / 60:6.1f} min | stage {self.done + 1}/{len(self.plan)} | ~{eta} left] {msg}", flush=True)
        return time.time()

    def end(self, t_start: float, skipped: bool = False):
        kind, units = self.plan[self.done]
        self.done += 1
        if not skipped:
            acc = self.spent.setdefault(kind, [0.0, 0.0])
            acc[0] += time.time() - t_start
            acc[1] += units


def _extractors(names, device, warm: bool = False):
    """The feature extractors by name; ``warm`` loads their weights now (training the classifier or
    converting the Inception weights on first use, into the shared caches)."""

    out = {}
    for name in names:
        out[name] = InceptionFeatures(device=device) if name == "inception" else ClassifierFeatures(device=device)
        if warm:
            out[name].model if name != "inception" else out[name]._load()
    return out


def _extractor_keys(exts: Dict[str, object]) -> Dict[str, str]:
    """``features[SPACE]``: which weights measured each space (the classifier's includes its digest: a
    classifier retrained elsewhere gives other distances, see ``mixed_extractors``)."""
    return {f"features[{k}]": e.cache_key for k, e in exts.items() if getattr(e, "cache_key", None)}


def warm_extractors(names, device) -> None:
    """Prepare the feature extractors' weights in their caches (train the classifier, convert the
    Inception weights) before several processes read them."""
    _extractors(names, resolve_device(device), warm=True)


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """Images as their 8-bit PNG would hold them (rounded, as ``ldetok sample`` writes them), back in [-1, 1]."""
    return from_uint8(to_uint8(x))


def _features(ext, images: torch.Tensor, n: Optional[int] = None) -> np.ndarray:
    images = images[:n] if n else images
    return np.asarray(ext.features(images.split(100)), dtype=np.float64)


def parse_budgets(text: str) -> List[Tuple[int, int]]:
    """``"500:750,1000:1500"`` -> ``[(500, 750), (1000, 1500)]`` (tokenizer steps : generator steps)."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"budget {item!r} is not TOKENIZER_STEPS:GENERATOR_STEPS (e.g. 1000:1500)")
        out.append((int(parts[0]), int(parts[1])))
    if not out:
        raise ValueError(f"no budgets in {text!r}")
    return out


def _local_features(exts, images: torch.Tensor, idx: Sequence[int], n_space, logits: bool = False) -> Dict[str, tuple]:
    """This rank's features per space: (indices, features) of its images whose index is below the
    space's sample count; with ``logits``, also ``inception_logits`` (for the Inception Score) when the
    real Inception weights are present."""
    out = {}
    for k, e in exts.items():
        lim = n_space(k)
        keep = [j for j, i in enumerate(idx) if lim is None or i < lim]
        ids = [idx[j] for j in keep]
        if logits and k == "inception" and e.inception_score_available:
            got = e.extract(images[keep].split(100)) if keep else None
            out[k] = (ids, np.asarray(got["2048"], np.float64) if keep else None)
            out["inception_logits"] = (ids, got["logits_unbiased"] if keep else None)
        else:
            out[k] = (ids, _features(e, images[keep]) if keep else None)
    return out


def _gather(local: Dict[str, tuple]) -> Dict[str, np.ndarray]:
    """Every rank's (indices, values) per key, joined in index order (one process: the values as given)."""
    parts = gather_objects(local)
    out = {}
    for k in local:
        pairs = [(np.asarray(p[k][0], dtype=np.int64), np.asarray(p[k][1])) for p in parts if p[k][1] is not None]
        if not pairs:
            raise ValueError(f"no values for {k!r} on any rank")
        idx = np.concatenate([a for a, _ in pairs])
        vals = np.concatenate([v for _, v in pairs])
        out[k] = vals[np.argsort(idx, kind="stable")]
    return out


# ---------------------------------------------------------------------------------------------
def tokenizer_config(P: ReproduceConfig, v: str, seed: int, tok_steps: int, tok_over: Dict,
                     parent: Optional[str] = None, ft_steps: int = 0) -> TokenizerTrainConfig:
    """The training config of variant ``v``'s tokenizer (``parent`` given: of its decoder fine-tuning,
    ``ft_steps`` steps, with the base preset's decoder fine-tuning recipe). Steps given here (budgets,
    ``--decoder-ft STEPS``) beat the preset's epochs."""
    over = dict(tok_over, seed=seed)
    if parent is not None:
        return resolve_tokenizer_config(P.decoder_ft(), dict(over, stage="decoder_ft", init_from=parent,
                                                             max_steps=ft_steps))
    if tok_steps:
        over["max_steps"] = tok_steps
    return resolve_tokenizer_config(P.tokenizer_preset, {**variant_settings(v), **over})


def generator_config(P: ReproduceConfig, name: str, tokenizer: str, seed: int, gen_steps: int,
                     gen_over: Dict) -> GeneratorTrainConfig:
    """The training config of generator ``name`` on ``tokenizer``: the generator preset, the reproduce
    preset's and the command line's overrides (``--gen``), then ``families``' overrides for this family
    only (``--gen-for``); its sample grids use the family's final sampling steps and scale."""
    sp = P.sampling(name)
    gover = {"sample_steps": sp.final_steps, "sample_guidance_scale": sp.guidance_scale,
             "sample_temperature": sp.temperature, **gen_over, **P.generator_overrides(name),
             "tokenizer": tokenizer, "model": name, "seed": seed}
    if gen_steps:
        gover["max_steps"] = gen_steps
    return resolve_generator_config(P.generator_preset, gover)


# ---------------------------------------------------------------------------------------------
class _Run:
    """What every stage of one reproduction shares: the preset, the output folder, the process's place
    in the torchrun group, the progress line and the feature extractors with the real images' features
    (loaded on first need, then reused for every tokenizer). Rank 0 decides whether a stage is done and
    writes every file; the other ranks follow its decisions."""

    def __init__(self, P: ReproduceConfig, out: Path, D, tok_over: Dict, gen_over: Dict, ft_steps: int,
                 prog: _Progress):
        self.P, self.out, self.D, self.prog = P, out, D, prog
        self.dev, self.main = D.device, D.is_main
        self.tok_over, self.gen_over, self.ft_steps = tok_over, gen_over, ft_steps
        self.exts = None
        self.real_feats: Dict[str, np.ndarray] = {}
        self.resolution: Optional[int] = None  # the tokenizer's image size (the reference's resolution)
        self.reference_spec, self.reference_required = P.reference, False
        self.gen_ref: Optional[Dict[str, tuple]] = None
        self.ref_record: dict = {}

    def say(self, *a, **k) -> None:
        if self.main:
            print(*a, **k)

    def n_space(self, k: str) -> Optional[int]:
        return self.P.n_inception if k == "inception" else None

    def spaces(self, ft: int) -> Dict[str, object]:
        """The extractors that measure a decoder: all of them, except for an untuned decoder (``ft`` 0)
        beside a tuned one when the preset names ``untuned_features``."""
        keep = self.P.untuned_features
        if ft or not self.ft_steps or keep is None:
            return dict(self.exts)
        return {k: e for k, e in self.exts.items() if k in keep}

    def save(self, path: Path, obj) -> None:

        if self.main:
            _save(path, obj)
        barrier()

    def done(self, path: Path) -> Optional[dict]:  # rank 0 decides, so every rank takes the same branch

        return broadcast_object(_done(path) if self.main else None)

    def finished(self, meta: Path, steps: int) -> bool:

        ok = meta.exists() and (not steps or json.loads(meta.read_text())["step"] == steps) if self.main else None
        return bool(broadcast_object(ok))

    def stage(self, msg: str, meta: Path, steps: int, cfg, train) -> None:
        """A training stage: ``train()`` unless ``meta`` records a finished run of ``steps`` steps. A
        finished run is reused only when it was trained with ``cfg`` (the fields that may differ between
        a run and its resumption aside); otherwise the stage is refused, naming the folder and the fields,
        so that e.g. a ``--tok`` override never silently reuses a tokenizer trained without it."""
        t = self.prog.stage(msg)
        skipped = self.finished(meta, steps)
        if skipped:
            err = broadcast_object(_config_mismatch(meta.parent.parent, cfg) if self.main else None)
            if err:
                raise ValueError(err)
        if not skipped:
            train()
        self.prog.end(t, skipped)


def _config_mismatch(run_dir: Path, cfg) -> Optional[str]:
    """Why the finished run in ``run_dir`` is not a run of ``cfg`` (None when it is)."""
    try:
        check_resume_config(asdict(run_train_config(run_dir)), asdict(cfg), run_dir, defaults=asdict(type(cfg)()))
    except ValueError as e:
        return str(e)
    return None


def tokenizer_tags(v: str, seed: int, tok_steps: int, ft_steps: int = 0) -> List[Tuple[str, int]]:
    """The run names (under ``OUT/tokenizers``) of a variant's tokenizer and, with ``ft_steps``, of its
    decoder-tuned copy, each with its decoder fine-tuning steps: ``[("ae_s0_t1000", 0), ("ae_s0_t1000_ft500", 500)]``."""
    tag = f"{v}_s{seed}_t{tok_steps}"
    return [(tag, 0)] + ([(f"{tag}_ft{ft_steps}", ft_steps)] if ft_steps else [])


def _recon_file(out: Path, tag: str) -> Path:
    """The reconstruction results of the tokenizer (decoder) ``tag``."""
    return out / "eval" / f"recon_{tag}.json"


def generator_label(P: ReproduceConfig, fam: str, gen_over: Dict) -> str:
    """Generator family ``fam``'s name in run folders, result files and result rows: the family, followed
    by its constructor arguments where ``model_args`` sets any (``sit-hidden_size256``). Generators of
    another size trained on the same tokenizers so get folders of their own, and one ``--out`` can hold
    both (the capacity presets reuse the map's tokenizers this way)."""
    args = json.loads(generator_config(P, fam, "<tokenizer>", 0, 0, gen_over).model_args or "{}")
    return "-".join([fam] + [f"{k}{v}".replace(" ", "") for k, v in sorted(args.items())])


def _gen_file(out: Path, label: str, tag: str, gen_steps: int) -> Path:
    """The generation results of generator ``label``'s samples rendered by the decoder ``tag``."""
    return out / "eval" / f"gen_{label}_{tag}_g{gen_steps}.json"


def _result_row(v: str, fam: str, seed: int, tok_steps: int, gen_steps: int, ft: Optional[int], rec: dict,
                ev: dict) -> dict:
    """One row of results.csv (``ft`` None: a reproduction without decoder fine-tuning, no such column)."""
    return {"variant": v, "generator": fam, "seed": seed, "tok_steps": tok_steps,
            **({"decoder_ft_steps": ft} if ft is not None else {}), "gen_steps": gen_steps, **rec, **ev}


def _tokenizer_stage(R: _Run, v: str, seed: int, tok_steps: int) -> List[Tuple[Path, str, int]]:
    """Train (or find) variant ``v``'s tokenizer, then its decoder fine-tuning when asked; returns
    ``[(folder, tag, decoder fine-tuning steps)]``: the tokenizer, then its decoder-tuned copy."""

    P = R.P
    (tag, _), *tuned = tokenizer_tags(v, seed, tok_steps, R.ft_steps)
    tok_dir = R.out / "tokenizers" / tag
    cfg = tokenizer_config(P, v, seed, tok_steps, R.tok_over)
    R.stage(f"tokenizer {variant_label(v, PAPER_VARIANTS)} seed {seed} ({tok_steps or 'preset'} steps)",
            tok_dir / "tokenizer" / "tokenizer.json", tok_steps, cfg, lambda: train_tokenizer(cfg, tok_dir))
    if not tuned:
        return [(tok_dir, tag, 0)]
    # ---- decoder fine-tuning: encoder frozen, clean latents, the decoder fine-tuning recipe
    ft_tag = tuned[0][0]
    ft_dir = R.out / "tokenizers" / ft_tag
    ft_cfg = tokenizer_config(P, v, seed, tok_steps, R.tok_over, parent=str(tok_dir), ft_steps=R.ft_steps)
    R.stage(f"decoder fine-tuning {ft_tag} ({R.ft_steps} steps, {P.decoder_ft()})", ft_dir / "tokenizer" / "tokenizer.json",
            R.ft_steps, ft_cfg, lambda: train_tokenizer(ft_cfg, ft_dir))
    return [(tok_dir, tag, 0), (ft_dir, ft_tag, R.ft_steps)]


def shares_latents(a, b) -> bool:
    """Whether two tokenizer runs (or exports) map images to the same normalised latents: their encoder
    weights and latent statistics are equal (``Tokenizer.encoder_state``), checked, not assumed."""
    sa, sb = load_tokenizer(a).encoder_state(), load_tokenizer(b).encoder_state()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _recon_stage(R: _Run, tok_dir: Path, tag: str, ft: int, seed: int, gen_evals: Dict[str, Path]):
    """The reconstruction ceiling and robustness of one tokenizer (decoder-tuned for ``ft`` steps):
    ``(rec, recon_feats, n)``, the metrics (from disk when done), the reconstructions' features per
    space (only when a generator evaluation still needs them) and the number of evaluation images."""

    P, D = R.P, R.D
    t = R.prog.stage(f"reconstruction metrics {tag}")
    rec_path = _recon_file(R.out, tag)
    rec = R.done(rec_path)
    need_feats = bool(broadcast_object(rec is None or any(not q.exists() for q in gen_evals.values())
                                       if R.main else None))
    if not need_feats:
        R.prog.end(t, skipped=True)
        return rec, {}, P.n_eval
    tok = load_tokenizer(tok_dir).to(R.dev).eval()
    cfg_t = run_train_config(tok_dir)
    R.resolution = int(cfg_t.model.image_size)
    test = build_dataset(cfg_t.data.dataset, split=cfg_t.data.eval_split, image_size=cfg_t.model.image_size,
                         channels=cfg_t.model.in_channels, root=cfg_t.data.data_root)
    n = min(P.n_eval, len(test))
    mine = list(range(D.rank, n, D.world_size))
    x_real, _ = fetch_batch(test, mine)
    if R.exts is None:  # rank 0 first: it trains/converts and caches the extractors' weights
        if R.main:
            R.exts = _extractors(P.features, R.dev, warm=True)
        barrier()
        R.exts = R.exts or _extractors(P.features, R.dev)
        R.real_feats = _gather(_local_features(R.exts, x_real, mine, R.n_space))
    with torch.no_grad():
        x_rec = _quantize(torch.cat([tok.reconstruct(b.to(R.dev)).cpu() for b in x_real.split(200)]))
    spaces = R.spaces(ft)
    recon_feats = _gather(_local_features(spaces, x_rec, mine, R.n_space))
    if rec is not None:
        R.prog.end(t, skipped=True)
        return rec, recon_feats, n
    noised = psnr_under_noise(tok, x_real, P.noise_levels, P.noise_gamma, P.noise_type, seed=seed, indices=mine,
                              batch_size=200, device=R.dev)
    per = {"psnr": psnr(x_real, x_rec)[1], "ssim": ssim(x_real, x_rec)[1],
           **{f"psnr_t{lvl:g}": noised[float(lvl)]["psnr"] for lvl in P.noise_levels}}
    per = _gather({k: (mine, vals.numpy()) for k, vals in per.items()})
    rec = {"n_recon": n, **{k: float(vals.mean()) for k, vals in per.items()}}
    for k in spaces:
        rec[f"fd_recon_real[{k}]"] = fd_from_features(recon_feats[k], R.real_feats[k])
    rec.update(_extractor_keys(spaces))
    R.save(rec_path, rec)
    R.prog.end(t)
    return rec, recon_feats, n


def _generator_stage(R: _Run, fam: str, label: str, tag: str, tok_dir: Path, seed: int, gen_steps: int) -> Path:
    """Train (or find) generator family ``fam`` (named ``label``, see ``generator_label``) on the tokenizer
    in ``tok_dir``; returns its folder."""
    gdir = R.out / "generators" / f"{label}_{tag}_g{gen_steps}"
    cfg = generator_config(R.P, fam, str(tok_dir), seed, gen_steps, R.gen_over)
    R.stage(f"generator {fam} on {tag} ({gen_steps or 'preset'} steps)", gdir / "generator" / "generator.json",
            gen_steps, cfg, lambda: train_generator(cfg, gdir))
    return gdir


def _reference(R: _Run) -> Dict[str, tuple]:
    """gFID's reference per space, ``{space: (mu, sigma, features or None)}``, and its record in
    ``R.ref_record``: ``P.reference`` in the Inception space when given and found (a missing preset
    default falls back, loudly, to the evaluation split's images; a missing reference asked for on the
    command line is an error), else the first n_eval images of the tokenizer's evaluation split."""
    if R.gen_ref is not None:
        return R.gen_ref
    split = {k: (*stats_from_features(f), f) for k, f in R.real_feats.items()}
    R.ref_record = {"kind": "evaluation split", "label": f"the first {R.P.n_eval} images of the evaluation split"}
    spec = R.reference_spec
    if spec and "inception" in R.exts:
        def load():
            ref = Reference.parse(spec, resolution=R.resolution, count=R.P.n_eval)
            return ref, ref.stats("inception", R.exts["inception"], 2048)

        got, err = None, None
        if R.main:  # rank 0 computes (and caches) the reference's features; the others then read them
            try:
                got = load()
            except (FileNotFoundError, OSError, ValueError, KeyError) as e:
                err = f"{type(e).__name__}: {e}"
        err = broadcast_object(err)
        if err is None:
            ref, split["inception"] = got if R.main else load()
            R.ref_record = {**ref.record(), "label": ref.label}
        elif R.reference_required:
            raise ValueError(f"reference {spec}: {err}")
        else:
            R.ref_record["fallback_from"] = spec
            R.say(f"\n*** WARNING: the reference {spec} is not available ({err.splitlines()[0]}).\n"
                  f"*** gFID FALLS BACK to {R.ref_record['label']}: NOT comparable with the paper's numbers.\n"
                  f"*** Fetch it with `ldetok weights download {spec}` (or pass --reference).\n", flush=True)
    R.gen_ref = split
    return split


def _ref_metrics(ref: tuple, f: np.ndarray) -> Tuple[float, Optional[float]]:
    """(FD, KID or None) of features ``f`` against a reference ``(mu, sigma, features or None)``."""
    mu, sigma, feats = ref
    fd = fid_from_stats(*stats_from_features(f), mu, sigma)
    return fd, (kid_from_features(f, feats)[0] if feats is not None else None)


def _search_guidance(R: _Run, gen, gtok, fam: str, seed: int, n: int) -> Tuple[float, Dict[str, float]]:
    """``guidance_sweep`` over the family's grid: FD of its n_search samples (at its search steps) to
    the reference (Inception when measured, else the first space), on other seeds than the final samples'."""

    sp = R.P.sampling(fam)
    space = "inception" if "inception" in R.exts else next(iter(R.exts))
    ns = min(sp.n_search, n)
    ref = _reference(R)[space]

    def score(images, indices, _protocol) -> float:
        f = _gather(_local_features({space: R.exts[space]}, _quantize(images), indices, lambda k: None))[space]
        return _ref_metrics(ref, f)[0]

    best, table = guidance_sweep(gen, gtok, sp.guidance_scales, ns, score, steps=sp.search_steps, seed=seed + 500,
                                 temperature=sp.temperature)
    searched = {f"{g:g}": v for g, v in table.items()}
    R.say(f"  cfg search ({space} FD, {ns} samples, {sp.search_steps or 'default'} steps): {searched} -> cfg {best:g}")
    return best, searched


def _evaluation_stage(R: _Run, gdir: Path, fam: str, seed: int, n: int, decoders: Sequence[Tuple[Path, str, int]],
                      recon_feats: Sequence[Dict[str, np.ndarray]]) -> List[dict]:
    """Sample ``n`` class-balanced latents (this rank: images rank, rank + world, ...; seeded seed + 1000
    rank) at the family's (or the searched) guidance scale and decode the same latents with each of
    ``decoders`` (the generator's tokenizer, then its decoder-tuned copy); per decoder, FD and KID against
    the reference and FD against its own reconstructions in every space, and a grid of the first 80. The
    guidance scale is searched with the first decoder and used for all, so they decode the same samples."""

    D = R.D
    gen, gtok, gm = load_generator_run(gdir, R.dev)
    toks = [gtok] + [load_tokenizer(d).to(R.dev).eval() for d, _, _ in decoders[1:]]
    sp = R.P.sampling(fam)
    guidance_scale, searched = sp.guidance_scale, {}
    if sp.guidance_scales:
        guidance_scale, searched = _search_guidance(R, gen, gtok, fam, seed, n)
    mine = list(range(D.rank, n, D.world_size))
    labels = [i % gen.num_classes for i in mine] if gen.num_classes else None
    decoded, _ = generate_images(gen, toks, len(mine), guidance_scale=guidance_scale, steps=sp.final_steps,
                                 temperature=sp.temperature, seed=seed + 1000 * D.rank, labels=labels)
    ref = _reference(R)
    first = [j for j, i in enumerate(mine) if i < 80]  # this rank's share of the grid's first 80 images
    evs = []
    for (_, tag, ft), imgs, rfeats in zip(decoders, decoded, recon_feats):
        imgs = _quantize(imgs)
        feats = _gather(_local_features(R.spaces(ft), imgs, mine, R.n_space, logits=True))
        logits = feats.pop("inception_logits", None)
        grid = _gather({"grid": ([mine[j] for j in first], imgs[first].numpy() if first else None)})["grid"]
        ev = {"generator_loss": gm.get("final_loss_smooth"), "cfg": guidance_scale, "n": n,
              "sample_steps": sp.final_steps, "temperature": sp.temperature, "world_size": D.world_size,
              "reference": R.ref_record["label"], "generator_tokenizer": decoders[0][1]}
        if searched:
            ev["cfg_search"] = json.dumps({"n": min(sp.n_search, n), "steps": sp.search_steps, "fd": searched})
        if logits is not None:  # the real torch-fidelity Inception weights are present
            ev["is[inception]"] = inception_score_from_logits(logits)[0]
        ev.update(_extractor_keys({k: R.exts[k] for k in feats}))
        for k, f in feats.items():
            ev[f"n[{k}]"] = len(f)
            ev[f"fd_gen_real[{k}]"], ev[f"kid_gen_real[{k}]"] = _ref_metrics(ref[k], f)
            ev[f"fd_gen_recon[{k}]"] = fd_from_features(f, rfeats[k])
        if R.main:
            save_grid(torch.from_numpy(grid), R.out / "samples" / f"{gdir.name}{f'_ft{ft}' if ft else ''}.png", nrow=10)
        evs.append(ev)
    return evs


def _variant_rows(R: _Run, v: str, seed: int, tok_steps: int, gen_steps: int) -> List[dict]:
    """Every stage of one (budget, seed, variant): tokenizer (and its decoder fine-tuning), reconstruction
    metrics, then per generator family its training and evaluation; one result row per family and
    decoder. A decoder-tuned copy that shares its parent's latents (checked) reuses the parent's latent
    cache and generator: the same sampled latents are decoded by both decoders, side by side. One whose
    encoder changed gets generators of its own."""
    P = R.P
    toks = _tokenizer_stage(R, v, seed, tok_steps)
    shared = len(toks) == 2 and bool(broadcast_object(shares_latents(toks[0][0], toks[1][0]) if R.main else None))
    if len(toks) == 2 and not shared:
        R.say(f"  {toks[1][1]}: its encoder or latent statistics differ from {toks[0][1]}'s: generators are "
              "trained on it separately")
    decoders = toks if shared else toks[-1:]
    gen_dir, gen_tag = decoders[0][0], decoders[0][1]
    labels = {fam: generator_label(P, fam, R.gen_over) for fam in P.generators}
    evals = {(fam, tag): _gen_file(R.out, labels[fam], tag, gen_steps) for fam in P.generators for _, tag, _ in decoders}
    # every decoder's reconstruction features are needed while any of the evaluations is missing
    recs = [_recon_stage(R, d, tag, ft, seed, {str(q): q for q in evals.values()}) for d, tag, ft in decoders]
    n = recs[0][2]
    rows = []
    for fam in P.generators:
        gdir = _generator_stage(R, fam, labels[fam], gen_tag, gen_dir, seed, gen_steps)
        paths = [evals[(fam, tag)] for _, tag, _ in decoders]
        t = R.prog.stage(f"sample {n} and evaluate {gdir.name}" + (" with both decoders" if shared else ""))
        evs = [R.done(p) for p in paths]
        skipped = all(ev is not None for ev in evs)
        if not skipped:
            evs = _evaluation_stage(R, gdir, fam, seed, n, decoders, [r[1] for r in recs])
            for p, ev in zip(paths, evs):
                R.save(p, ev)
        R.prog.end(t, skipped)
        for (_, _, ft), (rec, _, _), ev in zip(decoders, recs, evs):
            rows.append(_result_row(v, labels[fam], seed, tok_steps, gen_steps, ft if R.ft_steps else None, rec, ev))
    return rows


def collect_rows(P: ReproduceConfig, out: Path, seeds, variants, budgets, ft_steps: int,
                 gen_over: Dict) -> Tuple[List[dict], List[str]]:
    """The result rows of every finished (budget, seed, variant, generator, decoder) in ``out``, read from
    its ``eval/`` files as ``reproduce`` writes them, and the tags of those not finished; trains nothing."""
    rows, missing = [], []
    for (tok_steps, gen_steps), seed, v, fam in itertools.product(budgets, seeds, variants, P.generators):
        label = generator_label(P, fam, gen_over)
        for tag, ft in tokenizer_tags(v, seed, tok_steps, ft_steps):
            rec, ev = _done(_recon_file(out, tag)), _done(_gen_file(out, label, tag, gen_steps))
            if rec is None or ev is None:
                missing.append(f"{label}_{tag}_g{gen_steps}")
            else:
                rows.append(_result_row(v, label, seed, tok_steps, gen_steps, ft if ft_steps else None, rec, ev))
    return rows, missing


def _with_command_line(P: ReproduceConfig, guidance_scales, n_search, gen_overrides: Dict,
                       families: Optional[Dict[str, Dict]], reference: Optional[str]) -> ReproduceConfig:
    """The preset with the command line's settings, which beat the preset's per-family ones: each is
    written into ``families`` under the name of every generator it concerns (``--cfg-search``,
    ``--n-search`` and ``--gen sample_steps=N`` concern all; ``--gen-for FAMILY`` its own)."""
    fams = {k: dict(v) for k, v in P.families.items()}
    every = {}
    if guidance_scales is not None:
        every["guidance_scales"] = tuple(float(g) for g in guidance_scales)
    if n_search is not None:
        every["n_search"] = int(n_search)
    if (gen_overrides or {}).get("sample_steps") is not None:  # the final and the search steps
        every["final_steps"] = every["search_steps"] = int(gen_overrides["sample_steps"])
    for name in P.generators:
        own = {}
        for key, settings in (families or {}).items():
            if key in (name, generators.family_of(name)):
                own.update(settings)
        if every or own:
            fams[name] = {**fams.get(name, {}), **every, **own}
    unknown = [k for k in (families or {}) if not any(k in (n, generators.family_of(n)) for n in P.generators)]
    if unknown:
        raise ValueError(f"--gen-for {', '.join(unknown)}: no such generator in this reproduction "
                         f"({', '.join(P.generators)})")
    P = replace(P, families=fams, reference=reference if reference is not None else P.reference)
    return P.validate()


def reproduce(preset: str, out, seeds: Optional[Sequence[int]] = None, variants: Optional[Sequence[str]] = None,
              device: str = "auto", figures_dir="figures", budgets: Optional[Sequence[Tuple[int, int]]] = None,
              tok_overrides: Optional[Dict] = None, gen_overrides: Optional[Dict] = None,
              decoder_ft_steps: Optional[int] = None, guidance_scales: Optional[Sequence[float]] = None,
              n_search: Optional[int] = None, families: Optional[Dict[str, Dict]] = None,
              reference: Optional[str] = None, dry_run: bool = False, collect: bool = False) -> List[dict]:
    """Run (or resume) a reproduction; see the module docstring. Under torchrun every rank trains (DDP)
    and evaluates its share of the images (image i on rank i mod world size; sample chunks seeded by
    seed and rank), rank 0 decides which stages are done and writes every file. ``guidance_scales``
    (with ``n_search``) replaces every family's guidance-scale search; ``families`` ({family or name:
    settings}, ``--gen-for``) sets one family's sampling or training settings; ``reference`` replaces the
    preset's gFID reference (and must then exist). ``dry_run`` prints the protocol and returns;
    ``collect`` writes the results of the finished stages only (``collect_rows``), starting none."""

    P = _with_command_line(resolve_reproduce_config(preset), guidance_scales, n_search, gen_overrides or {},
                           families, reference)
    seeds = list(seeds if seeds is not None else P.seeds)
    variants = list(variants or P.variants)
    for v in variants:
        variant_settings(v)  # a clear error naming an unknown variant
    budgets = [tuple(b) for b in (budgets or P.budgets)]
    ft_steps = P.decoder_ft_steps if decoder_ft_steps is None else int(decoder_ft_steps)
    tok_over = {**P.tok_overrides, **(tok_overrides or {})}
    gen_over = {**P.gen_overrides, **(gen_overrides or {})}
    if dry_run:
        print(protocol_table(P, preset, variants, budgets, ft_steps, tok_over, gen_over))
        return []
    if collect:
        rows, missing = collect_rows(P, Path(out), seeds, variants, budgets, ft_steps, gen_over)
        print(f"{len(rows)} finished result rows; {len(missing)} not finished" +
              (f": {', '.join(missing)}" if missing else ""))
        if rows:
            _write_results(P, preset, rows, Path(out), Path(figures_dir))
        return rows
    if reference is not None:  # asked for on the command line: it must exist, checked before any training
        Reference.parse(reference, count=P.n_eval)
    out = Path(out)
    owns_group = not is_distributed()
    D = init_distributed(device)
    plan = []
    for tok_steps, gen_steps in budgets:
        for _ in range(len(seeds) * len(variants)):
            plan += [("tokenizer", tok_steps or 1000)] + ([("tokenizer", ft_steps)] if ft_steps else [])
            plan += [("recon", P.n_eval)] * (2 if ft_steps else 1)
            plan += [("generator", gen_steps or 1000), ("sample", P.n_eval)] * len(P.generators)
    R = _Run(P, out, D, tok_over, gen_over, ft_steps, _Progress(plan, verbose=D.is_main))
    R.reference_required = reference is not None
    rows: List[dict] = []
    try:
        for tok_steps, gen_steps in budgets:
            for seed in seeds:
                for v in variants:
                    rows += _variant_rows(R, v, seed, tok_steps, gen_steps)
        if R.main:
            _write_results(P, preset, rows, out, Path(figures_dir))
        R.say(f"[{(time.time() - R.prog.t0) / 60:6.1f} min] done: {out / 'results.md'}", flush=True)
    finally:
        if owns_group:
            cleanup()
    return rows


def _length(optim) -> str:
    return f"{optim.epochs:g} epochs" if optim.epochs is not None else f"{optim.max_steps} steps"


def _reference_status(P: ReproduceConfig) -> str:
    if not P.reference:
        return f"the first {P.n_eval} images of the evaluation split"
    try:
        found = (W.locate(P.reference)[0] if W.is_spec(P.reference)
                 else (Path(P.reference) if Path(P.reference).exists() else None))
    except KeyError:
        found = None
    if W.is_spec(P.reference) or P.reference.endswith(".npz"):
        return f"{P.reference} ({'present: ' + str(found) if found else 'NOT here: falls back to the evaluation split'})"
    return P.reference


def protocol_table(P: ReproduceConfig, preset: str, variants, budgets, ft_steps: int, tok_over: Dict,
                   gen_over: Dict) -> str:
    """Every protocol value of a reproduction, per variant and generator family (``--dry-run``)."""
    is_on = inception_score_available() if "inception" in P.features else False
    lines = [f"# ldetok reproduce --preset {preset} --dry-run", "",
             f"- gFID reference: {_reference_status(P)}; rFID and the classifier space: the evaluation split",
             f"- Inception Score: {'on' if is_on else 'off (the real torch-fidelity Inception weights are not here)'}",
             f"- feature spaces: {', '.join(P.features)}; n = {P.n_eval} samples per evaluation"
             + (f" (Inception on the first {P.n_inception})" if P.n_inception else "")
             + (f"; untuned decoders: {', '.join(P.untuned_features)} only"
                if ft_steps and P.untuned_features is not None else ""),
             f"- budgets (tokenizer/generator steps; 0 = the preset's length): {budgets}", ""]
    rows = []
    for (ts, gs) in budgets:
        for v in variants:
            tcfg = tokenizer_config(P, v, 0, ts, tok_over)
            stats = ("whole training split, no flips" if tcfg.stats_images is None
                     else f"class-stratified {tcfg.stats_images} images, no flips")
            ft = (f"{P.decoder_ft()} for {ft_steps} steps" if ft_steps else "none")
            for name in P.generators:
                gcfg = generator_config(P, name, "<tokenizer>", 0, gs, gen_over)
                sp = P.sampling(name)
                grid = ",".join(f"{g:g}" for g in sp.guidance_scales) or f"none (cfg {sp.guidance_scale:g})"
                c = tcfg.corruption
                rows.append([v, f"{tcfg.model.name} γ={c.gamma:g} M={c.max_mask_ratio:g}, {_length(tcfg.optim)}", stats, ft,
                             f"{gcfg.model} {_length(gcfg.optim)} {gcfg.model_args or ''}".strip(),
                             grid, str(sp.n_search if sp.guidance_scales else "-"), str(sp.search_steps or "default"),
                             str(sp.final_steps or "default"), f"{sp.temperature:g}"])
    return "\n".join(lines) + _fmt_table(rows, ["variant", "tokenizer", "latent statistics", "decoder fine-tuning",
                                               "generator", "CFG grid", "search n", "search steps", "final steps",
                                               "temperature"])


def _variant_key(r: dict) -> str:
    """A result row's line in the tables and figures: its variant, and which decoder rendered it."""
    ft = int(r.get("decoder_ft_steps") or 0)
    return f"{r['variant']}+ft{ft}" if ft else r["variant"]


def variant_label(v: str, names: Dict[str, str] = LABELS) -> str:
    """A variant's name for tables and figures: the paper's for the named four, else its settings."""
    if v in names:
        return names[v]
    st = variant_settings(v)
    return f"γ={st['gamma']:g}, M={st['max_mask_ratio']:g}" + (" (additive)" if st.get("noise_type") else "")


def _label(key: str, names: Dict[str, str]) -> str:
    v, _, ft = key.partition("+ft")
    return variant_label(v, names) + (f", decoder fine-tuned {ft} steps" if ft else "")


def _variant_order(key: str) -> tuple:
    v, _, ft = key.partition("+ft")
    st = variant_settings(v)
    return (list(PAPER_VARIANTS).index(v) if v in PAPER_VARIANTS else len(PAPER_VARIANTS), st["gamma"],
            st["max_mask_ratio"], st.get("noise_type", ""), int(ft or 0))


def _fmt_table(rows, headers) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def headline_table(rows: List[dict]) -> str:
    """The compact table ``make run`` prints: one line per (budget, generator, variant); with several
    seeds, mean ± standard deviation over them."""
    cols = [("PSNR", "psnr", ".2f"), ("PSNR t=0.5", "psnr_t0.5", ".2f"),
            ("rFID", "fd_recon_real[inception]", ".1f"), ("gFID", "fd_gen_real[inception]", ".1f"),
            ("KID", "kid_gen_real[inception]", ".4f"), ("IS", "is[inception]", ".1f"),
            ("FD(samples, recon)", "fd_gen_recon[inception]", ".1f"),
            ("FD-clf(samples, real)", "fd_gen_real[classifier]", ".1f"),
            ("FD-clf(samples, recon)", "fd_gen_recon[classifier]", ".1f"), ("gen loss", "generator_loss", ".3f")]
    cols = [c for c in cols if any(r.get(c[1]) not in (None, "") for r in rows)]
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["tok_steps"], r["gen_steps"], r["generator"], _variant_key(r)), []).append(r)

    def cell(rs, key, fmt):
        vals = [float(r[key]) for r in rs if r.get(key) not in (None, "")]
        if not vals:
            return "–"  # not measured (e.g. an untuned decoder outside untuned_features)
        if len(vals) < len(rs):
            return "n/a"
        mean = sum(vals) / len(vals)
        if len(vals) == 1:
            return format(mean, fmt)
        std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
        return f"{format(mean, fmt)} ± {format(std, fmt)}"

    out = [[_label(v, LABELS), f"{ts}/{gs}", fam] + [cell(rs, k, f) for _, k, f in cols]
           for (ts, gs, fam, v), rs in groups.items()]
    return _fmt_table(out, ["tokenizer", "steps tok/gen", "generator"] + [c[0] for c in cols])


def _write_results(P, preset, rows, out: Path, figures: Path) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    metrics = [k for k in keys if k not in ("variant", "generator", "seed", "tok_steps", "gen_steps", "cfg", "n",
                                            "n_recon", "sample_steps", "world_size", "decoder_ft_steps",
                                            "cfg_search", "temperature", "reference", "generator_tokenizer")
               and not k.startswith(("n[", "features["))]
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["tok_steps"], r["gen_steps"], r["generator"], _variant_key(r)), []).append(r)
    scales = sorted({float(r["cfg"]) for r in rows})
    scale_text = f"{scales[0]:g}" if len(scales) == 1 else "chosen per run by FD search, see results.csv"
    counted = {k: next((r[f"n[{k}]"] for r in rows if f"n[{k}]" in r), None) for k in P.features}
    counts = "; ".join(f"{k}: first {n}" for k, n in counted.items() if n is not None)
    if P.untuned_features is not None and any(r.get("decoder_ft_steps") for r in rows):
        counts += f"; untuned decoders: {', '.join(P.untuned_features)} only"
    lines = [f"# ldetok reproduce --preset {preset}", "",
             f"Test images and class-balanced samples (cfg {scale_text}, EMA weights, "
             f"{rows[0]['sample_steps'] or 'default'} sampler steps), n = {rows[0]['n']} per set; feature spaces "
             f"({counts or ', '.join(P.features)}); seeds {sorted({r['seed'] for r in rows})}, mean ± std over seeds."
             + (f" Decoder fine-tuning ({max(int(r.get('decoder_ft_steps') or 0) for r in rows)} steps, encoder frozen): "
                "where the tuned tokenizer shares its parent's latents, the parent's generator is reused and "
                "the same sampled latents are decoded by both decoders (rows with and without `decoder fine-tuned`)."
                if any(r.get("decoder_ft_steps") for r in rows) else "")
             + (f" gFID/KID reference: {rows[0]['reference']}." if rows[0].get("reference") else ""),
             *mixed_extractors(rows), "",
             "- `psnr`, `ssim`: clean reconstructions (posterior mean, 8-bit rounded); `psnr_tT`: decodes (float) of "
             "raw latents corrupted by (1-t)·z + t·3·ε, each image's ε seeded by (seed, image index) "
             "(`ldetok.eval.psnr_under_noise`, as `ldetok eval-tokenizer --noise` measures it).",
             "- `fd_recon_real[S]`: Fréchet distance of reconstructions to the real images in space S: the "
             "reconstruction ceiling (rFID in Inception space).",
             "- `fd_gen_real[S]`, `kid_gen_real[S]`: samples against real images (gFID and KID in Inception space; "
             "KID as the raw unbiased MMD², not ×10³).",
             "- `fd_gen_recon[S]`: samples against the tokenizer's own reconstructions: how well the generator "
             "models the latents, free of the reconstruction ceiling.",
             "- `generator_loss`: the generator's smoothed final training loss on its normalised latents.",
             "- `classifier`: a small Fashion-MNIST CNN's 128-d features (a quick second space, beside Inception); "
             "`inception`: FID-Inception pool3, 2048-d. Distances in the two spaces are not comparable.",
             "",
             "## Headline", "", headline_table(rows), "", "## All metrics", "",
             "| tok steps | gen steps | generator | variant | " + " | ".join(metrics) + " |",
             "|" + "---|" * (4 + len(metrics))]
    for (ts, gs, fam, v), rs in groups.items():
        cells = []
        for m in metrics:
            vals = [float(r[m]) for r in rs if r.get(m) is not None]
            cells.append("–" if not vals else f"{np.mean(vals):.3g}" + (f" ± {np.std(vals):.2g}" if len(vals) > 1 else ""))
        lines.append(f"| {ts} | {gs} | {fam} | {_label(v, PAPER_VARIANTS)} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if len({(r["tok_steps"], r["gen_steps"]) for r in rows}) > 1:
        _plot_budget(groups, metrics, preset, figures)


KEY_METRICS = ("fd_recon_real[inception]", "fd_gen_real[inception]", "fd_gen_recon[inception]", "generator_loss")
_ORDER = ("psnr", "ssim", "psnr_t", "fd_recon_real", "fd_gen_real", "kid_gen_real", "fd_gen_recon", "generator_loss")
_TITLES = {"fd_recon_real": "reconstruction ceiling: FD(recon, real)", "fd_gen_real": "FD(samples, real)",
           "kid_gen_real": "KID(samples, real)", "fd_gen_recon": "modelability: FD(samples, recon)",
           "generator_loss": "generator loss (final, smoothed)", "psnr": "PSNR clean (dB)", "ssim": "SSIM clean"}


def mixed_extractors(rows: Sequence[dict]) -> List[str]:
    """A warning per feature space whose rows were measured with different weights (e.g. a classifier
    retrained on another machine: its FDs are then not comparable across those rows), else nothing.
    Rows from before the weights were recorded are not counted."""
    out = []
    for col in sorted({k for r in rows for k in r if k.startswith("features[")}):
        keys = sorted({str(r[col]) for r in rows if r.get(col) not in (None, "")})
        if len(keys) > 1:
            out.append(f"**Not comparable across rows: {col[9:-1]}-space distances were measured with "
                       f"{len(keys)} different weights ({', '.join(keys)}).**")
            print(f"warning: {out[-1].strip('*')}")
    return out


def _title(m: str) -> str:
    base, _, space = m.partition("[")
    space = space.rstrip("]")
    if base.startswith("psnr_t"):
        return f"PSNR, latents noised at t={base[6:]} (dB)"
    t = _TITLES.get(base, base)
    if space == "inception" and base in ("fd_recon_real", "fd_gen_real"):
        t = {"fd_recon_real": "rFID = FD(recon, real)", "fd_gen_real": "gFID = FD(samples, real)"}[base]
    return f"{t} [{space}]" if space else t


def _plot_budget(groups, metrics, preset, figures: Path) -> None:
    """Each metric against the budget (tokenizer + generator steps, log axis), one line per variant, the
    seeds' mean with their standard deviation as error bars; one figure per generator family, and a
    four-panel figure of the key metrics (ceiling, gFID, modelability, generator loss) when measured."""
    import matplotlib.ticker
    from matplotlib.figure import Figure  # the object API: no pyplot state, no backend switch

    figures.mkdir(parents=True, exist_ok=True)
    def rank(m: str) -> int:
        return next((i for i, p in enumerate(_ORDER) if m == p or (p not in ("psnr", "ssim") and m.startswith(p))),
                    len(_ORDER))

    metrics = sorted(metrics, key=lambda m: (rank(m), m))
    budgets = sorted({(k[0], k[1]) for k in groups})
    for fam in sorted({k[2] for k in groups}):
        key = [m for m in KEY_METRICS if m in metrics]
        for suffix, ms in (("", metrics), ("_key", key if len(key) == len(KEY_METRICS) else [])):
            if not ms:
                continue
            ncols = min(4, len(ms))
            nrows = math.ceil(len(ms) / ncols)
            fig = Figure(figsize=(3.4 * ncols, 2.9 * nrows))
            axes = fig.subplots(nrows, ncols, squeeze=False)
            for ax, m in zip(axes.flat, ms):
                for v in dict.fromkeys(k[3] for k in sorted(groups, key=lambda k: _variant_order(k[3]))):
                    pts = sorted((k[0] + k[1], [float(r[m]) for r in rs if r.get(m) not in (None, "")])
                                 for k, rs in groups.items() if k[2] == fam and k[3] == v)
                    pts = [(b, vals) for b, vals in pts if vals]
                    if pts:
                        ax.errorbar([b for b, _ in pts], [np.mean(x) for _, x in pts],
                                    yerr=[np.std(x) for _, x in pts], marker="o", ms=3,
                                    label=_label(v, LABELS), capsize=2)
                ax.set_title(_title(m), fontsize=8)
                ax.set_xscale("log")
                ax.set_xticks([a + b for a, b in budgets])
                ax.set_xticklabels([f"{a}/{b}" for a, b in budgets], rotation=30, fontsize=6)
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.tick_params(axis="y", labelsize=7)
                ax.set_xlabel("tokenizer/generator steps", fontsize=7)
            for ax in list(axes.flat)[len(ms):]:
                ax.axis("off")
            axes.flat[0].legend(fontsize=6)
            fig.suptitle(f"ldetok reproduce --preset {preset}: {fam}", fontsize=9)
            fig.tight_layout()
            fig.savefig(figures / f"reproduce_{preset}_{fam}{suffix}.png", dpi=110)
