"""The run folder: its layout, what a folder is, the saved train config, exports, and atomic writes.

A training run writes one folder::

    RUN/
      config.json           the train config, written when the run starts (``save_train_config``)
      metrics.jsonl         one JSON record per logged step (``engine.logging.RunLogger``)
      log.txt               timestamped log lines
      tb/                   TensorBoard events (optional)
      wandb_run_id.txt      the wandb run a resume continues (optional)
      checkpoints/          ckpt_{step:09d}.pt, latest.json and manifest.json (each checkpoint's sha256,
                            written after it; ``engine.checkpoint.CheckpointManager``)
      .lock                 held by the one process training in the folder (``RunFolderLock``)
      images/               PNG grids written during training
      samples/              samples drawn from a finished generator (``ldetok sample``)
      eval/                 evaluation results
      tokenizer/            a finished tokenizer run's export: model.safetensors + tokenizer.json
      generator/            a finished generator run's export: model.safetensors + generator.json
      latents/<dataset>_<split>[_flip]/   the default latent cache of a tokenizer run

``tokenizer.json`` holds the tokenizer's kind and architecture config, whether it has latent
statistics, and (from the trainer) the step and the run's train config; ``generator.json`` the
generator's kind and config, the tokenizer run it was trained on, the step and the train config.

Every file here is written through one atomic writer (a temp file in the same folder, fsync,
``os.replace``): a killed process leaves the previous file or the new one, never half of one.
A file that is damaged anyway (a disk fault, a bad copy, an edit) is reported as a ``DamagedFileError``
naming it and what to do, never as the loader's own exception.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import hashlib
import io
import json
import os
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .config import GeneratorTrainConfig, TokenizerTrainConfig, config_from_dict
from .corruption import CorruptionConfig
from .generators import build_from_config as build_generator_from_config
from .tokenizers import LEGACY_CORRUPTION_KEYS, Tokenizer
from .tokenizers import build_from_config as build_tokenizer_from_config

__all__ = [
    "CONFIG", "METRICS", "LOG", "WEIGHTS", "TOKENIZER_META", "GENERATOR_META", "CHECKPOINT_POINTER",
    "CHECKPOINT_MANIFEST", "RUN_LOCK",
    "RunLayout", "RunKind", "RunFolderError", "DamagedFileError", "RunFolderBusy", "RunFolderLock", "run_kind", "describe",
    "tokenizer_dir", "generator_dir", "tokenizer_meta", "generator_meta",
    "save_train_config", "run_train_config", "run_corruption",
    "save_tokenizer", "load_tokenizer", "save_generator", "load_generator_run",
    "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save", "atomic_save_digest",
    "file_digest", "to_jsonable",
]

# ---------------------------------------------------------------------------------------------
# File names
# ---------------------------------------------------------------------------------------------
CONFIG = "config.json"
METRICS = "metrics.jsonl"
LOG = "log.txt"
WEIGHTS = "model.safetensors"
TOKENIZER_META = "tokenizer.json"
GENERATOR_META = "generator.json"
CHECKPOINT_POINTER = "latest.json"
CHECKPOINT_MANIFEST = "manifest.json"
RUN_LOCK = ".lock"


class RunLayout:
    """Every path of a run folder rooted at ``root`` (nothing is created or checked)."""

    def __init__(self, root):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    config = property(lambda self: self.root / CONFIG)
    metrics = property(lambda self: self.root / METRICS)
    log = property(lambda self: self.root / LOG)
    tensorboard = property(lambda self: self.root / "tb")
    wandb_id = property(lambda self: self.root / "wandb_run_id.txt")
    checkpoints = property(lambda self: self.root / "checkpoints")
    checkpoint_pointer = property(lambda self: self.root / "checkpoints" / CHECKPOINT_POINTER)
    checkpoint_manifest = property(lambda self: self.root / "checkpoints" / CHECKPOINT_MANIFEST)
    lock = property(lambda self: self.root / RUN_LOCK)
    images = property(lambda self: self.root / "images")
    samples = property(lambda self: self.root / "samples")
    eval = property(lambda self: self.root / "eval")
    tokenizer = property(lambda self: self.root / "tokenizer")
    generator = property(lambda self: self.root / "generator")
    latents = property(lambda self: self.root / "latents")

    def image(self, name: str) -> Path:
        """``images/<name>.png``."""
        return self.images / f"{name}.png"

    def latent_cache(self, dataset: str, split: str, flip: bool = False) -> Path:
        """The default latent-cache folder of a tokenizer run for ``dataset``/``split``."""
        return self.latents / f"{dataset}_{split}{'_flip' if flip else ''}"


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; not possible (nor needed) on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[io.BufferedWriter], Any]) -> Path:
    """Call ``write(f)`` on a temp file next to ``path`` (``.<name>.<random>.tmp``), fsync it, then
    ``os.replace`` it onto ``path``. On any error (KeyboardInterrupt too) the temp file is removed and
    ``path`` keeps its previous content. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target so os.replace is a rename on one filesystem (atomic), not a copy.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run files and caches are meant to be readable by others
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(data: bytes, path) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path) -> Path:
    """Write a text file (UTF-8) atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(obj: Any, path, indent: Optional[int] = 2, sort_keys: bool = False) -> Path:
    """``obj`` (through ``to_jsonable``) as JSON with a final newline, atomically."""
    return atomic_write_text(json.dumps(to_jsonable(obj), indent=indent, sort_keys=sort_keys) + "\n", path)


def atomic_save(obj: Any, path) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace`` onto ``path``."""
    return atomic_write(path, lambda f: torch.save(obj, f))


