"""Atomic checkpoints, weights_only loading, RNG state capture and a keep-N checkpoint manager.

Files are written by the run folder's atomic writer (``ldetok.runs``: temp file, fsync, os.replace).
Everything written here loads with `torch.load(weights_only=True)`: store plain dicts of tensors,
numbers, strings and lists (config dataclasses as dicts), never pickled objects.

Checkpoints are verified before they are trusted. After each checkpoint file, ``manifest.json`` (written
atomically) records its sha256, its size and whether its weights were finite. Resuming takes the newest
checkpoint that is listed, whose bytes match the digest, whose weights were finite and that loads; every
other one is skipped with a warning naming it (garbage written into the middle of a file loads without
complaint from ``torch.load``: only the digest sees it). A file missing from an existing manifest was
written by a process killed before it recorded the file (or copied in) and is not trusted. A folder from
before manifests has none: its checkpoints are loaded unverified, and say so. Keep-N pruning never deletes
the newest listed checkpoint with finite weights, so a run whose newer checkpoints went bad keeps a way back.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runs import (CHECKPOINT_MANIFEST, CHECKPOINT_POINTER, atomic_save, atomic_save_digest, atomic_write_json,  # noqa: F401
                    atomic_write_text, file_digest)

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
]


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, or not weights_only-safe)."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True; a missing or unreadable file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types (RuntimeError, UnpicklingError, EOFError, ...)
        raise CheckpointError(
            f"Could not load checkpoint {path} ({path.stat().st_size} bytes): {type(e).__name__}: {e}. "
            "The file is truncated/corrupt, or holds objects that weights_only=True refuses "
            "(store plain dicts of tensors and numbers)."
        ) from e


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (global), torch CPU and every CUDA device's RNG, in a weights_only-loadable form."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": list(internal), "gauss_next": gauss_next},
        # MT19937 keys are uint32; int64 holds them exactly and is a plain tensor dtype.
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state; missing parts are left alone. The state may come from a checkpoint
    loaded with ``map_location`` on a GPU: every tensor is brought back to the CPU first."""
    if "python" in state:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    if "numpy" in state:
        npst = state["numpy"]
        keys = np.asarray(torch.as_tensor(npst["keys"]).cpu().numpy(), dtype=np.uint32)
        np.random.set_state(
            (npst["kind"], keys, int(npst["pos"]), int(npst["has_gauss"]), float(npst["cached_gaussian"]))
        )
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda_states = state.get("cuda")
    if cuda_states:
        if not torch.cuda.is_available():
            warnings.warn(
                "Checkpoint holds CUDA RNG states but CUDA is not available; they are ignored.", stacklevel=2
            )
            return
        n = torch.cuda.device_count()
        if len(cuda_states) != n:
            warnings.warn(
                f"Checkpoint holds {len(cuda_states)} CUDA RNG state(s) but {n} device(s) are visible; "
                f"restoring the first {min(n, len(cuda_states))}.",
                stacklevel=2,
            )
        for i, s in enumerate(cuda_states[:n]):
            torch.cuda.set_rng_state(torch.as_tensor(s, dtype=torch.uint8).cpu(), device=i)


# --------------------------------------------------------------------------- manager

_CKPT_RE = re.compile(r"^ckpt_(\d{9,})\.pt$")


