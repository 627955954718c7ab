"""Parameter sweeps over a notebook: each point of a grid's cartesian product is its own papermill run.

``ldetok sweep notebooks/04_ablations.ipynb --grid gamma=0,1,3 max_mask_ratio=0,0.7 --out runs/sweep``
executes the notebook once per point into ``OUT/<point>/executed.ipynb`` with those parameters and
``RUN_DIR=OUT/<point>``. Points run one per GPU (``CUDA_VISIBLE_DEVICES``) when several GPUs are
visible, else ``parallel`` at a time (1 by default). A failed point is recorded in
``OUT/sweep.json`` with the tail of its log, never fatal to the others.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["parse_grid", "grid_points", "point_name", "run_sweep", "read_sweep", "add_sweep_parser"]


def _literal(raw: str):
    low = raw.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw.strip()


def parse_grid(items: List[str]) -> Dict[str, list]:
    """``["gamma=0,1,3", "noise_type=interpolative,additive"]`` -> ``{"gamma": [0, 1, 3], ...}``."""
    grid = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"grid entry {item!r} is not of the form key=v1,v2,...")
        key, raw = item.split("=", 1)
        vals = [_literal(v) for v in raw.split(",") if v.strip()]
        if not key.strip() or not vals:
            raise ValueError(f"grid entry {item!r} has no key or no values")
        grid[key.strip()] = vals
    return grid


def grid_points(grid: Dict[str, list]) -> List[dict]:
    """The cartesian product, in the order the keys and values were given."""
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(list(grid[k]) for k in keys))]


def point_name(point: dict) -> str:
    """A folder name for a point: ``gamma=3_max_mask_ratio=0.7`` (unsafe characters become '-')."""
    if not point:
        return "default"
    return "_".join(re.sub(r"[^A-Za-z0-9._=+-]", "-", f"{k}={v}") for k, v in point.items())


def _visible_gpus() -> List[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch/CUDA: CPU sweep
        return []


def _kernel(notebook: Path, requested: Optional[str]) -> Optional[str]:
    """The kernel to run ``notebook`` with: ``requested``; else the notebook's own when this machine has it
    (``make install`` registers ``ldetok``); else ``python3``, this environment's, which always exists."""
    if requested:
        return requested
    try:
        name = json.loads(notebook.read_text())["metadata"]["kernelspec"]["name"]
    except (OSError, ValueError, KeyError):
        return None
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        installed = KernelSpecManager().find_kernel_specs()
    except ImportError:
        return None
    return name if name in installed else "python3"


def _run_point(notebook: Path, out: Path, params: dict, env: dict, cwd: Path, kernel_name: Optional[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(out / "executed.ipynb"), "-y", json.dumps(params),
           "--cwd", str(cwd), "--log-output", "--no-progress-bar"]
    if kernel_name:
        cmd += ["-k", kernel_name]
    t0 = time.time()
    with open(out / "papermill.log", "w") as log:
        rc = subprocess.call(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    rec = {"params": params, "returncode": rc, "status": "ok" if rc == 0 else "failed",
           "seconds": round(time.time() - t0, 2), "executed": str(out / "executed.ipynb")}
    if rc != 0:
        rec["error_tail"] = (out / "papermill.log").read_text(errors="replace")[-2000:]
    return rec


def run_sweep(notebook, grid: Dict[str, list], out, parallel: Optional[int] = None,
              extra_params: Optional[dict] = None, kernel_name: Optional[str] = None, cwd=None) -> dict:
    """Execute ``notebook`` once per grid point (see the module docstring); returns and writes
    ``OUT/sweep.json``: ``{"notebook", "grid", "points": {name: {params, status, returncode, ...}}}``."""
    from .runs import atomic_write_json  # here, not at the top: ``ldetok --help`` builds this parser without torch

    notebook, out = Path(notebook).resolve(), Path(out).resolve()
    if not notebook.exists():
        raise FileNotFoundError(f"notebook not found: {notebook}")
    out.mkdir(parents=True, exist_ok=True)
    cwd = Path(cwd).resolve() if cwd else Path(__file__).resolve().parents[1]
    points = grid_points(grid)
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise ValueError(f"grid points map to the same folder name: {names}")
    gpus = _visible_gpus()
    slots = gpus if len(gpus) > 1 else [None] * max(1, int(parallel or 1))
    if len(gpus) > 1 and parallel:
        slots = gpus[: int(parallel)]
    free: "queue.Queue" = queue.Queue()
    for s in slots:
        free.put(s)

    kernel = _kernel(Path(notebook), kernel_name)

    def job(name_point):
        name, point = name_point
        gpu = free.get()
        try:
            env = dict(os.environ)
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            params = {**(extra_params or {}), **point, "RUN_DIR": str(out / name)}
            print(f"[sweep] {name}: start{'' if gpu is None else f' on GPU {gpu}'}", flush=True)
            rec = _run_point(notebook, out / name, params, env, cwd, kernel)
            if gpu is not None:
                rec["gpu"] = gpu
            print(f"[sweep] {name}: {rec['status']} in {rec['seconds']:.0f}s", flush=True)
            return name, rec
        finally:
            free.put(gpu)

    with ThreadPoolExecutor(max_workers=len(slots)) as ex:
        results = dict(ex.map(job, zip(names, points)))
    summary = {"notebook": str(notebook), "grid": grid, "points": {n: results[n] for n in names}}
    atomic_write_json(summary, out / "sweep.json")
    failed = [n for n in names if results[n]["status"] != "ok"]
    print(f"[sweep] {len(names) - len(failed)}/{len(names)} points ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return summary


def read_sweep(out) -> List[dict]:
    """One row per point folder under ``out`` that holds a ``metrics.json``: its parameters (from
    ``sweep.json`` when present) merged with its metrics, plus ``point`` (the folder name)."""
    out = Path(out)
    meta = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else {"points": {}}
    rows = []
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        if not (d / "metrics.json").exists():
            continue
        params = {k: v for k, v in meta["points"].get(d.name, {}).get("params", {}).items() if k != "RUN_DIR"}
        rows.append({"point": d.name, **params, **json.loads((d / "metrics.json").read_text())})
    return rows


# ---------------------------------------------------------------------------------------------
# CLI: `ldetok sweep NOTEBOOK --grid k=v1,v2 ... --out DIR [--parallel N] [--param k=v ...]`
# ---------------------------------------------------------------------------------------------
def cmd_sweep(args) -> int:
    extra = {k: v[0] for k, v in parse_grid(args.param or []).items()}
    summary = run_sweep(args.notebook, parse_grid(args.grid), args.out, parallel=args.parallel, extra_params=extra,
                        kernel_name=args.kernel)
    return 0 if all(p["status"] == "ok" for p in summary["points"].values()) else 1


def add_sweep_parser(subparsers) -> None:
    s = subparsers.add_parser("sweep", help="run a notebook once per point of a parameter grid (papermill)")
    s.add_argument("notebook", help="the notebook, e.g. notebooks/04_ablations.ipynb")
    s.add_argument("--grid", nargs="+", required=True, help="key=v1,v2,... (the cartesian product is swept)")
    s.add_argument("--out", required=True, help="sweep folder: OUT/<point>/executed.ipynb, OUT/sweep.json")
    s.add_argument("--parallel", type=int, default=None, help="points at a time on CPU (default 1; one per GPU)")
    s.add_argument("--param", nargs="*", default=[], help="fixed notebook parameters key=value (e.g. STEPS=200)")
    s.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's when installed, else python3)")
    s.set_defaults(fn=cmd_sweep)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ldetok.sweep")  # same arguments as `ldetok sweep`
    add_sweep_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
