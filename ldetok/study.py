"""Where latent denoising pays off at small scale (``figures/study/``): the γ × M map of ``reproduce``
runs as heatmaps, the settings ranked for the choice, and the held-out confirmation of the chosen setting
against the γ=0/M=0 baseline on seeds that played no part in the choice.

    ldetok study map runs/study/map --out figures/study            # heatmaps, ranking, per-seed CSV
    ldetok study confirm runs/study/heldout --candidate mask --out figures/study
    ldetok study ablation runs/study/ablation --out figures/study       # the four-variant table
    ldetok study capacity runs/study/map --out figures/study           # AE vs l-DeTok under bigger generators
    ldetok study compare runs/study/map:g0.5_m0 runs/study/map:g0.5_m0_add=additive --name additive --out figures/study

Rows are ``reproduce`` result rows (``explore.load_results``); a variant's γ and M come from its name
(``config.variant_settings``). The rule of the confirmation: the candidate beats the baseline only where
the held-out means differ, in the better direction, by more than both standard deviations over seeds.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .config import resolve_reproduce_config, variant_settings
from .explore import better, load_results, metric_label
from .reproduce import collect_rows, parse_budgets, variant_label

__all__ = ["load_rows", "map_cells", "plot_map", "ranking", "confirm", "write_rows", "study_ablation", "capacity_table",
           "study_capacity", "capacity_rows", "study_compare", "parse_compare_spec", "MAP_METRICS", "CAPACITY_METRICS", "PAPER_ABLATION"]

# the map's panels: the samples against real images, the reconstruction ceiling, the samples against the
# tokenizer's own reconstructions (modelability) and the generator's loss
_INTEGERS = ("seed", "tok_steps", "gen_steps", "decoder_ft_steps", "n_recon", "n")  # read back as floats
MAP_METRICS = ("fd_gen_real[classifier]", "fd_recon_real[classifier]", "fd_gen_recon[classifier]", "generator_loss")


def load_rows(sources: Sequence, budget: Optional[Tuple[int, int]] = None) -> List[dict]:
    """The result rows of several ``reproduce`` folders or CSVs, each with its ``gamma``, ``max_mask_ratio``
    and ``noise_type`` (from the variant's name) and ``ft`` (decoder fine-tuning steps, 0 for none);
    only ``budget`` (tokenizer, generator steps) when given. Duplicate (variant, seed, budget, ft) rows
    from several sources are refused: each run must be counted once, and so are rows whose distances in one
    feature space were measured with different weights (recorded as ``features[SPACE]``)."""
    rows, seen, row_sources = [], {}, []
    for src in sources:
        for r in load_results(src):
            if budget and (int(r["tok_steps"]), int(r["gen_steps"])) != tuple(budget):
                continue
            r = _with_settings(r)
            key = (r["variant"], r["seed"], r["tok_steps"], r["gen_steps"], r["ft"], r["generator"])
            if key in seen:
                raise ValueError(f"{src}: the run {key} is also in {seen[key]}: count each run once")
            seen[key] = src
            rows.append(r)
            row_sources.append(src)
    if not rows:
        raise ValueError(f"no result rows in {', '.join(map(str, sources))}" + (f" at budget {budget}" if budget else ""))
    _check_one_extractor(rows, row_sources)
    return rows


def _check_one_extractor(rows: Sequence[dict], sources: Sequence) -> None:
    """Refuse rows whose distances in one space were measured with different weights (e.g. a classifier
    retrained on another machine: other weights, other distances); rows that record none are not counted."""
    for col in sorted({k for r in rows for k in r if k.startswith("features[")}):
        by_key: Dict[str, set] = {}
        for r, src in zip(rows, sources):
            if r.get(col) not in (None, ""):
                by_key.setdefault(str(r[col]), set()).add(str(src))
        if len(by_key) > 1:
            raise ValueError(f"{col[9:-1]}-space distances measured with different weights cannot be compared: "
                             + "; ".join(f"{k} in {', '.join(sorted(v))}" for k, v in by_key.items()))


def _with_settings(r: dict) -> dict:
    """A result row with its integer columns as integers, the variant's ``gamma``, ``max_mask_ratio`` and
    ``noise_type``, and ``ft`` (decoder fine-tuning steps, 0 for none)."""
    st = variant_settings(r["variant"])
    counts = {k: int(r[k]) for k in _INTEGERS if r.get(k) is not None}
    return {**r, **counts, "gamma": st["gamma"], "max_mask_ratio": st["max_mask_ratio"],
            "noise_type": st.get("noise_type", "interpolative"), "ft": counts.get("decoder_ft_steps", 0)}


def _stats(vals: Sequence[float]) -> dict:
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}


def map_cells(rows: Sequence[dict], metric: str, ft: int) -> Dict[Tuple[float, float], dict]:
    """(γ, M) -> mean, std and number of seeds of ``metric`` (interpolative noise only) for the decoder
    fine-tuned ``ft`` steps (0: untuned)."""
    vals: Dict[Tuple[float, float], List[float]] = {}
    for r in rows:
        if r["ft"] == ft and r["noise_type"] == "interpolative" and isinstance(r.get(metric), float):
            vals.setdefault((r["gamma"], r["max_mask_ratio"]), []).append(r[metric])
    return {k: _stats(v) for k, v in vals.items()}


def plot_map(rows: Sequence[dict], path, metrics: Sequence[str] = MAP_METRICS, title: str = "") -> Path:
    """One heatmap per metric (rows) and decoder (columns: untuned, fine-tuned), γ across and M down,
    each cell its mean over seeds with the standard deviation and the seed count written in it."""
    from matplotlib.figure import Figure

    fts = sorted({r["ft"] for r in rows})
    metrics = [m for m in metrics if any(isinstance(r.get(m), float) for r in rows)]
    gammas = sorted({r["gamma"] for r in rows if r["noise_type"] == "interpolative"})
    masks = sorted({r["max_mask_ratio"] for r in rows if r["noise_type"] == "interpolative"})
    fig = Figure(figsize=(1.2 * len(gammas) * len(fts) + 1.5, 1.0 * len(masks) * len(metrics) + 1.4))
    axes = fig.subplots(len(metrics), len(fts), squeeze=False)
    for i, m in enumerate(metrics):
        for j, ft in enumerate(fts):
            cells = map_cells(rows, m, ft)
            grid = np.full((len(masks), len(gammas)), np.nan)
            for (g, mk), c in cells.items():
                grid[masks.index(mk), gammas.index(g)] = c["mean"]
            ax = axes[i, j]
            cmap = "viridis_r" if better(m) == "lower" else "viridis"
            im = ax.imshow(grid, cmap=cmap, aspect="auto")
            for (g, mk), c in cells.items():
                txt = f"{c['mean']:.3g}" + (f"\n±{c['std']:.2g} (n={c['n']})" if c["n"] > 1 else "\n(n=1)")
                ax.text(gammas.index(g), masks.index(mk), txt, ha="center", va="center", fontsize=6.5,
                        color="white" if _dark(grid, c["mean"], cmap) else "black")
            ax.set_xticks(range(len(gammas)), [f"{g:g}" for g in gammas], fontsize=7)
            ax.set_yticks(range(len(masks)), [f"{mk:g}" for mk in masks], fontsize=7)
            ax.set_xlabel("γ (noise in training)", fontsize=7)
            ax.set_ylabel("M (max mask ratio)", fontsize=7)
            ax.set_title(f"{metric_label(m)}\n{'decoder fine-tuned ' + str(ft) + ' steps' if ft else 'untuned decoder'}",
                         fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.04)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _dark(grid: np.ndarray, v: float, cmap: str) -> bool:
    """Whether a cell of value ``v`` is drawn dark (white text): the low end of viridis, reversed or not."""
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    frac = 0.5 if hi == lo else (v - lo) / (hi - lo)
    return (frac > 0.5) if cmap.endswith("_r") else (frac < 0.5)


def ranking(rows: Sequence[dict], metric: str = "fd_gen_real[classifier]") -> List[dict]:
    """Every (variant, decoder) by its mean ``metric`` over seeds, best first, with std and seeds."""
    groups: Dict[Tuple[str, int], List[dict]] = {}
    for r in rows:
        if isinstance(r.get(metric), float):
            groups.setdefault((r["variant"], r["ft"]), []).append(r)
    out = [{"variant": v, "ft": ft, "label": variant_label(v), "seeds": sorted(int(r["seed"]) for r in rs),
            **_stats([r[metric] for r in rs])} for (v, ft), rs in groups.items()]
    return sorted(out, key=lambda d: d["mean"] if better(metric) != "higher" else -d["mean"])


def confirm(rows: Sequence[dict], candidate: str, baseline: str = "ae",
            metrics: Sequence[str] = MAP_METRICS[:1], ft: Optional[int] = None) -> List[dict]:
    """Per metric: the candidate's and the baseline's mean ± std over their seeds (the same seeds for
    both, else an error), and the verdict: ``"beats"`` / ``"loses"`` where the means differ by more than
    both standard deviations (in the better / worse direction), else ``"no difference shown"``; from one
    seed (no spread to compare with) ``"one seed: no verdict"``. ``ft``:
    the decoder (fine-tuning steps) to compare; None: the most fine-tuned in the rows."""
    ft = max(r["ft"] for r in rows) if ft is None else ft
    out = []
    for m in metrics:
        vals = {}
        for v in (candidate, baseline):
            per = {int(r["seed"]): r[m] for r in rows if r["variant"] == v and r["ft"] == ft and isinstance(r.get(m), float)}
            if not per:
                raise ValueError(f"no {m} for {v!r} with decoder_ft_steps={ft} in the rows")
            vals[v] = per
        if set(vals[candidate]) != set(vals[baseline]):
            raise ValueError(f"{m}: {candidate} has seeds {sorted(vals[candidate])}, {baseline} {sorted(vals[baseline])}:"
                             " compare on the same seeds")
        c, b = _stats(list(vals[candidate].values())), _stats(list(vals[baseline].values()))
        diff = c["mean"] - b["mean"]
        sign = -1.0 if better(m) == "lower" else 1.0
        clear = abs(diff) > c["std"] and abs(diff) > b["std"]
        verdict = ("one seed: no verdict" if c["n"] < 2 else
                   ("beats" if sign * diff > 0 else "loses") if clear else "no difference shown")
        out.append({"metric": m, "ft": ft, "seeds": sorted(vals[candidate]), "candidate": candidate, "baseline": baseline,
                    "candidate_mean": c["mean"], "candidate_std": c["std"], "baseline_mean": b["mean"],
                    "baseline_std": b["std"], "difference": diff, "verdict": verdict,
                    "per_seed": {s: (vals[candidate][s], vals[baseline][s]) for s in sorted(vals[candidate])}})
    return out


def write_rows(rows: Sequence[dict], path, columns: Sequence[str]) -> Path:
    """The rows (one per variant, seed and decoder) as a CSV with the given columns first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(columns) + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in columns]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["gamma"], r["max_mask_ratio"], r["noise_type"], r["ft"],
                                             r.get("generator", ""), r["seed"])):
            w.writerow(r)
    return path


