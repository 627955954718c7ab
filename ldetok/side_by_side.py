"""Variant pipelines of one reproduction side by side, each in its own ``ldetok reproduce`` process
(``ldetok reproduce --jobs N``, ``ldetok main --jobs N``).

A reproduction's (variant, seed) pipelines are independent: each trains its own tokenizer and generators
and writes its own files under ``OUT``. On a small CPU machine several 1-thread processes get more out of
the cores than one multi-threaded process, whose small matrix products do not keep every thread busy.
The processes share ``OUT``; every stage resumes, so a killed group is finished by running the command
again, and the caller then tabulates every row in-process (each stage found done).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Optional, Sequence

from .engine.common import usable_cpus
from .engine.distributed import is_distributed, resolve_device
from .reproduce import warm_extractors

__all__ = ["parallel_jobs", "run_side_by_side", "child_arguments"]


def parallel_jobs(jobs: Optional[int], n_variants: int, device: str = "auto") -> int:
    """How many variant pipelines run side by side: ``jobs`` when given, else (None) one per variant up to
    the usable CPUs on a CPU run (with the CPUs shared among them), and 1 on a GPU or under torchrun.
    On this project's 2-core machine two 1-thread processes train the small CPU models ~20% faster than
    one 2-thread process (tokenizer, 150 steps each: 46 s side by side against 58 s one after the other)."""
    under_torchrun = is_distributed() or os.environ.get("WORLD_SIZE", "1") != "1"
    if jobs is not None:
        if jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        if jobs > 1 and under_torchrun:
            raise ValueError(f"--jobs {jobs} starts processes of its own; under torchrun every rank already shares "
                             "each pipeline: leave --jobs out")
        return min(jobs, n_variants)
    if resolve_device(device).type != "cpu" or under_torchrun:
        return 1
    return max(1, min(n_variants, usable_cpus()))


def child_arguments(argv: Sequence[str], drop: Sequence[str] = ("--jobs", "--variants")) -> List[str]:
    """A command line without the options in ``drop`` (``--jobs 2`` and ``--jobs=2`` alike)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in drop:
            skip = True
        elif not any(a.startswith(d + "=") for d in drop):
            out.append(a)
    return out


def run_side_by_side(base_args: Sequence[str], variants: Sequence[str], out: Path, features: Sequence[str],
                     jobs: int, device: str) -> None:
    """``ldetok reproduce BASE_ARGS --variants GROUP`` for ``jobs`` groups of ``variants`` (round robin),
    each process at CPUs/jobs threads. The feature extractors are prepared first, here (the classifier
    trained, the Inception weights converted), so the processes only read their caches. Each process's
    output goes to ``OUT/logs/reproduce_<variants>.log``; its stage lines are shown here, prefixed with
    its variants, and its log's end when it fails."""
    warm_extractors(features, device)
    threads = max(1, usable_cpus() // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    out = Path(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    procs = []
    for group in (list(variants)[i::jobs] for i in range(jobs)):
        name = ",".join(group)
        log = out / "logs" / f"reproduce_{'_'.join(group)}.log"
        cmd = [sys.executable, "-m", "ldetok.cli", "reproduce", *base_args, "--variants", name]
        print(f"[{name}] {' '.join(cmd[2:])} at {threads} thread(s), log: {log}", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        relay = threading.Thread(target=_relay, args=(proc, name, log), daemon=True)
        relay.start()
        procs.append((name, log, proc, relay))
    failed = []
    for name, log, proc, relay in procs:
        proc.wait()
        relay.join()
        if proc.returncode:
            failed.append(name)
            tail = log.read_text(errors="replace").splitlines()[-25:]
            print(f"[{name}] FAILED (exit {proc.returncode}); the end of {log}:\n" + "\n".join(tail), flush=True)
    if failed:
        raise RuntimeError(f"the pipeline of {', '.join(failed)} failed (see above); running the command again "
                           "resumes every finished stage")


def _relay(proc, name: str, log: Path) -> None:
    """Copy a child's output into its log; show its stage lines here."""
    with open(log, "a") as f:
        for line in proc.stdout:
            f.write(line)
            f.flush()
            if "| stage " in line or line.startswith(("ldetok reproduce: threads", "Traceback")):
                print(f"[{name}] {line.rstrip()}", flush=True)