class _HashingWriter:
    """A write-only file that feeds a sha256 with what passes through it (``torch.save`` writes sequentially)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        n = self.f.write(data)
        self.size += len(memoryview(data).cast("B"))
        return n

    def flush(self) -> None:
        self.f.flush()


def atomic_save_digest(obj: Any, path) -> Tuple[Path, str, int]:
    """``atomic_save``, also returning the sha256 (hex) and size in bytes of what was written (hashed on the
    way to the disk: the file is not read again)."""
    box = {}

    def write(f):
        box["w"] = w = _HashingWriter(f)
        torch.save(obj, w)

    path = atomic_write(path, write)
    return path, box["w"].sha.hexdigest(), box["w"].size


def file_digest(path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_save_safetensors(state: dict, path) -> str:
    """Write the weights; returns their sha256 (hex), which the export's JSON records."""
    data = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in state.items()})
    atomic_write_bytes(data, path)
    return hashlib.sha256(data).hexdigest()


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, devices, dtypes, tensors, numpy values, enums, tuples -> JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v) for v in items]
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    return repr(obj)


def _read_json(path: Path, fix: str = "restore it from a copy") -> dict:
    """A JSON object from ``path``; a file that is not one is a ``DamagedFileError`` saying ``fix``."""
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFileError(f"{path} is damaged (not valid JSON: {e}); {fix}") from None
    if not isinstance(obj, dict):
        raise DamagedFileError(f"{path} is damaged (a JSON {type(obj).__name__}, expected an object); {fix}")
    return obj


# ---------------------------------------------------------------------------------------------
# What a folder is
# ---------------------------------------------------------------------------------------------
class RunKind(str, enum.Enum):
    MISSING = "missing"
    FILE = "a file"
    EMPTY = "an empty folder"
    TOKENIZER_EXPORT = "an exported tokenizer"
    GENERATOR_EXPORT = "an exported generator"
    TOKENIZER_RUN = "a finished tokenizer run"
    GENERATOR_RUN = "a finished generator run"
    UNFINISHED_TOKENIZER_RUN = "an unfinished tokenizer run"
    UNFINISHED_GENERATOR_RUN = "an unfinished generator run"
    UNFINISHED_RUN = "an unfinished run"
    OTHER = "not a run folder"


class RunFolderError(FileNotFoundError):
    """A path is not the kind of run folder (or export) that was asked for; the message says what it is."""


class DamagedFileError(RunFolderError):
    """A run artefact exists but cannot be used (truncated, garbage, missing entries); the message names the
    file and what to do."""


class RunFolderBusy(RunFolderError):
    """Another process holds the run folder's lock; the message names its PID and host."""


def run_kind(path) -> RunKind:
    """What ``path`` holds: an export, a finished or unfinished run, an empty folder, nothing, ..."""
    p = Path(path)
    if not p.exists():
        return RunKind.MISSING
    if not p.is_dir():
        return RunKind.FILE
    if (p / TOKENIZER_META).is_file():
        return RunKind.TOKENIZER_EXPORT
    if (p / GENERATOR_META).is_file():
        return RunKind.GENERATOR_EXPORT
    lay = RunLayout(p)
    if (lay.tokenizer / TOKENIZER_META).is_file():
        return RunKind.TOKENIZER_RUN
    if (lay.generator / GENERATOR_META).is_file():
        return RunKind.GENERATOR_RUN
    if lay.config.is_file():
        try:
            cfg = _read_json(lay.config)
        except (ValueError, OSError):
            return RunKind.UNFINISHED_RUN
        # a generator's train config names the tokenizer run it trains on; a tokenizer's does not
        return RunKind.UNFINISHED_GENERATOR_RUN if "tokenizer" in cfg else RunKind.UNFINISHED_TOKENIZER_RUN
    if lay.checkpoints.is_dir() or lay.metrics.is_file():
        return RunKind.UNFINISHED_RUN
    return RunKind.EMPTY if not any(c.name != RUN_LOCK for c in p.iterdir()) else RunKind.OTHER


