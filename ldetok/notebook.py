"""Small helpers the notebooks call, so that they hold no logic of their own.

Live kernel or headless: ``interactive_default()`` says whether a notebook runs in a live front end
(JupyterLab, Notebook, VS Code: widget panels are drawn) or headlessly (papermill, ``make notebooks``,
``ldetok sweep``: panels skipped). ``figures_dir`` sends a live run's figures to its run folder; only a
run given ``FIGURES_DIR`` (``make notebooks`` passes ``figures``) writes the repository's ``figures/``.

Paths: a relative path given to these helpers is taken relative to the project root (the folder
holding ``ldetok/``), so a notebook gives the same answer whether its kernel starts in ``notebooks/``
(JupyterLab) or in the repository root (papermill, ``make notebooks``).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .config import (VARIANTS, GeneratorTrainConfig, TokenizerTrainConfig, resolve_generator_config,
                     resolve_tokenizer_config)
from .data import build_dataset
from .engine.distributed import resolve_device
from .engine.generator_trainer import train_generator
from .engine.logging import read_metrics
from .engine.stats import fetch_batch
from .engine.tokenizer_trainer import train_tokenizer
from .eval.recon import psnr, psnr_under_noise
from .main_job import LINKS as MAIN_JOB_LINKS
from .runs import RunKind, RunLayout, atomic_write_json, describe, generator_meta, run_kind, tokenizer_meta
from .runs import run_corruption  # noqa: F401  (re-exported for the notebooks)
from .viz import corruption_sweeps

__all__ = ["project_root", "resolve", "run_dir", "save_fig", "log_metrics", "train_in_process_or_torchrun",
           "ensure_tokenizer", "ensure_generator", "has_tokenizer", "images", "psnr_sweep", "latent_summary",
           "loss_curves", "figure_path", "copy_figure", "preset_for", "tail_mean", "device", "corrupt_and_decode",
           "interactive_default", "figures_dir", "show_figure", "panel", "MAIN_DIR", "DEMO_DIR", "tokenizer_candidates",
           "find_tokenizer", "tokenizer_run"]


# ---------------------------------------------------------------------------------------------
# paths, figures, metrics
# ---------------------------------------------------------------------------------------------
def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def resolve(path) -> Optional[Path]:
    """``path`` as an absolute Path (relative ones against the project root); None stays None."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def run_dir(path, default: str) -> Path:
    """The notebook's run folder (``default`` under ``runs/notebooks`` when ``path`` is None), created."""
    p = resolve(path if path is not None else Path("runs/notebooks") / default)
    p.mkdir(parents=True, exist_ok=True)
    return p


def save_fig(fig, name: str, figures_dir="figures", dpi: int = 110) -> Path:
    """Write a matplotlib figure to ``figures_dir/name.png`` (never into notebooks/) and return the path."""
    d = resolve(figures_dir)
    if d.resolve() == (project_root() / "notebooks").resolve():
        raise ValueError("figures go to figures/ or a run folder, never into notebooks/")
    d.mkdir(parents=True, exist_ok=True)
    path = d / (name if name.endswith(".png") else f"{name}.png")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _plain(v):
    if torch.is_tensor(v):
        v = v.detach().cpu().tolist()
    if hasattr(v, "tolist") and not isinstance(v, (list, tuple, dict, str)):
        v = v.tolist()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    if isinstance(v, Path):
        return str(v)
    return v


