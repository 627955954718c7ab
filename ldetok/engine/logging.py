"""Run folder logging: config.json, metrics.jsonl, log.txt, TensorBoard, PNG images, optional wandb,
and a tqdm progress bar that falls back to plain lines in headless logs.

Only the main rank writes anything; on other ranks every method is a no-op.
`metrics.jsonl` is the source of truth (flushed per line); TensorBoard and wandb are views.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runs import RunLayout, atomic_write_text, save_train_config, to_jsonable
from ..viz import image_grid, save_image

__all__ = ["Progress", "RunLogger", "image_grid", "read_metrics", "to_jsonable"]

_WANDB_WARNED = False


# --------------------------------------------------------------------------- serialisation


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"Metric tensors must hold one element, got shape {tuple(v.shape)}.")
        return v.item()
    if isinstance(v, np.generic):
        return v.item()
    return to_jsonable(v)


# --------------------------------------------------------------------------- images


def _safe_name(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tag).strip("_") or "image"


# --------------------------------------------------------------------------- run logger


class RunLogger:
    """Everything a run writes about itself, in `run_dir`."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        is_main: bool = True,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        config: Any = None,
    ):
        self.run_dir = Path(run_dir)
        self.layout = RunLayout(self.run_dir)
        self.is_main = bool(is_main)
        self._tb = None
        self._wandb = None
        self._metrics_f = None
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            self.save_config(config)
        # Append mode: a resumed run keeps adding to the same history.
        self._metrics_f = open(self.layout.metrics, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only when asked

            self._tb = SummaryWriter(log_dir=str(self.layout.tensorboard), flush_secs=30)
        if wandb_project:
            self._wandb = _init_wandb(wandb_project, self.run_dir, config)

    def save_config(self, config: Any) -> Path | None:
        if not self.is_main:
            return None
        return save_train_config(self.run_dir, config)

    def log(self, step: int, values: Mapping[str, Any] | None = None, **kw: Any) -> None:
        """Append {"step", "time", **values} to metrics.jsonl; numeric values also go to TB/wandb."""
        if not self.is_main:
            return
        vals = {**(values or {}), **kw}
        clash = {"step", "time"} & vals.keys()
        if clash:
            raise ValueError(f"Metric names {sorted(clash)} are reserved in metrics.jsonl.")
        vals = {k: _scalar(v) for k, v in vals.items()}
        record = {"step": int(step), "time": time.time(), **vals}
        self._metrics_f.write(json.dumps(record) + "\n")
        self._metrics_f.flush()  # a killed run loses at most the line being written
        numeric = {k: v for k, v in vals.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, int(step))
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))

    def log_images(
        self,
        step: int,
        tag: str,
        images: torch.Tensor | np.ndarray,
        nrow: int = 8,
        value_range: tuple[float, float] = (-1.0, 1.0),
    ) -> Path | None:
        """Save a grid as run_dir/images/{tag}_{step:09d}.png (and to TB/wandb); returns the PNG path."""
        if not self.is_main:
            return None
        grid = image_grid(images, nrow=nrow, value_range=value_range)
        out = save_image(grid, self.layout.image(f"{_safe_name(tag)}_{int(step):09d}"))
        if self._tb is not None:
            self._tb.add_image(tag, grid, int(step), dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(grid)}, step=int(step))
        return out

    def log_line(self, msg: str) -> None:
        """Print on the main rank and append a timestamped line to run_dir/log.txt."""
        if not self.is_main:
            return
        print(msg, flush=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.layout.log, "a", encoding="utf-8") as f:
            f.write(f"[{stamp}] {msg}\n")

    def close(self) -> None:
        if self._metrics_f is not None:
            self._metrics_f.close()
            self._metrics_f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> RunLogger:  # noqa: PYI034 (typing.Self needs 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _init_wandb(project: str, run_dir: Path, config: Any):
    global _WANDB_WARNED
    try:
        import wandb
    except ImportError:
        if not _WANDB_WARNED:
            warnings.warn(
                f"wandb_project={project!r} was given but wandb is not installed (`pip install wandb`); "
                "continuing with metrics.jsonl and TensorBoard only.",
                stacklevel=3,
            )
            _WANDB_WARNED = True
        return None
    # Persist the run id so a resumed run continues the same wandb run.
    id_file = RunLayout(run_dir).wandb_id
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    atomic_write_text(run_id + "\n", id_file)
    return wandb.init(
        project=project,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=to_jsonable(config) if config is not None else None,
    )


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of run_dir/metrics.jsonl; a line cut short by a kill is skipped with a warning."""
    path = RunLayout(run_dir).metrics
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{i}: unparsable metrics line skipped.", stacklevel=2)
    return out


# --------------------------------------------------------------------------- progress


class Progress:
    """Step progress: a tqdm bar on an interactive main rank, else a plain line every `print_every` steps.

    `update(n_steps, n_images, **postfix)` advances the count; img/s is measured over a sliding
    window of recent updates so it reflects current speed, not the start-up.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "train",
        is_main: bool = True,
        use_tqdm: bool | None = None,
        print_every: int = 100,
        log_fn: Callable[[str], None] | None = None,
        window: int = 50,
    ):
        self.total = int(total)
        self.step = self._initial = int(initial)
        self.desc = desc
        self.is_main = bool(is_main)
        self.print_every = max(1, int(print_every))
        self.log_fn = log_fn or (lambda s: print(s, flush=True))
        self._times: deque[tuple[float, int]] = deque(maxlen=max(2, window))
        self._images = 0
        self._t0 = time.time()
        self._times.append((self._t0, 0))
        if use_tqdm is None:
            use_tqdm = sys.stderr.isatty()
        self._bar = None
        if self.is_main and use_tqdm:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.step, desc=desc, dynamic_ncols=True)

    @property
    def images_per_sec(self) -> float:
        (t_a, n_a), (t_b, n_b) = self._times[0], self._times[-1]
        return (n_b - n_a) / (t_b - t_a) if t_b > t_a else 0.0

    def update(self, n_steps: int = 1, n_images: int = 0, **postfix: Any) -> None:
        if not self.is_main:
            return
        prev = self.step
        self.step += int(n_steps)
        self._images += int(n_images)
        self._times.append((time.time(), self._images))
        fields = {k: _fmt(v) for k, v in postfix.items()}
        if n_images:
            fields["img/s"] = f"{self.images_per_sec:.1f}"
        if self._bar is not None:
            self._bar.update(int(n_steps))
            self._bar.set_postfix(fields, refresh=False)
        elif self.step // self.print_every > prev // self.print_every or self.step >= self.total > prev:
            elapsed = time.time() - self._t0
            done = self.step - self._initial  # steps run by this process (a resume starts mid-way)
            parts = [f"[{self.desc}] step {self.step}/{self.total}"]
            parts += [f"{k}={v}" for k, v in fields.items()]
            parts.append(f"elapsed {_hms(elapsed)}")
            if 0 < done and self.step < self.total:
                parts.append(f"eta {_hms(elapsed / done * (self.total - self.step))}")
            self.log_fn(" ".join(parts))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:  # noqa: PYI034 (typing.Self needs 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