# ---------------------------------------------------------------------------------------------
# the command line: ldetok study map | confirm
# ---------------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return f"{v:.3g}"


def study_map(sources, out, budget=None, metric: str = MAP_METRICS[0], name: str = "map") -> List[dict]:
    """Heatmaps (``OUT/NAME.png``), the per-seed CSV (``OUT/NAME.csv``) and the ranking by ``metric``
    (``OUT/NAME.md``) of the runs in ``sources``."""
    rows = load_rows(sources, budget)
    out = Path(out)
    budgets = sorted({(int(r["tok_steps"]), int(r["gen_steps"])) for r in rows})
    title = (f"γ × M map, SiT, tokenizer/generator steps {', '.join(f'{a}/{b}' for a, b in budgets)}, "
             f"seeds {','.join(map(str, sorted({int(r['seed']) for r in rows})))}")
    plot_map(rows, out / f"{name}.png", title=title)
    write_rows(rows, out / f"{name}.csv", ["variant", "gamma", "max_mask_ratio", "noise_type", "seed", "tok_steps",
                                           "gen_steps", "ft", *MAP_METRICS])
    rank = ranking(rows, metric)
    lines = [f"# {title}", "", f"Ranked by {metric_label(metric)}: mean ± std over seeds.", "",
             "| rank | setting | decoder | seeds | mean | std |", "|---|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {d['label']} | {'fine-tuned ' + str(d['ft']) if d['ft'] else 'untuned'} | "
              f"{','.join(map(str, d['seeds']))} | {_fmt(d['mean'])} | {_fmt(d['std'])} |" for i, d in enumerate(rank)]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rank