def log_metrics(values: Dict, run_dir) -> Path:
    """Merge ``values`` into ``run_dir/metrics.json`` (tensors and numpy scalars become plain JSON)."""
    path = resolve(run_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(_plain(dict(values)))
    return atomic_write_json(old, path, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# live kernel or headless; figures and widget panels
# ---------------------------------------------------------------------------------------------
def _parent_command(pid: str) -> str:
    try:
        return Path(f"/proc/{int(pid)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return ""


def interactive_default() -> bool:
    """Whether this kernel serves a live front end (widget panels are drawn) rather than a headless run.

    ``LDETOK_INTERACTIVE=0/1`` decides when set. Otherwise headless when the kernel's parent process is
    papermill (``JPY_PARENT_PID``, set by the kernel launcher), and live only when a front end said so:
    a Jupyter server names the notebook in ``JPY_SESSION_NAME`` (JupyterLab, Notebook 7), VS Code
    defines ``__vsc_ipynb_file__``. papermill, nbclient and nbconvert set neither: headless.
    """
    forced = os.environ.get("LDETOK_INTERACTIVE", "").strip().lower()
    if forced:
        return forced not in ("0", "false", "no", "off")
    if "papermill" in _parent_command(os.environ.get("JPY_PARENT_PID", "")):
        return False
    if os.environ.get("JPY_SESSION_NAME"):
        return True
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "__vsc_ipynb_file__" in getattr(shell, "user_ns", {})


def figures_dir(value, run) -> Path:
    """Where a notebook writes its figures: ``value`` when given (``make notebooks`` passes ``figures``),
    else ``run/figures``: running a notebook by hand never overwrites the committed figures."""
    return resolve(value) if value is not None else Path(run) / "figures"


def show_figure(fig, dpi: int = 100) -> None:
    """Display a matplotlib figure as a PNG in the current output (a cell, or a widget's ``Output``) and
    close it when pyplot holds it: works under any backend, and a redrawn panel leaks no figure."""
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    display(Image(data=buf.getvalue(), format="png"))
    if fig.canvas.manager is not None:  # a pyplot figure (the object API's Figure has no manager)
        import matplotlib.pyplot as plt

        plt.close(fig)


def panel(draw: Callable, controls: Dict, columns: int = 3, hold: Optional[dict] = None):
    """A widget panel: ``controls`` (name -> ipywidget) above an ``Output`` that shows ``draw(**values)``
    (a matplotlib figure) again on every change of a control, replacing the previous image (an error
    is shown in its place). While ``hold["on"]`` is true changes draw nothing (a caller refilling
    several controls at once sets it, then calls ``box.redraw()``). Returns the box."""
    import ipywidgets as W

    out = W.Output()
    hold = hold if hold is not None else {}

    def redraw(_=None):
        if hold.get("on"):
            return
        with out:  # an exception here is displayed in the output, not raised into the widget's callback
            out.clear_output(wait=True)
            show_figure(draw(**{k: c.value for k, c in controls.items()}))

    for c in controls.values():
        c.observe(redraw, names="value")
    items = list(controls.values())
    box = W.VBox([W.HBox(items[i:i + columns]) for i in range(0, len(items), columns)] + [out])
    box.redraw = redraw
    redraw()
    return box


# ---------------------------------------------------------------------------------------------
# the tokenizer runs that the project's commands write
# ---------------------------------------------------------------------------------------------
MAIN_DIR = "runs/main"  # `make run` = `ldetok main --out runs/main`
DEMO_DIR = "runs/demo"  # `ldetok demo --prepare`
MAKERS = {MAIN_DIR: "make run", DEMO_DIR: "ldetok demo --prepare"}


def _steps_of(path: Path) -> int:
    tail = path.name.rsplit("_t", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def tokenizer_candidates(preset: str) -> List[Path]:
    """Where the run of ``preset`` is looked for, in order: ``runs/main/<preset>`` (the main job links its
    tokenizers there), ``runs/demo/<preset>`` (the demo's photo runs), then the main job's own
    ``runs/main/tokenizers/<variant>_s<seed>_t<steps>`` folders, most steps first."""
    out = [resolve(MAIN_DIR) / preset, resolve(DEMO_DIR) / preset]
    variant = {link: v for v, link in MAIN_JOB_LINKS.items()}.get(preset)
    tokenizers = RunLayout(resolve(MAIN_DIR)).root / "tokenizers"
    if variant is not None and tokenizers.is_dir():
        out += sorted(tokenizers.glob(f"{variant}_s*_t*"), key=lambda p: (-_steps_of(p), p.name))
    return out


def find_tokenizer(preset: str, verbose: bool = True) -> Optional[Path]:
    """The first finished tokenizer run of ``tokenizer_candidates(preset)``; None (and, with ``verbose``,
    what each place holds and which command writes it) when there is none."""
    cands = tokenizer_candidates(preset)
    for p in cands:
        if run_kind(p) == RunKind.TOKENIZER_RUN:
            return p
    if verbose:
        for p in cands[:2]:
            maker = next(cmd for d, cmd in MAKERS.items() if p.parent == resolve(d))
            print(f"{preset}: {p.relative_to(project_root()) if p.is_relative_to(project_root()) else p} is "
                  f"{describe(p)} (written by `{maker}`)")
    return None


def tokenizer_run(spec, preset: str) -> Optional[Path]:
    """What a notebook's tokenizer parameter names: ``"auto"``: the run of ``preset`` that ``make run`` or
    ``ldetok demo --prepare`` wrote (``find_tokenizer``); None: none (a quick one is trained); else a path."""
    if spec is None:
        return None
    if str(spec) == "auto":
        return find_tokenizer(preset)
    return resolve(spec)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def has_tokenizer(path) -> bool:
    """Whether ``path`` holds a finished tokenizer run."""
    p = resolve(path)
    return p is not None and run_kind(p) == RunKind.TOKENIZER_RUN


def _summary(kind: str, out: Path) -> dict:
    if kind == "tokenizer":
        return {"step": tokenizer_meta(out).get("step")}
    meta = generator_meta(out)
    return {"step": meta.get("step"), "final_loss_smooth": meta.get("final_loss_smooth")}


def train_in_process_or_torchrun(kind: str, preset: Optional[str], overrides: Dict, out, nproc: int = 1) -> dict:
    """Train a ``kind`` ("tokenizer" or "generator") run into ``out``: in this process with ``nproc=1``,
    else ``torchrun --nproc_per_node NPROC -m ldetok.cli train-<kind> ...`` as a subprocess whose output
    is streamed here. Returns the run's summary (``step``, and for a generator ``final_loss_smooth``)."""
    if kind not in ("tokenizer", "generator"):
        raise ValueError(f"kind must be 'tokenizer' or 'generator', got {kind!r}")
    out = resolve(out)
    overrides = dict(overrides or {})
    if kind == "generator" and overrides.get("tokenizer") is not None:
        overrides["tokenizer"] = str(resolve(overrides["tokenizer"]))
    resolve_cfg = resolve_tokenizer_config if kind == "tokenizer" else resolve_generator_config
    cfg = resolve_cfg(preset, overrides)  # refuse bad values before any work or any subprocess
    if int(nproc) <= 1:
        if kind == "tokenizer":
            return train_tokenizer(cfg, out)
        return train_generator(cfg, out)
    cls = TokenizerTrainConfig if kind == "tokenizer" else GeneratorTrainConfig
    names = set(cls.__dataclass_fields__)
    args = [f"{k}={'none' if v is None else v}" for k, v in overrides.items() if k in names]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nproc_per_node", str(int(nproc)), "-m", "ldetok.cli", f"train-{kind}", "--out", str(out)]
    cmd += (["--preset", preset] if preset else []) + args
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=project_root(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="", flush=True)
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return _summary(kind, out)


def ensure_tokenizer(path, preset: str, steps: int, fallback, nproc: int = 1, **overrides) -> Path:
    """``path`` when it holds a finished tokenizer run, else a quick run of ``preset`` (``steps`` steps)
    trained into ``fallback`` (reused when it is already there)."""
    if path is not None and has_tokenizer(path):
        return resolve(path)
    out = resolve(fallback)
    if not has_tokenizer(out):
        why = "no tokenizer run given" if path is None else f"{path} is {describe(resolve(path))}"
        print(f"{why}: training {preset} for {steps} steps into {out}")
        ov = dict(max_steps=int(steps), tensorboard=False, image_every=0)
        ov.update(overrides)
        train_in_process_or_torchrun("tokenizer", preset, ov, out, nproc)
    return out


def ensure_generator(path, preset: str, overrides: Dict, nproc: int = 1) -> Path:
    """Train a generator into ``path`` unless it already holds a finished one."""
    out = resolve(path)
    if run_kind(out) != RunKind.GENERATOR_RUN:
        train_in_process_or_torchrun("generator", preset, overrides, out, nproc)
    return out


# ---------------------------------------------------------------------------------------------
# small measurements the notebooks plot
# ---------------------------------------------------------------------------------------------
def images(dataset: str, n: int, split: str = "test", image_size: int = 32, channels: int = 3, start: int = 0,
           root=None):
    """The first ``n`` images (and labels) of a dataset split, in [-1, 1]."""
    ds = build_dataset(dataset, split="val" if (dataset == "photos" and split == "test") else split,
                       image_size=image_size, channels=channels, root=root)
    n = min(int(n), len(ds) - start)
    return fetch_batch(ds, list(range(start, start + n)))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(psnr(a.clamp(-1, 1), b)[0])


@torch.no_grad()
def psnr_sweep(tokenizer, x: torch.Tensor, levels: Sequence[float] = (), ratios: Sequence[float] = (),
               gamma: float = 3.0, noise_type: str = "interpolative", seed: int = 18) -> dict:
    """PSNR (dB) of ``x`` against its decoded latents corrupted at each noise level
    (``ldetok.eval.psnr_under_noise``: image ``i`` of ``x`` gets its ε seeded by (``seed``, i), the numbers
    of ``ldetok eval-tokenizer`` and ``ldetok reproduce``) and at each mask ratio (``viz.corruption_sweeps``,
    masking inside the encoder)."""
    out = {"levels": [float(t) for t in levels], "ratios": [float(r) for r in ratios]}
    noised = psnr_under_noise(tokenizer, x, levels, gamma, noise_type, seed) if len(levels) else {}
    out["psnr_noise"] = [float(noised[float(t)]["psnr"].mean()) for t in levels]
    masks = corruption_sweeps(tokenizer, x, [0.0], ratios, gamma, noise_type, seed)["mask"] if len(ratios) else []
    out["psnr_mask"] = [_psnr(masks[i], x) for i in range(len(ratios))]
    return out


@torch.no_grad()
def latent_summary(tokenizer, x: torch.Tensor) -> dict:
    """Per-channel mean/std of the (clean, posterior-mean) latents of ``x``, their range and overall std."""
    tokenizer.eval()
    z = tokenizer.encode(x).float()
    zc = z.transpose(0, 1).flatten(1)
    return {"channel_mean": zc.mean(1).tolist(), "channel_std": zc.std(1).tolist(), "min": float(z.min()),
            "max": float(z.max()), "std": float(z.std()), "abs_mean": float(z.abs().mean())}


def loss_curves(run, keys: Sequence[str] = ("loss",)) -> Dict[str, tuple]:
    """``{key: (steps, values)}`` from a run's metrics.jsonl."""
    recs = read_metrics(resolve(run))
    out = {}
    for k in keys:
        pts = [(r["step"], r[k]) for r in recs if k in r and "step" in r and isinstance(r[k], (int, float))]
        if pts:
            out[k] = tuple(map(list, zip(*pts)))
    return out


def device(name: str = "auto") -> torch.device:
    return resolve_device(name)


def figure_path(name: str, figures_dir="figures") -> Path:
    """Where ``save_fig`` would write ``name`` (for functions that write their own PNG)."""
    d = resolve(figures_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d / (name if name.endswith(".png") else f"{name}.png")


def copy_figure(src, name: str, figures_dir="figures") -> Path:
    """Copy a PNG a run wrote (e.g. ``images/samples_final.png``) to the figures folder."""
    dst = figure_path(name, figures_dir)
    shutil.copyfile(resolve(src), dst)
    return dst


def preset_for(run_path, preset: str) -> str:
    """The preset a missing run folder stands for: ``runs/main/cpu-fmnist-ae`` -> ``PRESET-ae``."""
    name = Path(str(run_path)).name
    for v in VARIANTS:
        if v != "detok" and name.endswith(f"-{v}") and not preset.endswith(f"-{v}"):
            return f"{preset}-{v}"
    return preset


def tail_mean(run, key: str = "loss", frac: float = 0.2) -> float:
    """Mean of the last ``frac`` of a run's logged ``key`` values (at least one record)."""
    curves = loss_curves(run, (key,))
    if key not in curves:
        raise ValueError(f"{run}: no {key!r} in metrics.jsonl")
    vals = curves[key][1]
    k = max(1, int(round(len(vals) * frac)))
    return float(sum(vals[-k:]) / k)


@torch.no_grad()
def corrupt_and_decode(tokenizer, x: torch.Tensor, t: float, mask_ratio: float, gamma: float = 3.0,
                       noise_type: str = "interpolative", seed: int = 18) -> dict:
    """``{"noise": decode(noise(z, t)), "mask": decode(encode with mask_ratio)}`` for one setting."""
    sw = corruption_sweeps(tokenizer, x, [float(t)], [float(mask_ratio)], gamma, noise_type, seed)
    return {"noise": sw["noise"][0], "mask": sw["mask"][0]}
