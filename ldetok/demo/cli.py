"""``ldetok demo``: the command-line entry (light: torch and gradio load only when it runs)."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_demo_parser", "add_demo_arguments", "main"]

USAGE = """The l-DeTok demo: tokenizers side by side on clean and corrupted latents, in the browser.

  ldetok demo                 photos: runs/demo/cpu-photos{,-ae}; Fashion-MNIST: runs/main/cpu-fmnist{,-ae}
  ldetok demo --prepare       first train the two photo tokenizers (800 steps each, minutes)
  ldetok demo --tokenizer detok-BB-gamm3.0-m0.7.pth --tokenizer vitok-BB.pth
  ldetok demo --tokenizer "mine=runs/tok" --generator runs/gen --host 0.0.0.0 --port 7861
"""


def add_demo_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--tokenizer", action="append", default=None, metavar="PATH_OR_RUN",
                   help="a tokenizer to compare (repeatable): a run folder, an exported tokenizer folder, a released "
                        "l-DeTok .pth (detok-BB-gamm3.0-m0.7.pth, its -decoder_tuned twin, vitok-BB.pth) or MAR's "
                        "kl16.ckpt; LABEL=PATH names it. Default: the cpu-photos and cpu-fmnist runs")
    p.add_argument("--generator", default=None, metavar="RUN", help="a finished generator run: adds a sampling tab")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--prepare", action="store_true",
                   help="first train the photo tokenizers (presets cpu-photos and cpu-photos-ae) into --demo-dir")
    p.add_argument("--steps", type=int, default=800, help="training steps per tokenizer for --prepare")
    p.add_argument("--no-launch", action="store_true", help="with --prepare: train, then exit")
    p.add_argument("--check", action="store_true", help="load everything, report what is missing, do not serve")
    p.add_argument("--demo-dir", default="runs/demo", help="where --prepare writes (and the demo reads) the photo runs")
    p.add_argument("--main-dir", default="runs/main", help="where `make run` wrote the Fashion-MNIST runs")
    p.add_argument("--max-side", type=int, default=1024, help="larger inputs are resized to this (with a notice)")
    return p


def _run(args) -> int:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from .app import launch

    return launch(args)


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` sub-command to the ``ldetok`` parser's subparsers (sets ``fn``)."""
    p = subparsers.add_parser("demo", help="the Gradio demo: tokenizers side by side under corrupted latents",
                              description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_arguments(p)
    p.set_defaults(fn=_run)
    return p


def main(argv=None) -> int:
    """``python -m ldetok.demo [options]`` (the same options as ``ldetok demo``)."""
    p = argparse.ArgumentParser(prog="python -m ldetok.demo", description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_demo_arguments(p).parse_args(argv)
    from .core import DemoError

    try:
        return _run(args)
    except (DemoError, FileNotFoundError, ValueError) as e:
        print(f"ldetok demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
