"""The ablation explorer (notebook 04): result tables of sweeps, ``reproduce`` runs and the study CSVs,
a metric against a parameter with mean ± spread over seeds, and a widget panel to choose them.

Sources (``load_results``): an ``ldetok sweep`` folder (one row per point: its parameters and its
``metrics.json``), a ``reproduce`` output folder (its ``results.csv``: one row per variant, seed and
budget) or any such CSV, e.g. the committed ``figures/*_results.csv``. Rows are plain dicts; numbers
are floats, empty cells None.

Columns are sorted into parameters (what a run was given: variant, seed, γ, budgets, ...), metrics (the
numbers measured) and bookkeeping (sample counts, paths). ``metric_label`` names a metric in words with
its unit and the direction of "better"; ``view`` draws one metric against one parameter, one line per
group, each point the mean over the rows that share it (seeds, usually) with their standard deviation
as an error bar; the parameters that vary but are neither the x axis nor the grouping are named in the
title (they were averaged over: narrow them with a filter).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .notebook import panel
from .reproduce import LABELS as VARIANT_LABELS
from .sweep import read_sweep

__all__ = ["load_results", "default_sources", "parameters", "metrics", "varying", "metric_label", "better",
           "param_label", "aggregate", "view", "default_views", "views_figure", "filter_options", "explorer"]

SEED_COLUMNS = ("seed", "SEED")
# what a run was given; any text column is a parameter too
PARAMETERS = ("variant", "generator", "model", "MODEL", "PRESET", "preset", "seed", "SEED", "tok_steps", "gen_steps",
              "STEPS", "steps", "BATCH_SIZE", "decoder_ft_steps", "cfg", "gamma", "max_mask_ratio", "noise_type",
              "noise_dist", "noise_mean", "noise_std", "EVAL_GAMMA")
BOOKKEEPING = ("point", "RUN_DIR", "FIGURES_DIR", "n", "n_recon", "sample_steps", "world_size", "cfg_search", "N_EVAL",
               "STATS_IMAGES", "DEVICE", "NPROC")
PARAM_LABELS = {"variant": "tokenizer variant", "generator": "generator", "seed": "seed", "SEED": "seed",
                "tok_steps": "tokenizer steps", "gen_steps": "generator steps", "STEPS": "tokenizer steps",
                "steps": "training steps", "cfg": "CFG scale", "gamma": "γ (noise scale in training)",
                "max_mask_ratio": "M (maximum mask ratio in training)", "noise_type": "noise type",
                "noise_dist": "τ distribution (noise level)", "noise_mean": "τ logit-normal mean",
                "noise_std": "τ logit-normal std", "decoder_ft_steps": "decoder fine-tuning steps"}
_SPACES = {"inception": "Inception", "classifier": "Fashion-MNIST classifier"}
_HIGHER, _LOWER = "higher is better", "lower is better"


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def _value(raw):
    if raw is None or raw == "":
        return None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw) if math.isfinite(float(raw)) else None
    if isinstance(raw, str):
        try:
            v = float(raw)
            return v if math.isfinite(v) else None
        except ValueError:
            return raw
    return raw if isinstance(raw, (str, bool)) else json.dumps(raw)


def _read_csv(path: Path) -> List[dict]:
    with open(path, newline="") as f:
        rows = [{k: _value(v) for k, v in r.items() if k} for r in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"{path}: no rows (an empty results table)")
    return rows


def load_results(source) -> List[dict]:
    """The rows of a sweep folder, a ``reproduce`` output folder (``results.csv``) or a results CSV."""
    p = Path(source)
    if p.is_file():
        if p.suffix != ".csv":
            raise ValueError(f"{p}: expected a results CSV (reproduce's results.csv), a sweep folder or a reproduce folder")
        return _read_csv(p)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such results CSV or folder")
    if (p / "results.csv").is_file():
        return _read_csv(p / "results.csv")
    rows = read_sweep(p)
    if not rows:
        raise ValueError(f"{p}: neither a reproduce folder (no results.csv) nor a sweep folder with finished points "
                         "(no <point>/metrics.json): run `ldetok reproduce` or `ldetok sweep` first")
    return [{k: _value(v) for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows]


def default_sources(root, extra: Sequence = ()) -> Dict[str, Path]:
    """name -> source: the committed ``figures/*.csv`` under ``root``, ``runs/main`` when ``make run`` has
    written its results there, and ``extra`` (sweep or reproduce folders, CSVs; missing ones refused)."""
    root = Path(root)
    out = {p.stem: p for p in sorted((root / "figures").glob("*.csv"))}
    if (root / "runs" / "main" / "results.csv").is_file():
        out["runs/main (make run)"] = root / "runs" / "main"
    for e in extra:
        p = Path(e) if Path(e).is_absolute() else root / e
        if not p.exists():
            raise FileNotFoundError(f"{e}: no such sweep folder, reproduce folder or results CSV")
        out[p.stem if p.is_file() else p.name] = p
    return out


# ---------------------------------------------------------------------------------------------
# columns
# ---------------------------------------------------------------------------------------------
def _columns(rows: Sequence[dict]) -> List[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _bookkeeping(c: str) -> bool:
    return c in BOOKKEEPING or c.startswith("n[")


def parameters(rows: Sequence[dict]) -> List[str]:
    """The parameter columns: the known ones, and any other text column."""
    return [c for c in _columns(rows) if not _bookkeeping(c) and (
        c in PARAMETERS or any(isinstance(r.get(c), str) for r in rows))]


def metrics(rows: Sequence[dict]) -> List[str]:
    """The metric columns: numbers that are neither parameters nor bookkeeping."""
    params = set(parameters(rows))
    return [c for c in _columns(rows) if c not in params and not _bookkeeping(c)
            and any(isinstance(r.get(c), float) for r in rows)]


def varying(rows: Sequence[dict], columns: Sequence[str]) -> List[str]:
    """Those of ``columns`` that take more than one value in ``rows``."""
    return [c for c in columns if len({r.get(c) for r in rows}) > 1]


def _determined(rows: Sequence[dict], col: str, by: Sequence[Optional[str]]) -> bool:
    """Whether ``col`` takes one value for each combination of ``by`` (e.g. generator steps set by the
    tokenizer steps of one budget)."""
    seen: Dict[tuple, set] = {}
    for r in rows:
        seen.setdefault(tuple(r.get(b) for b in by if b), set()).add(r.get(col))
    return all(len(v) == 1 for v in seen.values())


def better(metric: str) -> Optional[str]:
    """``"higher"``, ``"lower"`` or None (a statistic with no better side) for a metric."""
    base = metric.split("[")[0]
    if base.startswith(("psnr", "ssim")):
        return "higher"
    if base.startswith(("fd_", "kid_", "rfid", "gfid", "fid")) or base.endswith("loss"):
        return "lower"
    return None


def metric_label(metric: str) -> str:
    """A metric in words, with its unit and the direction of better: ``"PSNR, latents noised at t=0.5
    (dB) ↑ higher is better"``."""
    base, _, space = metric.partition("[")
    space = _SPACES.get(space.rstrip("]"), space.rstrip("]"))
    m = re.fullmatch(r"psnr_t([0-9.]+)", base)
    k = re.fullmatch(r"psnr_mask([0-9.]+)", base)
    if base in ("psnr", "psnr_clean"):
        text = "PSNR, clean reconstruction (dB)"
    elif base in ("ssim", "ssim_clean"):
        text = "SSIM, clean reconstruction"
    elif m:
        text = f"PSNR, latents noised at t={m.group(1)} (dB)"
    elif k:
        text = f"PSNR, {float(k.group(1)):.0%} of tokens masked (dB)"
    else:
        text = {"fd_recon_real": "rFID: FD(reconstructions, real)", "fd_gen_real": "gFID: FD(samples, real)",
                "kid_gen_real": "KID(samples, real)", "fd_gen_recon": "FD(samples, reconstructions)",
                "generator_loss": "generator loss (final, smoothed)", "final_loss": "tokenizer loss (final)",
                "denoise_loss": "denoiser loss (final)", "latent_std": "latent std",
                "latent_abs_mean": "latent mean |z|"}.get(base, base)
    if space:
        text += f" [{space}]"
    way = better(metric)
    return text + ("" if way is None else f"  {'↑' if way == 'higher' else '↓'} {way} is better")


def param_label(param: str) -> str:
    return PARAM_LABELS.get(param, param)


def _value_label(param: str, v) -> str:
    if param == "variant" and v in VARIANT_LABELS:
        return VARIANT_LABELS[v]
    return f"{v:g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------
# filtering and aggregating
# ---------------------------------------------------------------------------------------------
def filter_options(rows: Sequence[dict]) -> List[Tuple[str, Optional[Tuple[str, object]]]]:
    """(label, (param, value)) for each value of each varying parameter, after ("all rows", None)."""
    out = [("all rows", None)]
    for p in varying(rows, parameters(rows)):
        for v in sorted({r.get(p) for r in rows}, key=lambda v: (isinstance(v, str), v if v is not None else -1e308)):
            out.append((f"{param_label(p)} = {_value_label(p, v)}", (p, v)))
    return out


def _apply(rows, where) -> List[dict]:
    pairs = [where] if isinstance(where, tuple) else list((where or {}).items())
    return [r for r in rows if all(r.get(p) == v for p, v in pairs)]


def _sort_key(v):
    return (isinstance(v, str), v if v is not None else -1e308)


def aggregate(rows: Sequence[dict], metric: str, x: str, group: Optional[str] = None) -> Dict[object, List[dict]]:
    """group value -> points sorted by x: ``{"x", "mean", "std", "n"}`` over the rows sharing (group, x)
    that measured ``metric`` (std over those rows, 0 for one)."""
    cells: Dict[tuple, List[float]] = {}
    for r in rows:
        v = r.get(metric)
        if isinstance(v, float):
            cells.setdefault((r.get(group) if group else None, r.get(x)), []).append(v)
    out: Dict[object, List[dict]] = {}
    for (g, xv), vals in sorted(cells.items(), key=lambda kv: (_sort_key(kv[0][0]), _sort_key(kv[0][1]))):
        out.setdefault(g, []).append({"x": xv, "mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)})
    return out


# ---------------------------------------------------------------------------------------------
# drawing (matplotlib's object API: no pyplot state, no backend)
# ---------------------------------------------------------------------------------------------
def view(rows: Sequence[dict], metric: str, x: str, group: Optional[str] = None, where=None, ax=None,
         title: Optional[str] = None):
    """``metric`` against ``x``, one line per ``group`` value, mean ± std over the rows of each point, on
    ``ax`` (a new Figure when None). ``where``: ``(param, value)`` or ``{param: value}`` rows to keep.
    Returns the figure."""
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("no rows to draw")
    for name, col in (("metric", metric), ("x", x), ("group", group)):
        if col is not None and col not in _columns(rows):
            raise ValueError(f"{name} {col!r} is not a column; columns: {', '.join(_columns(rows))}")
    rows = _apply(rows, where)
    fig = ax.figure if ax is not None else Figure(figsize=(6.4, 3.6))
    ax = ax if ax is not None else fig.subplots()
    series = aggregate(rows, metric, x, group)
    xs_all = sorted({p["x"] for pts in series.values() for p in pts}, key=_sort_key)
    numeric = all(isinstance(v, float) for v in xs_all)
    pos = {v: (v if numeric else i) for i, v in enumerate(xs_all)}
    width = 0.0 if numeric or group in (None, x) or len(series) < 2 else 0.5 / len(series)
    for i, (g, pts) in enumerate(series.items()):
        shift = (i - (len(series) - 1) / 2) * width
        ax.errorbar([pos[p["x"]] + shift for p in pts], [p["mean"] for p in pts], yerr=[p["std"] for p in pts],
                    marker="o", ms=4, capsize=3, linestyle="-" if numeric else "none",
                    label=None if group is None else _value_label(group, g))
    if numeric and x.lower().endswith("steps") and len(xs_all) > 2 and min(xs_all) > 0:
        ax.set_xscale("log")  # budgets double
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{v:g}" for v in xs_all], fontsize=8)
        ax.minorticks_off()
    if not numeric:
        ax.set_xlim(-0.5, len(xs_all) - 0.5)
        ax.set_xticks(range(len(xs_all)))
        ax.set_xticklabels([_value_label(x, v) for v in xs_all], rotation=15 if len(xs_all) > 3 else 0, fontsize=8)
    ax.set_xlabel(param_label(x))
    ax.set_ylabel(metric_label(metric).split("  ")[0], fontsize=8)
    ax.grid(alpha=0.3)
    ns = sorted({p["n"] for pts in series.values() for p in pts})
    rest = [c for c in varying(rows, parameters(rows))
            if c not in (x, group) and c not in SEED_COLUMNS and not _determined(rows, c, (x, group))]
    note = f"mean ± std over {'/'.join(map(str, ns))} run(s) per point"
    if rest:
        note += "; averaged over " + ", ".join(param_label(c) for c in rest)
    ax.set_title((title + "\n" if title else "") + metric_label(metric) + "\n" + note, fontsize=8)
    if group is not None:
        ax.legend(title=param_label(group), fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


_PREFERRED = ("psnr_t0.5", "psnr", "psnr_clean", "fd_gen_real[inception]", "fd_gen_recon[inception]",
              "psnr_mask0.5", "generator_loss", "fd_recon_real[inception]", "latent_std")
_X_ORDER = ("gamma", "max_mask_ratio", "noise_type", "noise_dist", "tok_steps", "gen_steps", "STEPS", "variant",
            "generator", "cfg")


def default_views(rows: Sequence[dict], n: int = 4) -> List[Tuple[str, str, Optional[str]]]:
    """Up to ``n`` (metric, x, group) views of a table: the preferred metrics it has, against its first
    varying parameter (seeds aside; budgets and corruption settings before variants), one line per value
    of the next one that the x axis does not already determine (the variant first)."""
    params = [p for p in varying(rows, parameters(rows)) if p not in SEED_COLUMNS]
    params = sorted(params, key=lambda p: _X_ORDER.index(p) if p in _X_ORDER else len(_X_ORDER))
    ms = metrics(rows)
    chosen = [m for m in _PREFERRED if m in ms][:n] or ms[:n]
    if not params:
        params = [c for c in parameters(rows) if c not in SEED_COLUMNS][:1] or [next(iter(_columns(rows)))]
    x = params[0]
    groups = sorted((p for p in params[1:] if not _determined(rows, p, (x,))), key=lambda p: p != "variant")
    group = groups[0] if groups else ("variant" if x == "variant" else None)  # one colour per variant
    return [(m, x, group) for m in chosen]


def views_figure(rows: Sequence[dict], views, title: str = ""):
    """The views side by side in one Figure (two per row)."""
    from matplotlib.figure import Figure

    ncols = min(2, len(views))
    nrows = math.ceil(len(views) / ncols)
    fig = Figure(figsize=(6.6 * ncols, 3.7 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (m, x, g) in zip(axes.flat, views):
        view(rows, m, x, g, ax=ax)
    for ax in list(axes.flat)[len(views):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def explorer(sources: Dict[str, Path]):
    """The widget panel: dropdowns for the results table, metric, x axis, grouping and filter over the
    tables of ``sources`` (name -> path); the view is redrawn on each change. Returns the ipywidgets box."""
    import ipywidgets as W

    tables = {name: load_results(p) for name, p in sources.items()}
    if not tables:
        raise ValueError("no result tables to explore")
    layout = W.Layout(width="32%")
    style = {"description_width": "70px"}
    src = W.Dropdown(options=list(tables), description="results", layout=layout, style=style)
    metric, x, group, where = (W.Dropdown(description=d, layout=layout, style=style)
                               for d in ("metric", "x axis", "group by", "filter"))
    hold = {"on": False}

    def refill(name):
        rows = tables[name]
        m, xx, g = default_views(rows, 1)[0]
        params = parameters(rows)
        hold["on"] = True
        try:
            metric.options = [(metric_label(c), c) for c in metrics(rows)]
            x.options = [(param_label(c), c) for c in params]
            group.options = [("(none)", None)] + [(param_label(c), c) for c in params]
            where.options = filter_options(rows)
            metric.value, x.value, group.value, where.value = m, xx, g, None
        finally:
            hold["on"] = False

    refill(src.value)
    box = panel(lambda results, metric, x, group, where: view(tables[results], metric, x, group, where),
                {"results": src, "metric": metric, "x": x, "group": group, "where": where}, columns=3, hold=hold)
    src.observe(lambda ch: (refill(ch["new"]), box.redraw()), names="value")
    return box