def study_confirm(sources, out, candidate: str, baseline: str = "ae", metrics: Sequence[str] = MAP_METRICS,
                  budget=None, name: str = "confirm") -> List[dict]:
    """The held-out comparison (``OUT/NAME.md``, per-seed ``OUT/NAME.csv``)."""
    rows = [r for r in load_rows(sources, budget) if r["variant"] in (candidate, baseline)]
    metrics = [m for m in metrics if any(isinstance(r.get(m), float) for r in rows)]
    res = confirm(rows, candidate, baseline, metrics)
    out = Path(out)
    write_rows(rows, out / f"{name}.csv", ["variant", "gamma", "max_mask_ratio", "noise_type", "seed", "tok_steps",
                                           "gen_steps", "ft", *metrics])
    c, b = variant_label(candidate), variant_label(baseline)
    lines = [f"# Held-out confirmation: {c} against {b}", "",
             f"Seeds {','.join(map(str, res[0]['seeds']))}, decoders fine-tuned {res[0]['ft']} steps; mean ± std over "
             "seeds (population std). The candidate beats the baseline only where the means differ by more than "
             "both spreads.", "", f"| metric | {c} | {b} | difference | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {metric_label(d['metric'])} | {_fmt(d['candidate_mean'])} ± {_fmt(d['candidate_std'])} | "
              f"{_fmt(d['baseline_mean'])} ± {_fmt(d['baseline_std'])} | {d['difference']:+.3g} | {d['verdict']} |"
              for d in res]
    lines += ["", "Per seed (candidate / baseline):", "", "| metric | " + " | ".join(f"seed {s}" for s in res[0]["seeds"]) + " |",
              "|---|" + "---|" * len(res[0]["seeds"])]
    lines += [f"| {d['metric']} | " + " | ".join(f"{_fmt(a)} / {_fmt(z)}" for a, z in d["per_seed"].values()) + " |"
              for d in res]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


