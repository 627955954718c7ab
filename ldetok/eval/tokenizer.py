"""Evaluate a tokenizer run: clean reconstruction and reconstruction of corrupted latents.

``ldetok eval-tokenizer RUN_DIR --n 500 --noise 0.3,0.5,0.7`` prints every number with its protocol
and writes them to ``RUN_DIR/eval/recon_n{N}.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from ..corruption import CorruptionConfig
from ..data import build_dataset
from ..engine.distributed import resolve_device
from ..losses import MissingWeightsError
from ..losses.perceptual import LPIPS
from ..runs import load_tokenizer, run_corruption, run_train_config
from .recon import evaluate_reconstruction

__all__ = ["evaluate_tokenizer_run", "lpips_or_reason"]


def lpips_or_reason(device):
    """(lpips_fn, None) when the VGG16 weights are on disk, else (None, reason)."""
    try:
        net = LPIPS().to(device)
    except MissingWeightsError as e:
        return None, str(e).splitlines()[0]

    def fn(x, y):
        return net.distance(x, y).flatten(1).mean(1) if x.shape[1] == 3 else net.distance(
            x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)).flatten(1).mean(1)

    return fn, None


def evaluate_tokenizer_run(run_dir, n: int = 500, noise_levels: Sequence[float] = (), gamma: Optional[float] = None,
                           noise_type: Optional[str] = None, rfid: bool = True, batch_size: int = 100, device: str = "auto",
                           split: Optional[str] = None, seed: int = 0, verbose: bool = True,
                           rfid_corrupted: bool = True) -> dict:
    """Clean reconstruction metrics of the first ``n`` images of the run's evaluation split, then the
    same metrics of reconstructions decoded from raw latents noised at each of ``noise_levels``
    (``gamma``, ``noise_type``; each image's ε seeded by (``seed``, its index), as ``psnr_under_noise``).
    ``gamma`` / ``noise_type`` default to the run's own corruption settings (γ of the paper's recipe,
    3, for a run trained without noise, whose own γ of 0 would measure nothing)."""

    dev = resolve_device(device)
    run_dir = Path(run_dir)
    tok = load_tokenizer(run_dir).to(dev).eval()
    cfg = run_train_config(run_dir)
    own = run_corruption(run_dir)
    gamma = gamma if gamma is not None else (own.gamma if own.noise_on else CorruptionConfig().gamma)
    noise_type = noise_type or own.noise_type
    split = split or cfg.data.eval_split
    ds = build_dataset(cfg.data.dataset, split=split, image_size=cfg.model.image_size,
                       channels=cfg.model.in_channels, root=cfg.data.data_root)
    n = min(n, len(ds))
    lpips_fn, why = lpips_or_reason(dev)
    extra = {"ema": True, "tokenizer": run_dir.name}
    if why and verbose:
        print(f"LPIPS unavailable: {why}")
    results = {"clean": evaluate_reconstruction(tok, ds, n, dev, f"{cfg.data.dataset}/{split}", batch_size,
                                                compute_rfid=rfid, lpips_fn=lpips_fn, protocol_extra=extra)}
    for t in noise_levels:  # each image's ε seeded by (seed, its index): psnr_under_noise's values
        results[f"t={t:g}"] = evaluate_reconstruction(
            tok, ds, n, dev, f"{cfg.data.dataset}/{split}", batch_size, compute_rfid=rfid and rfid_corrupted,
            lpips_fn=lpips_fn, noise_level=float(t), gamma=gamma, noise_type=noise_type, noise_seed=seed,
            protocol_extra=extra)
    out = {k: {m: r.to_dict() for m, r in v.items()} for k, v in results.items()}
    path = run_dir / "eval" / f"recon_n{n}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    if verbose:
        for k, v in results.items():
            print(f"-- {k}")
            for r in v.values():
                print("   " + r.format())
        print(f"written to {path}")
    return out