class CheckpointManager:
    """`ckpt_{step:09d}.pt` files in one folder: atomic saves with a digest manifest, keep-N + milestone
    pruning, verified resume.

    Only the writing rank should call `save`; `latest`/`auto_resume` are safe on every rank.
    """

    POINTER = CHECKPOINT_POINTER
    MANIFEST = CHECKPOINT_MANIFEST

    def __init__(self, ckpt_dir: str | os.PathLike, keep: int = 2, milestone_every: int = 0):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the checkpoint just written is always kept), got {keep}.")
        if milestone_every < 0:
            raise ValueError(f"milestone_every must be >= 0 (0 = no milestones), got {milestone_every}.")
        self.dir = Path(ckpt_dir)
        self.keep = int(keep)
        self.milestone_every = int(milestone_every)
        self.skipped: list[Path] = []  # files passed over by the last auto_resume
        self.skip_reasons: dict[Path, str] = {}  # why each was passed over
        self.notes: list[str] = []  # what else the last auto_resume has to say (unverified loads)

    def path_for(self, step: int) -> Path:
        return self.dir / f"ckpt_{int(step):09d}.pt"

    def _steps(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def list(self) -> list[Path]:
        """Checkpoint paths, oldest step first."""
        return [p for _, p in self._steps()]

    def latest(self) -> Path | None:
        """Newest checkpoint by the step in its name (not mtime, which copies and rsync rewrite)."""
        found = self._steps()
        return found[-1][1] if found else None

    # ---- the manifest ---------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, dict] | None:
        """{file name: {"step", "sha256", "bytes", "finite"}}, or None when there is no manifest (a folder
        from before manifests) or it is damaged (a warning names it; its checkpoints are then unverified)."""
        path = self.dir / self.MANIFEST
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
            files = data["files"]
            if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
                raise ValueError("'files' is not a mapping of entries")
            return files
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"{path} is damaged ({type(e).__name__}: {e}); the checkpoints are loaded unverified "
                          "and the next checkpoint writes a new manifest", stacklevel=3)
            return None

    def _write_manifest(self, files: dict[str, dict]) -> None:
        atomic_write_json({"files": dict(sorted(files.items()))}, self.dir / self.MANIFEST)

    def save(self, step: int, state: dict[str, Any], finite: bool = True) -> Path:
        """Write ``state`` as the step's checkpoint, then record its digest in the manifest, then the
        ``latest.json`` pointer, then prune. ``finite``: whether its weights are finite (see ``_prune``)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        self.remove_stale_temps()
        files = self.read_manifest()
        present = {p.name for p in self.list()}
        if files is None:  # the first manifest of this folder: what is there already stays, unverified
            files = {name: {"step": int(_CKPT_RE.match(name).group(1)), "sha256": None} for name in present}
        files = {k: v for k, v in files.items() if k in present}
        path, digest, size = atomic_save_digest(state, self.path_for(step))
        files[path.name] = {"step": int(step), "sha256": digest, "bytes": size, "finite": bool(finite)}
        self._write_manifest(files)
        # A small JSON pointer instead of the official latest.pth symlink: works on every filesystem
        # and survives copying the folder.
        atomic_write_text(json.dumps({"step": int(step), "file": path.name}) + "\n", self.dir / self.POINTER)
        self._prune(step, files)
        return path

    def _prune(self, current: int, files: dict[str, dict]) -> None:
        found = self._steps()
        # Files with a higher step than the one just written come from an abandoned future (a resume
        # from an older or corrupt-skipped checkpoint): leave them alone rather than let them push the
        # fresh file out of the keep-N window; the run overwrites them when it reaches those steps.
        older = [(s, p) for s, p in found if s <= current]
        keep = {s for s, _ in older[-self.keep :]}
        if self.milestone_every > 0:
            keep |= {s for s, _ in older if s > 0 and s % self.milestone_every == 0}
        # never the newest checkpoint known good (digest recorded, finite weights): newer ones may be bad
        good = [s for s, p in older if files.get(p.name, {}).get("sha256") and files[p.name].get("finite", True)]
        if good:
            keep.add(good[-1])
        removed = False
        for s, p in older:
            if s not in keep:
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
                removed |= files.pop(p.name, None) is not None
        if removed:
            self._write_manifest(files)

    def remove_stale_temps(self) -> None:
        """Remove what a run killed mid-save left: checkpoint temps (multi-GB each), the manifest's and the
        latest.json pointer's. Only the writing rank calls this (before each save, and on resume)."""
        if self.dir.is_dir():
            for p in [*self.dir.glob(".ckpt_*.pt.*.tmp"), *self.dir.glob(".manifest.json.*.tmp"),
                      *self.dir.glob(".latest.json.*.tmp")]:
                try:
                    p.unlink()
                except OSError:
                    pass

    def _distrust(self, path: Path, entry: dict | None, files: dict | None) -> str | None:
        """Why ``path`` may not be used (None: it may), judged by its manifest entry."""
        if files is None:
            return None
        if entry is None:
            return (f"not listed in {self.MANIFEST} (written by a process killed before it recorded the file, "
                    "or copied in): it cannot be verified")
        if entry.get("finite") is False:
            return "its weights were not finite when it was written"
        want = entry.get("sha256")
        if want:
            size = path.stat().st_size
            if entry.get("bytes") is not None and size != entry["bytes"]:
                return f"{size} bytes where {entry['bytes']} were written (truncated or altered)"
            if file_digest(path) != want:
                return "its sha256 differs from the one recorded when it was written (the file was altered)"
        return None

    def auto_resume(self, map_location: Any = "cpu") -> tuple[Any | None, Path | None]:
        """Load the newest verified, readable checkpoint: (state, path), or (None, None) if there is none.

        A file that fails (not in the manifest, digest or size mismatch, non-finite weights, unreadable) is
        skipped with a warning naming it and why (recorded in ``skipped`` / ``skip_reasons``), and the next
        older one is tried. Without a manifest (an older run folder) files load unverified (``notes``).
        """
        self.skipped, self.skip_reasons, self.notes = [], {}, []
        files = self.read_manifest()
        for _, path in reversed(self._steps()):
            entry = None if files is None else files.get(path.name)
            try:
                reason = self._distrust(path, entry, files)
                if reason is None:
                    state = load_checkpoint(path, map_location=map_location)
                    if not (entry or {}).get("sha256"):
                        self.notes.append(f"{path} was loaded unverified (no digest recorded: written before "
                                          "checkpoint manifests)")
                    return state, path
            except (CheckpointError, OSError) as e:
                reason = str(e)
            self.skipped.append(path)
            self.skip_reasons[path] = reason
            warnings.warn(f"Skipping checkpoint {path}: {reason}", stacklevel=2)
        return None, None