# the paper's corruption ablation (DeTok-SB 50 epochs; MAR-B / SiT-B 100 epochs; FID-50K with CFG), beside ours
PAPER_ABLATION = {"ae": ("Baseline (no corruption)", 3.31, 6.97), "mask": ("Masking only", 2.90, 6.43),
                  "noise": ("Latent noise only", 2.77, 5.56), "detok": ("Joint (noise + masking)", 2.65, 5.50)}


def _pm(st: dict) -> str:
    """``_stats``' mean ± std (the value alone from one seed)."""
    return _fmt(st["mean"]) if st.get("n", 2) < 2 else f"{_fmt(st['mean'])} ± {_fmt(st['std'])}"


def _cell(vals: Sequence[float]) -> str:
    return _pm(_stats(vals))


def study_ablation(sources, out, name: str = "ablation", budget=None) -> str:
    """The four-variant corruption ablation laid out like the paper's table (one row per setting, gFID per
    generator family), with the reconstruction (rFID) the paper does not report and the samples' distance to
    their tokenizer's reconstructions (modelability, in the first space), mean ± std over seeds;
    ``OUT/NAME.md`` and the per-seed ``OUT/NAME.csv`` (one row per variant, seed and generator). Each
    distance is given in every feature space the runs measured (Inception: rFID/gFID; classifier)."""
    rows = [r for r in load_rows(sources, budget) if r["variant"] in PAPER_ABLATION]
    if not rows:
        raise ValueError(f"no rows of the variants {', '.join(PAPER_ABLATION)} in {', '.join(map(str, sources))}")
    spaces = [sp for sp in ("inception", "classifier") if any(isinstance(r.get(f"fd_gen_real[{sp}]"), float) for r in rows)]
    gens = list(dict.fromkeys(r["generator"] for r in rows))
    by = lambda v, g=None: [r for r in rows if r["variant"] == v and (g is None or r["generator"] == g)]
    cols = [f"rFID [{sp}]" for sp in spaces] + [f"{g} gFID [{sp}]" for g in gens for sp in spaces] + \
        [f"{g} FD(samples, recon) [{spaces[0]}]" for g in gens] + [f"{g} gen loss" for g in gens]
    budgets = sorted({(r["tok_steps"], r["gen_steps"]) for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"# The corruption ablation at CPU scale: tokenizer/generator steps {', '.join(f'{a}/{b}' for a, b in budgets)}, "
             f"seeds {','.join(map(str, seeds))}", "",
             "Mean ± std over seeds (population std). rFID: reconstructions of the test images against the test images; "
             "gFID: class-balanced samples against the test images. [inception]: FID-Inception pool3; [classifier]: a "
             "Fashion-MNIST CNN's features (not comparable with Inception distances); FD(samples, recon): samples against "
             "their tokenizer's own reconstructions. Lower is better. The paper's "
             "columns are its ImageNet-256 numbers (DeTok-SB 50 epochs, MAR-B / SiT-B 100 epochs, FID-50K with CFG), "
             "for the ordering only.", "",
             "| setup | " + " | ".join(cols) + " | paper MAR-B FID | paper SiT-B FID |", "|---" * (len(cols) + 3) + "|"]
    for v, (label, mar, sit) in PAPER_ABLATION.items():
        if not by(v):
            continue
        recon = {r["seed"]: r for r in by(v)}.values()  # one reconstruction per seed, whatever the generator
        cells = [_cell([r[f"fd_recon_real[{sp}]"] for r in recon if isinstance(r.get(f"fd_recon_real[{sp}]"), float)])
                 for sp in spaces]
        cells += [_cell([r[f"fd_gen_real[{sp}]"] for r in by(v, g)]) if by(v, g) else "–" for g in gens for sp in spaces]
        cells += [_cell([r[f"fd_gen_recon[{spaces[0]}]"] for r in by(v, g)]) if by(v, g) else "–" for g in gens]
        cells += [_cell([r["generator_loss"] for r in by(v, g)]) if by(v, g) else "–" for g in gens]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mar:.2f} | {sit:.2f} |")
    metrics = [f"fd_recon_real[{sp}]" for sp in spaces] + [f"fd_gen_real[{sp}]" for sp in spaces] + \
        [f"fd_gen_recon[{sp}]" for sp in spaces] + ["generator_loss"]
    write_rows(rows, Path(out) / f"{name}.csv", ["variant", "generator", "seed", "tok_steps", "gen_steps", "ft", *metrics])
    text = "\n".join(lines) + "\n"
    (Path(out) / f"{name}.md").write_text(text)
    print(text)
    return text


