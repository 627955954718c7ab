"""The ``ldetok`` command line.

  ldetok train-tokenizer --preset cpu-fmnist --out runs/tok [key=value ...]
  ldetok eval-tokenizer runs/tok --n 500 [--noise 0.3,0.5,0.7]
  ldetok cache runs/tok --flip --num-workers 8   (the latent cache; also under torchrun, every rank encoding)
  ldetok train-generator --preset cpu-fmnist --tokenizer runs/tok --out runs/gen model=sit_tiny
  ldetok sample runs/gen --n 64 --cfg 1.5 --out samples/
  ldetok presets
  ldetok reproduce --preset cpu-quick --out runs/repro   (the corruption ablation end to end)
  ldetok main --out runs/main          (the job behind `make run`: reproduce cpu-main + figures + table)
  ldetok weights list                  (every named weight file: where it is, present or not; no network)
  ldetok weights download released:detok_BB vgg16   (into the standard caches: torch hub, Hugging Face)

Every config field can be overridden as ``path=value`` (``corruption.gamma=1``, ``optim.max_steps=200``) or by
its name alone where unique (``gamma=1``); unknown keys and badly typed values are refused
before any work starts. Multi-GPU: ``torchrun --nproc_per_node 8 -m ldetok.cli train-tokenizer ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _setup_env() -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


# ------------------------------------------------------------------ flag values, checked before any work
def _numbers(flag: str, text: str, kind=float, lo=None, hi=None) -> list:
    """A comma-separated flag value as numbers of ``kind``, each in [lo, hi]; a bad one names the flag."""
    what = "integers" if kind is int else "numbers"
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated {what}, e.g. "
                         f"{'0,1,2' if kind is int else '0.3,0.5'}") from None
    for v in values:
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f"in [{lo}, {hi}]" if lo is not None and hi is not None else \
                (f">= {lo}" if lo is not None else f"<= {hi}")
            raise ValueError(f"{flag} {text!r}: every value must be {bounds}, got {v}")
    return values


def _at_least(flag: str, value, lo) -> None:
    if value is not None and value < lo:
        raise ValueError(f"{flag} must be >= {lo}, got {value}")


def _tokenizer_run(path) -> None:
    """Refuse a ``--tokenizer`` / tokenizer run argument that is no finished tokenizer run or export, with
    what it is instead (missing, empty, unfinished with its last step, another kind of run)."""
    from .runs import tokenizer_dir

    if path:
        tokenizer_dir(path)


def _device(device: str) -> None:
    from .engine.common import check_device

    check_device(device)


def cmd_presets(args) -> int:
    from .config import GENERATOR_PRESETS, TOKENIZER_PRESETS

    print("tokenizer presets (ldetok train-tokenizer --preset NAME):")
    for name, p in sorted(TOKENIZER_PRESETS.items()):
        length = f"{p['epochs']} epochs" if p.get("epochs") else f"{p.get('max_steps')} steps"
        print(f"  {name:40s} {p.get('model', ''):10s} {p.get('dataset', ''):14s} gamma={p.get('gamma')} "
              f"M={p.get('max_mask_ratio')} {length}")
    print("generator presets (ldetok train-generator --preset NAME --tokenizer RUN model=...):")
    for name, p in sorted(GENERATOR_PRESETS.items()):
        length = f"{p['epochs']} epochs" if p.get("epochs") else f"{p.get('max_steps')} steps"
        print(f"  {name:40s} {p.get('model') or '(model=...)':12s} batch {p['batch_size']:5d} lr {p['lr']:.0e} "
              f"({p['schedule']}) {length}")
    from .config import REPRODUCE_PRESETS, resolve_reproduce_config

    print("reproduce presets (ldetok reproduce --preset NAME --out DIR):")
    for name in REPRODUCE_PRESETS:
        r = resolve_reproduce_config(name)
        budgets = ", ".join(f"{a}/{b}" if a else "preset" for a, b in r.budgets)
        print(f"  {name:24s} tokenizers {r.tokenizer_preset}[{','.join(r.variants)}]  generators "
              f"{','.join(r.generators)}  seeds {','.join(map(str, r.seeds))}  steps tok/gen {budgets}  "
              f"n {r.n_eval} ({','.join(r.features)})")
    return 0


def cmd_train_tokenizer(args) -> int:
    from .config import TokenizerTrainConfig, parse_overrides, resolve_tokenizer_config
    from .data import check_dataset_splits
    from .engine.tokenizer_trainer import train_tokenizer

    cfg = resolve_tokenizer_config(args.preset, parse_overrides(TokenizerTrainConfig, args.overrides))
    _device(cfg.run.device)
    check_dataset_splits(cfg.data.dataset, cfg.data.data_root, ("train", cfg.data.eval_split), "eval_split")
    summary = train_tokenizer(cfg, args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {args.out} at step {summary['step']}")
    return 0


def cmd_eval_tokenizer(args) -> int:
    from .data import check_dataset_splits
    from .eval.tokenizer import evaluate_tokenizer_run

    from .runs import run_train_config

    levels = _numbers("--noise", args.noise, float, 0.0, 1.0) if args.noise else []
    _at_least("--n", args.n, 1)
    _at_least("--batch-size", args.batch_size, 1)
    if args.gamma is not None and args.gamma < 0:
        raise ValueError(f"--gamma must be >= 0, got {args.gamma}")
    _device(args.device)
    _tokenizer_run(args.run_dir)
    data = run_train_config(args.run_dir).data
    check_dataset_splits(data.dataset, data.data_root, (args.split or data.eval_split,), "--split")
    evaluate_tokenizer_run(args.run_dir, n=args.n, noise_levels=levels, gamma=args.gamma,
                           rfid=not args.no_rfid, batch_size=args.batch_size, device=args.device,
                           split=args.split)
    return 0


def cmd_train_generator(args) -> int:
    from .config import GeneratorTrainConfig, parse_overrides, resolve_generator_config
    from .engine.generator_trainer import train_generator

    overrides = parse_overrides(GeneratorTrainConfig, args.overrides)
    if args.tokenizer:
        overrides["tokenizer"] = args.tokenizer
    cfg = resolve_generator_config(args.preset, overrides)
    _device(cfg.run.device)
    _tokenizer_run(cfg.tokenizer)
    summary = train_generator(cfg, args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {args.out} at step {summary['step']}")
    return 0


def cmd_cache(args) -> int:
    from .engine.distributed import cleanup, init_distributed, is_distributed
    from .latents import build_latent_cache

    _at_least("--limit", args.limit, 1)
    _at_least("--batch-size", args.batch_size, 1)
    _at_least("--shard-size", args.shard_size, 1)
    _at_least("--num-workers", args.num_workers, 0)
    _device(args.device)
    _tokenizer_run(args.tokenizer_run)
    owns_group = not is_distributed()
    info = init_distributed(args.device, timeout_min=args.dist_timeout_min)
    try:
        cache = build_latent_cache(args.tokenizer_run, dataset_name=args.dataset, split=args.split, flip=args.flip,
                                   out_dir=args.out, batch_size=args.batch_size, device=info.device,
                                   data_root=args.data_root, limit=args.limit, shard_size=args.shard_size,
                                   num_workers=args.num_workers, verbose=info.is_main)
    finally:
        if owns_group:
            cleanup()
    if info.is_main:
        print(f"done: {cache.dir} ({len(cache)} items)")
    return 0


def cmd_sample(args) -> int:
    from .runs import generator_meta
    from .sampling import sample_run

    _at_least("--n", args.n, 1)
    _at_least("--batch-size", args.batch_size, 1)
    _at_least("--steps", args.steps, 1)
    _at_least("--seed", args.seed, 0)
    _at_least("--cfg", args.cfg, 0.0)
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    _device(args.device)
    num_classes = int(generator_meta(args.run_dir).get("num_classes") or 0)  # names what the folder is, if not a run
    labels = _numbers("--labels", args.labels, int, 0) if args.labels else None
    if labels is not None and not num_classes:
        raise ValueError(f"--labels: {args.run_dir} is an unconditional generator (it has no classes)")
    if labels is not None and max(labels) >= num_classes:
        raise ValueError(f"--labels {args.labels!r}: {args.run_dir} has {num_classes} classes, so labels must be in "
                         f"0 .. {num_classes - 1}; got {max(labels)}")
    sample_run(args.run_dir, n=args.n, guidance_scale=args.cfg, steps=args.steps, temperature=args.temperature,
               out=args.out, seed=args.seed, batch_size=args.batch_size, device=args.device, labels=labels)
    return 0


def cmd_eval_generator(args) -> int:
    from .eval.generation import evaluate_generator_run

    sweep = _numbers("--cfg-sweep", args.cfg_sweep, float, 0.0) if args.cfg_sweep else None
    _at_least("--n", args.n, 1)
    _at_least("--n-search", args.n_search, 1)
    _at_least("--steps", args.steps, 1)
    _device(args.device)
    evaluate_generator_run(args.run_dir, n=args.n, guidance_scale=args.cfg, guidance_scales=sweep, n_search=args.n_search,
                           extractors=tuple(args.features.split(",")), sweep_extractor=args.sweep_features,
                           steps=args.steps, temperature=args.temperature, seed=args.seed,
                           batch_size=args.batch_size, device=args.device, png_dir=args.png_dir,
                           reference=args.reference or None, reference_root=args.reference_root)
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import reproduce

    seeds = _numbers("--seeds", args.seeds, int, 0) if args.seeds else None
    _device(args.device)
    variants = args.variants.split(",") if args.variants else None
    from .reproduce import parse_budgets

    from .config import GeneratorTrainConfig, TokenizerTrainConfig, parse_family_settings, parse_overrides

    budgets = parse_budgets(args.budgets) if args.budgets else None
    tok_over = parse_overrides(TokenizerTrainConfig, args.tok)  # checked before any work starts
    gen_over = parse_overrides(GeneratorTrainConfig, args.gen)
    families = {}
    for item in args.gen_for:
        if len(item) < 2:
            raise ValueError(f"--gen-for {' '.join(item)}: expected a family (or generator name) and KEY=VALUE settings, "
                             "e.g. --gen-for mar num_iter_final=256")
        families.setdefault(item[0], {}).update(parse_family_settings(item[1:]))
    if args.jobs is not None and not (args.collect or args.dry_run):
        _reproduce_side_by_side(args, variants)
    reproduce(args.preset, args.out, seeds=seeds, variants=variants, device=args.device, figures_dir=args.figures,
              budgets=budgets, tok_overrides=tok_over, gen_overrides=gen_over, decoder_ft_steps=args.decoder_ft,
              guidance_scales=_numbers("--cfg-search", args.cfg_search, float, 0.0) if args.cfg_search else None,
              n_search=args.n_search, families=families, reference=args.reference or None, dry_run=args.dry_run,
              collect=args.collect)
    return 0


def _reproduce_side_by_side(args, variants) -> None:
    """``reproduce --jobs N``: the variants' pipelines in N processes first (``side_by_side``); the caller's
    own reproduce then finds every stage done and writes the results."""
    from .config import resolve_reproduce_config
    from .side_by_side import child_arguments, parallel_jobs, run_side_by_side

    P = resolve_reproduce_config(args.preset)
    variants = variants or list(P.variants)
    jobs = parallel_jobs(args.jobs, len(variants), args.device)
    if jobs > 1:
        # each child writes its partial results' figures aside; the caller draws the whole study's
        own = args.argv[args.argv.index("reproduce") + 1:]
        run_side_by_side(child_arguments(own, ("--jobs", "--variants", "--figures")) +
                         ["--figures", str(Path(args.out) / "logs" / "figures")],
                         variants, Path(args.out), P.features, jobs, args.device)


def cmd_study(args) -> int:
    from .study import cmd_study as run

    return run(args)


def cmd_main(args) -> int:
    from .main_job import run_main_job

    run_main_job(args.out, preset=args.preset, figures_dir=args.figures, device=args.device, jobs=args.jobs)
    return 0


def cmd_weights(args) -> int:
    from .weights import TABLE, describe, download

    if args.action == "list":
        print(f"{'name':32s} {'size':>10s}  {'here':5s} where")
        for e in TABLE.values():
            d = describe(e)
            size = f"{d['size'] / 2**20:.1f} MiB" if d["size"] is not None else "?"
            note = f"  [{d['note']}]" if d["note"] and not d["present"] else ""
            print(f"{d['name']:32s} {size:>10s}  {'yes' if d['present'] else 'no':5s} {d['path']}{note}")
        return 0
    if not args.names:
        raise ValueError("name the files to download (see `ldetok weights list`), e.g. released:detok_BB")
    for name in args.names:
        print(download(name, progress=not args.quiet))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldetok", description="Latent denoising tokenizers: train, evaluate, demo.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("presets", help="list the training presets")
    s.set_defaults(fn=cmd_presets)

    s = sub.add_parser("train-tokenizer", help="train (or resume, or extend) a tokenizer run")
    s.add_argument("--preset", default=None, help="a preset name (see `ldetok presets`)")
    s.add_argument("--out", required=True, help="the run folder (resumed automatically if it holds checkpoints)")
    s.add_argument("overrides", nargs="*",
                   help="config overrides, key=value: a dotted path (corruption.gamma=1, optim.max_steps=200) or a "
                        "unique field name (gamma=1, mask_low=0.7)")
    s.set_defaults(fn=cmd_train_tokenizer)

    s = sub.add_parser("eval-tokenizer", help="PSNR / SSIM / LPIPS / rFID of a tokenizer run")
    s.add_argument("run_dir")
    s.add_argument("--n", type=int, default=500, help="number of evaluation images (the first n)")
    s.add_argument("--noise", default="", help="also evaluate latents corrupted at these t, e.g. 0.3,0.5,0.7")
    s.add_argument("--gamma", type=float, default=None,
                   help="noise scale for --noise (default: the run's own γ; 3, the paper's, for a run trained without noise)")
    s.add_argument("--split", default=None, help="dataset split (default: the run's eval split)")
    s.add_argument("--batch-size", type=int, default=100)
    s.add_argument("--device", default="auto")
    s.add_argument("--no-rfid", action="store_true", help="skip rFID (Inception features are slow on a CPU)")
    s.set_defaults(fn=cmd_eval_tokenizer)

    s = sub.add_parser("train-generator", help="train (or resume, or extend) a generator on tokenizer latents")
    s.add_argument("--preset", default=None, help="a generator preset (see `ldetok presets`)")
    s.add_argument("--tokenizer", default=None, help="the tokenizer run folder")
    s.add_argument("--out", required=True)
    s.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. model=sit_tiny)")
    s.set_defaults(fn=cmd_train_generator)

    s = sub.add_parser("cache", help="encode a dataset into a tokenizer run's latent cache (sharded, resumable; "
                                     "under torchrun every rank encodes)")
    s.add_argument("tokenizer_run", help="the tokenizer run (or exported tokenizer) folder")
    s.add_argument("--flip", action="store_true", help="also encode the horizontally flipped images")
    s.add_argument("--split", default="train")
    s.add_argument("--dataset", default=None, help="the dataset (default: the tokenizer run's)")
    s.add_argument("--data-root", default=None, help="the dataset folder (default: the tokenizer run's)")
    s.add_argument("--out", default=None, help="the cache folder (default: latents/<dataset>_<split>[_flip] in the run)")
    s.add_argument("--limit", type=int, default=None, help="encode only the first N items")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--shard-size", type=int, default=None,
                   help="items per shard, the unit of work and of resumption (default 4096)")
    s.add_argument("--num-workers", type=int, default=4, help="DataLoader worker processes per rank")
    s.add_argument("--device", default="auto")
    s.add_argument("--dist-timeout-min", type=float, default=None,
                   help="minutes a collective waits for the slowest rank under torchrun (default 240)")
    s.set_defaults(fn=cmd_cache)

    s = sub.add_parser("sample", help="sample images from a generator run (a PNG grid and the PNGs)")
    s.add_argument("run_dir")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--cfg", type=float, default=1.0)
    s.add_argument("--steps", type=int, default=None, help="sampling steps (family default when omitted)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--labels", default="", help="comma-separated class labels (default: class-balanced)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=100)
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("eval-generator", help="gFID / IS / KID / precision-recall (+ classifier-space FD) of a generator run")
    s.add_argument("run_dir")
    s.add_argument("--n", type=int, default=1000, help="samples for the final evaluation (class-balanced)")
    s.add_argument("--cfg", type=float, default=1.0)
    s.add_argument("--cfg-sweep", default="", help="choose cfg first among these, e.g. 1.0,1.5,2.0")
    s.add_argument("--n-search", type=int, default=None, help="samples per cfg in the sweep")
    s.add_argument("--features", default="inception,classifier", help="feature spaces: inception, classifier")
    s.add_argument("--sweep-features", default="inception")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=100)
    s.add_argument("--device", default="auto")
    s.add_argument("--png-dir", default=None, help="also write the samples as PNG here")
    s.add_argument("--reference", default="", metavar="SPEC",
                   help="the real images: DATASET:SPLIT (whole split) or DATASET:SPLIT:N (N spread evenly), "
                        "released:adm_in256_stats (the paper's protocol) or released:adm_in256_ref_batch, an .npz "
                        "(ADM mu/sigma or arr_0 images), or a folder of images (default: the tokenizer's dataset, "
                        "train split, --n images spread evenly)")
    s.add_argument("--reference-root", default=None,
                   help="data folder of a DATASET:SPLIT reference (default: the tokenizer run's data_root)")
    s.set_defaults(fn=cmd_eval_generator)

    from .config import REPRODUCE_PRESETS

    s = sub.add_parser("reproduce", help="the corruption ablation end to end (tokenizers, generators, metrics)")
    s.add_argument("--preset", required=True, help="a reproduce preset (`ldetok presets` lists them): "
                   + ", ".join(REPRODUCE_PRESETS))
    s.add_argument("--out", required=True)
    s.add_argument("--seeds", default="", help="override the preset's seeds, e.g. 0,1,2")
    s.add_argument("--variants", default="", help="override the variants: ae,mask,noise,detok")
    s.add_argument("--budgets", default="", help="override the budgets, TOKENIZER:GENERATOR steps, e.g. 500:750,1000:1500")
    s.add_argument("--decoder-ft", type=int, default=None, metavar="STEPS",
                   help="decoder fine-tuning steps after each tokenizer (default: the preset's; 0: none)")
    s.add_argument("--cfg-search", default="", help="CFG scales to search before the final evaluation, e.g. 1,1.5,2")
    s.add_argument("--n-search", type=int, default=None, help="samples per scale in the CFG search")
    s.add_argument("--tok", action="append", default=[], metavar="KEY=VALUE",
                   help="a tokenizer config override for every variant, e.g. --tok data_root=/data/imagenet (repeatable)")
    s.add_argument("--gen", action="append", default=[], metavar="KEY=VALUE",
                   help="a generator config override, e.g. --gen batch_size=256 (repeatable)")
    s.add_argument("--gen-for", nargs="+", action="append", default=[], metavar="FAMILY KEY=VALUE",
                   help="settings for one generator family (or name) only: sampling (guidance_scale|cfg, "
                        "guidance_scales|cfg_list, n_search, search_steps|num_iter_search, final_steps|num_iter_final, "
                        "temperature) or generator config overrides, e.g. --gen-for mar num_iter_final=256 "
                        "'model_args={\"diffloss_d\": 3}'")
    s.add_argument("--reference", default="", help="gFID reference: an ADM .npz, released:adm_in256_stats, "
                   "DATASET:SPLIT[:N] or an image folder (default: the preset's)")
    s.add_argument("--collect", action="store_true",
                   help="write results.* from the finished stages only (e.g. while other processes still run); "
                        "start nothing, list what is not finished")
    s.add_argument("--jobs", type=int, default=None,
                   help="variant pipelines side by side, each in its own process at CPUs/N threads (logs in "
                        "OUT/logs/); default: one process")
    s.add_argument("--dry-run", action="store_true", help="print every protocol value per variant and family, run nothing")
    s.add_argument("--device", default="auto")
    s.add_argument("--figures", default="figures")
    s.set_defaults(fn=cmd_reproduce)

    s = sub.add_parser("main", help="the main job behind `make run`: reproduce --preset cpu-main, figures, table")
    s.add_argument("--out", default="runs/main")
    s.add_argument("--preset", default=None, help="the reproduce preset (default cpu-main: AE against the setting "
                   "confirmed at this scale; cpu-quick: against the paper's γ=3/M=0.7; tiny for a smoke run)")
    s.add_argument("--figures", default="figures")
    s.add_argument("--device", default="auto")
    s.add_argument("--jobs", type=int, default=None,
                   help="variant pipelines side by side, each in its own process (default: one per variant up to "
                        "the CPUs on a CPU run, the CPUs shared among them; 1 on a GPU)")
    s.set_defaults(fn=cmd_main)

    s = sub.add_parser("weights", help="the named weight files: list them, download them into the standard caches")
    s.add_argument("action", choices=("list", "download"))
    s.add_argument("names", nargs="*", help="for download: names from `ldetok weights list` (vgg16, released:mar_base, ...)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_weights)

    s = sub.add_parser("study", help="the γ x M study: heatmaps and ranking (map), held-out comparison (confirm), "
                                      "the four-variant table (ablation), generator capacity (capacity), one lever at a time (compare)")
    s.add_argument("action", choices=("map", "confirm", "ablation", "capacity", "compare"))
    s.add_argument("sources", nargs="+", help="reproduce output folders or results CSVs; compare: SOURCE:VARIANT[=LABEL] "
                                              "each, the first the reference (e.g. runs/study/effnet:mask=mask+effnet)")
    s.add_argument("--out", required=True, help="folder for NAME.png/.csv/.md (e.g. figures/study)")
    s.add_argument("--budget", default=None, help="only this TOKENIZER:GENERATOR budget, e.g. 1000:1500")
    s.add_argument("--metric", default=None, help="map: the ranking's metric; confirm: one metric (default: four)")
    s.add_argument("--candidate", default=None, help="confirm: the chosen variant, e.g. mask or g0.5_m0; capacity: the "
                                                            "variant set against the baseline (default detok)")
    s.add_argument("--baseline", default="ae", help="confirm: the baseline variant (default ae: γ=0, M=0)")
    s.add_argument("--name", default=None, help="file stem (default: the action, e.g. map, confirm, compare)")
    s.set_defaults(fn=cmd_study)

    from .demo.cli import add_demo_parser  # light: torch and gradio load only when the demo runs

    add_demo_parser(sub)
    from .sweep import add_sweep_parser

    add_sweep_parser(sub)
    return p


# commands that compute nothing with torch (no thread count to set or report)
_NO_TORCH = ("presets", "weights", "study")


def main(argv=None) -> int:
    _setup_env()
    parser = build_parser()
    # key=value overrides may come before or after options (argparse stops a '*' positional at the
    # first option), so unknown key=value tokens are collected as overrides too.
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    if hasattr(args, "overrides"):
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command not in _NO_TORCH:
        from .engine.common import configure_threads

        line = configure_threads()
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ldetok {args.command}: {line}", flush=True)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, KeyError) as e:  # bad input, a wrong or damaged run folder (RunFolderError)
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e  # a KeyError's str() is its quoted repr
        print(f"ldetok {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .engine.trainer import NonFiniteTrainingError  # already loaded by the training command that raised it

        if not isinstance(e, NonFiniteTrainingError):
            raise
        print(f"ldetok {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