def _last_step(p: Path) -> Optional[int]:
    ptr = RunLayout(p).checkpoint_pointer
    try:
        return int(_read_json(ptr)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe(path) -> str:
    """What ``path`` is, in words for an error message (without the path itself): "an empty folder",
    "an unfinished tokenizer run (checkpoints up to step 200; ...)", ..."""
    p = Path(path)
    kind = run_kind(p)
    if kind == RunKind.MISSING:
        return "no such file or folder"
    text = kind.value
    if kind in (RunKind.UNFINISHED_TOKENIZER_RUN, RunKind.UNFINISHED_GENERATOR_RUN, RunKind.UNFINISHED_RUN):
        step = _last_step(p)
        text += (f" (checkpoints up to step {step}" if step is not None else " (no checkpoint yet") + \
            "; the trainer writes the export when the run ends: resume it to finish)"
    elif kind == RunKind.OTHER:
        text += f" (no {CONFIG}, checkpoints/, {TOKENIZER_META} or {GENERATOR_META})"
    return text


def _export_dir(path, what: str) -> Path:
    """The exported ``what`` ("tokenizer" or "generator") folder of ``path`` (a finished run of it or the
    export itself); a precise ``RunFolderError`` otherwise."""
    p = Path(path)
    kind = run_kind(p)
    export, run = ((RunKind.TOKENIZER_EXPORT, RunKind.TOKENIZER_RUN) if what == "tokenizer"
                   else (RunKind.GENERATOR_EXPORT, RunKind.GENERATOR_RUN))
    if kind == export:
        return p
    if kind == run:
        return getattr(RunLayout(p), what)
    meta = TOKENIZER_META if what == "tokenizer" else GENERATOR_META
    raise RunFolderError(f"{p}: {describe(p)}; expected a finished {what} run (holding {what}/{meta}) "
                         f"or an exported {what} folder ({meta} + {WEIGHTS})")


def tokenizer_dir(path) -> Path:
    """The exported tokenizer folder of ``path`` (a tokenizer run or an export)."""
    return _export_dir(path, "tokenizer")


def generator_dir(path) -> Path:
    """The exported generator folder of ``path`` (a generator run or an export)."""
    return _export_dir(path, "generator")


def _export_fix(d: Path, what: str) -> str:
    """What to do about a damaged file of the exported ``what`` ("tokenizer" or "generator") in ``d``."""
    run = d.parent
    if d.name == what and RunLayout(run).checkpoints.is_dir():
        return (f"export it again by running the same `ldetok train-{what} ... --out {run}` command (it resumes "
                f"from the last checkpoint and writes {what}/ anew), or restore {d} from a copy")
    return f"restore {d} from a copy, or export it again from the run that made it"


def tokenizer_meta(path) -> dict:
    """The ``tokenizer.json`` of a tokenizer run or export."""
    d = tokenizer_dir(path)
    return _read_json(d / TOKENIZER_META, _export_fix(d, "tokenizer"))


def generator_meta(path) -> dict:
    """The ``generator.json`` of a generator run or export."""
    d = generator_dir(path)
    return _read_json(d / GENERATOR_META, _export_fix(d, "generator"))


# ---------------------------------------------------------------------------------------------
# One process per run folder
# ---------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunFolderLock:
    """The run folder's ``.lock``: held by the one process that trains in the folder, from its start to its
    exit. The file holds the holder's PID and host; liveness is the kernel's ``flock`` on it, so a lock left
    by a killed process is free at once (and taken over, ``took_over`` naming the dead holder). Where the
    filesystem has no ``flock``, a lock whose holder is a dead process on this host is taken over, and one
    from another host is refused. Released by ``release()`` (the file is removed), and by the kernel when
    the process dies."""

    def __init__(self, root):
        self.root = Path(root)
        self.path = RunLayout(self.root).lock
        self.took_over: Optional[Tuple[int, str]] = None  # (pid, host) of a dead holder whose lock was taken
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _holder(self, fd: int) -> Tuple[Optional[int], str]:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
            return int(info["pid"]), str(info["host"])
        except (OSError, ValueError, KeyError, TypeError):
            return None, "unknown"

    def _busy(self, pid: Optional[int], host: str) -> RunFolderBusy:
        who = f"PID {pid} (host {host})" if pid is not None else "another process (PID not yet recorded)"
        return RunFolderBusy(f"run folder {self.root} is in use by {who}; wait for it to finish or stop it, or "
                             f"choose another --out (if no such process runs, remove {self.path})")

    def acquire(self) -> "RunFolderLock":
        """Take the lock or raise ``RunFolderBusy`` at once (never waits)."""
        if self.held:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        me = (os.getpid(), socket.gethostname())
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._flock(fd, me)
            except BaseException:
                os.close(fd)
                raise
            # the previous holder removes the file when it releases: lock only the file at the path
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - a folder whose lock file changes 100 times in a row
            raise self._busy(None, "unknown")
        pid, host = self._holder(fd)
        if pid is not None and (pid, host) != me:
            self.took_over = (pid, host)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": me[0], "host": me[1]}).encode("utf-8"), 0)
        self._fd = fd
        return self

    def _flock(self, fd: int, me: Tuple[int, str]) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy(*self._holder(fd)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            pid, host = self._holder(fd)  # no flock here: judge the recorded holder by PID and host
            if pid is not None and (pid, host) != me and (host != me[1] or _pid_alive(pid)):
                raise self._busy(pid, host) from None

    def release(self) -> None:
        """Remove the lock file and unlock (idempotent)."""
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


# ---------------------------------------------------------------------------------------------
# The train config
# ---------------------------------------------------------------------------------------------
def save_train_config(run_dir, config) -> Path:
    """Write the run's train config (a dataclass or a dict) to ``config.json`` when the run starts."""
    return atomic_write_json(config, RunLayout(run_dir).config, sort_keys=True)


def _saved_train_config(p: Path) -> Tuple[dict, Optional[type]]:
    """(saved dict, its config class when the folder says which)."""
    kind = run_kind(p)
    if kind in (RunKind.TOKENIZER_EXPORT, RunKind.TOKENIZER_RUN):
        cfg = tokenizer_meta(p).get("train_config")
        if cfg:
            return cfg, TokenizerTrainConfig
    elif kind in (RunKind.GENERATOR_EXPORT, RunKind.GENERATOR_RUN):
        cfg = generator_meta(p).get("train_config")
        if cfg:
            return cfg, GeneratorTrainConfig
    lay = RunLayout(p)
    if lay.config.is_file():
        cls = GeneratorTrainConfig if kind in (RunKind.GENERATOR_RUN, RunKind.UNFINISHED_GENERATOR_RUN) else None
        return _read_json(lay.config), cls
    raise RunFolderError(f"{p}: {describe(p)}; no train config there (expected tokenizer/{TOKENIZER_META}, "
                         f"generator/{GENERATOR_META} or {CONFIG})")


def run_train_config(path):
    """The train config of a run, typed (``TokenizerTrainConfig`` or ``GeneratorTrainConfig``): from its
    export (``tokenizer/tokenizer.json`` or ``generator/generator.json``, or those files in an export
    folder), else the run's ``config.json``. ``path`` may be a tokenizer run, an exported tokenizer
    folder, or a generator run. Configs saved flat (before sub-configs) are read too."""
    p = Path(path)
    saved, cls = _saved_train_config(p)
    if cls is None:  # a bare config.json: a generator config names its tokenizer
        cls = GeneratorTrainConfig if "tokenizer" in saved and "latents" in saved else TokenizerTrainConfig
    return config_from_dict(cls, saved)


def run_corruption(path) -> CorruptionConfig:
    """The corruption settings a tokenizer run (or its export) was trained with.

    Read from the export's record (for a decoder fine-tuning: what its frozen encoder was trained with),
    else the saved train config; exports written before corruption had its own config kept the
    settings in the model config, and those are read too.
    """
    p = Path(path)
    if run_kind(p) in (RunKind.TOKENIZER_EXPORT, RunKind.TOKENIZER_RUN):
        meta = tokenizer_meta(p)
        if meta.get("corruption"):
            return CorruptionConfig.from_dict(meta["corruption"])
        if not meta.get("train_config"):
            legacy = {k: v for k, v in meta.get("config", {}).items() if k in LEGACY_CORRUPTION_KEYS}
            return CorruptionConfig.from_dict(legacy)
    cfg = run_train_config(p)
    if not isinstance(cfg, TokenizerTrainConfig):
        raise RunFolderError(f"{p}: {describe(p)}, not a tokenizer run: it has no corruption settings")
    return cfg.corruption


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------
def save_tokenizer(tok: Tokenizer, directory, extra: Optional[dict] = None) -> Path:
    """Write ``model.safetensors`` and then ``tokenizer.json`` (kind, config, stats flag, the weights' sha256,
    ``extra``) into ``directory`` (a run's ``tokenizer/`` or a folder of its own)."""
    d = Path(directory)
    digest = _atomic_save_safetensors(tok.state_dict(), d / WEIGHTS)
    meta = {"kind": tok.kind, "config": tok.config_dict(), "has_stats": tok.has_stats, "weights_sha256": digest,
            **(extra or {})}
    atomic_write_json(meta, d / TOKENIZER_META, sort_keys=True)
    return d


def _load_export(d: Path, meta_name: str, what: str, build: Callable, map_location="cpu"):
    """(module built from ``d/meta_name`` with the weights of ``d/model.safetensors`` loaded, meta). A
    damaged file (bad JSON, missing entries, truncated or altered weights, keys or shapes that do not fit
    the architecture) is a ``DamagedFileError`` naming it and what to do."""
    fix = _export_fix(d, what)
    meta = _read_json(d / meta_name, fix)
    try:
        module = build(meta["kind"], meta["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DamagedFileError(f"{d / meta_name} does not describe a {what} ({type(e).__name__}: {e}); {fix}") from None
    path = d / WEIGHTS
    if not path.is_file():
        raise RunFolderError(f"{d}: {path} is missing (the export is incomplete); {fix}")
    want_digest = meta.get("weights_sha256")
    if want_digest and file_digest(path) != want_digest:
        raise DamagedFileError(f"{path} is damaged (its sha256 differs from the one {meta_name} recorded when it "
                               f"was written); {fix}")
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise DamagedFileError(f"{path} is damaged (unreadable: {e}); {fix}") from None
    _check_state_keys(module, state, path, meta_name, fix)
    module.load_state_dict(state, strict=True)
    return module, meta


def _check_state_keys(module: torch.nn.Module, state: dict, path: Path, meta_name: str, fix: str) -> None:
    """Refuse weights whose keys or shapes differ from the module's, naming the first few."""
    want = module.state_dict()
    problems = []
    for label, keys in (("missing", [k for k in want if k not in state]),
                        ("unexpected", [k for k in state if k not in want]),
                        ("wrong shape", [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)])):
        if keys:
            problems.append(f"{label}: {', '.join(keys[:5])}" + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""))
    if problems:
        raise DamagedFileError(f"{path} is damaged or does not belong to the architecture in {meta_name} "
                               f"({'; '.join(problems)}); {fix}")


def load_tokenizer(path, map_location="cpu") -> Tokenizer:
    """Load what ``save_tokenizer`` wrote (strict keys), in eval mode. ``path`` is an exported tokenizer
    folder or a finished tokenizer run (the trainer exports the EMA weights to its ``tokenizer/``)."""
    tok, _ = _load_export(tokenizer_dir(path), TOKENIZER_META, "tokenizer", build_tokenizer_from_config, map_location)
    return tok.eval()


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------
def save_generator(gen, directory, meta: dict) -> Path:
    """Write ``model.safetensors`` and then ``generator.json`` (kind, config, the weights' sha256, ``meta``:
    name, tokenizer run, step, train config, ...) into ``directory``."""
    d = Path(directory)
    digest = _atomic_save_safetensors(gen.state_dict(), d / WEIGHTS)
    atomic_write_json({"kind": gen.kind, "config": gen.config_dict(), "weights_sha256": digest, **meta},
                      d / GENERATOR_META, sort_keys=True)
    return d


def load_generator_run(path, device="cpu"):
    """(generator in eval mode, its tokenizer in eval mode, the generator's meta) from a finished
    generator run or an exported generator folder."""
    d = generator_dir(path)
    gen, meta = _load_export(d, GENERATOR_META, "generator", build_generator_from_config)
    if not meta.get("tokenizer"):
        raise DamagedFileError(f"{d / GENERATOR_META}: names no tokenizer run; {_export_fix(d, 'generator')}")
    tok = load_tokenizer(meta["tokenizer"])
    return gen.to(device).eval(), tok.to(device).eval(), meta