CAPACITY_PRESETS = ("cpu-capacity-width", "cpu-capacity-steps")
CAPACITY_METRICS = ("fd_gen_real[classifier]", "fd_gen_recon[classifier]", "generator_loss")


def capacity_table(rows: Sequence[dict], baseline: str = "ae", other: str = "detok",
                   metrics: Sequence[str] = CAPACITY_METRICS) -> List[dict]:
    """Per generator setting (name and steps) the two tokenizers' mean ± std of each metric over the seeds
    both have and the gap ``other`` minus ``baseline`` (the most fine-tuned decoder in the rows). A gap that shrinks as
    the generator grows points to generator capacity; one that stays, to the latents' content."""
    ft = max(r["ft"] for r in rows)
    settings = sorted({(r["generator"], r["gen_steps"]) for r in rows}, key=lambda k: (k[1], len(k[0]), k[0]))
    out = []
    for gen, steps in settings:
        sel = {v: [r for r in rows if r["variant"] == v and r["ft"] == ft and (r["generator"], r["gen_steps"]) == (gen, steps)]
               for v in (baseline, other)}
        seeds = set.intersection(*({r["seed"] for r in rs} for rs in sel.values()))
        if not seeds:
            continue
        sel = {v: [r for r in rs if r["seed"] in seeds] for v, rs in sel.items()}  # paired: the seeds both have
        entry = {"generator": gen, "gen_steps": steps, "ft": ft, "seeds": sorted(seeds)}
        for m in metrics:
            b, o = (_stats([r[m] for r in sel[v] if isinstance(r.get(m), float)] or [float("nan")]) for v in (baseline, other))
            entry[m] = {baseline: b, other: o, "gap": o["mean"] - b["mean"]}
        out.append(entry)
    if not out:
        raise ValueError(f"no generator setting with rows of both {baseline} and {other}")
    return out


def capacity_rows(out, presets: Sequence[str] = CAPACITY_PRESETS) -> List[dict]:
    """The finished rows of the capacity check in the reproduce folder ``out`` (read from its ``eval/``
    files, nothing started): each capacity preset's, and the baseline's, the first preset's tokenizers
    and budget under the default generator (the cpu-map rows when ``out`` holds the map)."""
    configs = [resolve_reproduce_config(p) for p in presets]
    configs.insert(0, replace(configs[0], families={}))
    rows = []
    for P in configs:
        got, _ = collect_rows(P, Path(out), P.seeds, P.variants, P.budgets, P.decoder_ft_steps, P.gen_overrides)
        rows += [_with_settings(r) for r in got]
    if not rows:
        raise ValueError(f"{out}: no finished run of the capacity presets ({', '.join(presets)}) or their baseline")
    _check_one_extractor(rows, [out] * len(rows))
    return rows


def study_capacity(sources, out, name: str = "capacity", baseline: str = "ae", other: str = "detok") -> List[dict]:
    """The generator-capacity check (``OUT/NAME.md``, per-seed ``OUT/NAME.csv``): both tokenizers under each
    generator setting found in ``sources`` (the default SiT, a wider one, more steps). A source is a
    results CSV, or a reproduce folder that the capacity presets ran in (``capacity_rows``)."""
    rows = []
    for src in sources:
        rows += capacity_rows(src) if Path(src).is_dir() else load_rows([src])
    rows = [r for r in rows if r["variant"] in (baseline, other)]
    table = capacity_table(rows, baseline, other)
    b, o = variant_label(baseline), variant_label(other)
    lines = [f"# Generator capacity: {b} against {o}", "",
             f"Decoders fine-tuned {table[0]['ft']} steps; mean ± std over seeds (population std); gap = {o} minus {b} "
             "(lower is better for every metric here).", "",
             "| generator | steps | seeds | metric | " + f"{b} | {o} | gap |", "|---|---|---|---|---|---|---|"]
    for e in table:
        for m in CAPACITY_METRICS:
            d = e[m]
            lines.append(f"| {e['generator']} | {e['gen_steps']} | {','.join(map(str, e['seeds']))} | {metric_label(m)} | "
                         f"{_pm(d[baseline])} | {_pm(d[other])} | {d['gap']:+.3g} |")
    write_rows(rows, Path(out) / f"{name}.csv", ["variant", "generator", "seed", "tok_steps", "gen_steps", "ft",
                                                 *CAPACITY_METRICS])
    (Path(out) / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


def parse_compare_spec(spec: str) -> Tuple[str, str, str]:
    """``SOURCE:VARIANT[=LABEL]`` -> (source, variant, label); the label defaults to the variant's."""
    head, _, label = spec.partition("=")
    src, sep, variant = head.rpartition(":")
    if not sep or not src or not variant:
        raise ValueError(f"{spec!r}: expected SOURCE:VARIANT[=LABEL], e.g. runs/study/map:g0.5_m0_add=additive")
    variant_settings(variant)  # an unknown variant is refused here, naming it
    return src, variant, label or variant_label(variant)


def study_compare(specs: Sequence[str], out, name: str = "compare", metrics: Sequence[str] = MAP_METRICS,
                  budget=None) -> List[dict]:
    """One lever at a time (``OUT/NAME.md``, per-seed ``OUT/NAME.csv``): each of ``specs`` (``SOURCE:VARIANT
    [=LABEL]``, from any reproduce folders or CSVs, e.g. one trained with ``--tok perceptual=effnet_lite0``)
    against the first, on the seeds they share, for every decoder they share (untuned, fine-tuned), with
    ``confirm``'s rule and verdicts."""
    parsed = [parse_compare_spec(s) for s in specs]
    if len(parsed) < 2 or len({lab for _, _, lab in parsed}) < len(parsed):
        raise ValueError("study compare needs two or more SOURCE:VARIANT[=LABEL], each with its own label")
    groups = {lab: [dict(r, variant=lab, setting=v, source=src) for r in load_rows([src], budget) if r["variant"] == v]
              for src, v, lab in parsed}
    for (src, v, lab) in parsed:
        if not groups[lab]:
            raise ValueError(f"{src}: no finished rows of {v!r}" + (f" at budget {budget}" if budget else ""))
    base = parsed[0][2]
    seeds = set.intersection(*({r["seed"] for r in g} for g in groups.values()))
    fts = sorted(set.intersection(*({r["ft"] for r in g} for g in groups.values())))
    if not seeds or not fts:
        raise ValueError(f"{', '.join(specs)}: no seed and decoder that every entry has")
    rows = [r for g in groups.values() for r in g if r["seed"] in seeds and r["ft"] in fts]
    metrics = [m for m in metrics if all(isinstance(r.get(m), float) for r in rows)]
    res = [d for ft in fts for lab in groups if lab != base for d in confirm(rows, lab, base, metrics, ft)]
    write_rows(rows, Path(out) / f"{name}.csv", ["variant", "setting", "source", "seed", "tok_steps", "gen_steps", "ft",
                                                 *metrics])
    lines = [f"# {' / '.join(groups)}", "",
             f"Each against {base}; seeds {','.join(map(str, sorted(seeds)))}; mean ± std over seeds (population std) "
             "where there are several. An entry beats the first only where the means differ by more than both "
             "spreads.", "", "| decoder | metric | entry | entry value | " + f"{base} | difference | verdict |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {'fine-tuned ' + str(d['ft']) if d['ft'] else 'untuned'} | {metric_label(d['metric'])} | "
              f"{d['candidate']} | {_pm(_mean_std(d, 'candidate'))} | {_pm(_mean_std(d, 'baseline'))} | "
              f"{d['difference']:+.3g} | {d['verdict']} |" for d in res]
    (Path(out) / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


def _mean_std(d: dict, who: str) -> dict:
    return {"mean": d[f"{who}_mean"], "std": d[f"{who}_std"], "n": len(d["seeds"])}


def cmd_study(args) -> int:
    budget = parse_budgets(args.budget)[0] if args.budget else None
    if args.action == "map":
        study_map(args.sources, args.out, budget, args.metric or MAP_METRICS[0], args.name or "map")
    elif args.action == "capacity":
        study_capacity(args.sources, args.out, args.name or "capacity", args.baseline, args.candidate or "detok")
    elif args.action == "compare":
        study_compare(args.sources, args.out, args.name or "compare",
                      [args.metric] if args.metric else MAP_METRICS, budget)
    elif args.action == "ablation":
        study_ablation(args.sources, args.out, args.name or "ablation", budget)
    else:
        if not args.candidate:
            raise ValueError("ldetok study confirm needs --candidate VARIANT")
        study_confirm(args.sources, args.out, args.candidate, args.baseline,
                      [args.metric] if args.metric else MAP_METRICS, budget, args.name or "confirm")
    return 0
