"""The Gradio app: a thin client of ``ldetok.demo.core`` (all logic lives there, testable without a server).

``build_app(tokenizers, generator)`` returns the ``gr.Blocks``; ``launch(args)`` is ``ldetok demo``.
API endpoints (``gradio_client``): ``/load_photo``, ``/load_fmnist``, ``/load_upload`` (an input image
and its notice), ``/reconstruct`` (the gallery and the PSNR table), ``/sweep`` and ``/sample``.
Bad input comes back as a ``gr.Error`` with the core's message, never as a crash.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..corruption import NOISE
from ..data import bundled_photos
from . import core
from .core import CUSTOM_SET, FMNIST_SET, PHOTO_SET, DemoError, DemoGenerator, DemoTokenizer

__all__ = ["build_app", "serve", "launch", "resolve_tokenizer_sets", "CSS"]

log = logging.getLogger("ldetok.demo")

INTRO = (
    "Encode an image, corrupt the latents as the sliders say, decode. "
    "**Interpolative** noise: z' = (1 − t)·z + t·γ·ε; **additive**: z' = z + t·γ·ε; masking hides a random "
    "share of the tokens from the encoder and the decoder sees mask tokens there (l-DeTok, Yang et al., ICLR 2026). "
    "Each tokenizer runs at its own image size; outputs are shown at a common size (nearest-neighbour). "
    "PSNR is against the input at the tokenizer's size."
)
ALL_CLASSES = "all classes (balanced)"
# small inputs fill their box with visible pixels; thumbnails keep their pixels sharp
CSS = """
#input-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#recon img, #sweep img, #samples img { image-rendering: pixelated; }
#recon .grid-wrap, #sweep .grid-wrap { height: auto !important; min-height: 0 !important; max-height: none !important; }
"""


def resolve_tokenizer_sets(specs: Optional[Sequence[str]] = None, demo_dir="runs/demo",
                           main_dir="runs/main") -> Dict[str, List[DemoTokenizer]]:
    """``--tokenizer`` specs -> one set; none -> the default photo and Fashion-MNIST sets."""
    if specs:
        return {CUSTOM_SET: core.load_tokenizers(specs)}
    return {name: core.load_tokenizers(s) for name, s in core.default_tokenizer_sets(demo_dir, main_dir).items()}


class OutputFiles:
    """Every image a response carries, as a PNG file of its own (a unique name in a private temporary
    folder), written completely before Gradio sees it. Gradio caches an array it is handed under a name
    derived from its content and rewrites that file in place, so two requests with the same output
    would share a file one of them is still downloading; a file path is copied once and never rewritten.
    Files older than ``keep_s`` seconds are removed as new ones arrive, the folder when the process ends."""

    def __init__(self, keep_s: float = 900.0):
        self.dir = Path(tempfile.mkdtemp(prefix="ldetok-demo-"))
        self.keep_s = keep_s
        self._lock = threading.Lock()
        self._pruned = time.time()
        atexit.register(shutil.rmtree, self.dir, True)

    def png(self, array) -> str:
        path = self.dir / f"{uuid.uuid4().hex}.png"
        Image.fromarray(np.ascontiguousarray(array)).save(path)
        self._prune()
        return str(path)

    def gallery(self, items) -> list:
        return [(self.png(im), caption) for im, caption in items]

    def _prune(self) -> None:
        now = time.time()
        with self._lock:
            if now - self._pruned < 60:
                return
            self._pruned = now
        for f in self.dir.glob("*.png"):
            try:
                if now - f.stat().st_mtime > self.keep_s:
                    f.unlink()
            except OSError:  # removed meanwhile
                pass


def _status_markdown(sets: Dict[str, List[DemoTokenizer]], generator: Optional[DemoGenerator]) -> str:
    lines = []
    for name, entries in sets.items():
        for e in entries:
            if not e.ok:
                lines.append(f"- **{e.name}** ({name}): {e.error}")
    if generator is not None and not generator.ok:
        lines.append(f"- **generator**: {generator.error}")
    return ("**Not available yet:**\n" + "\n".join(lines)) if lines else ""


def _describe(img: core.InputImage) -> str:
    h, w = img.pixels.shape[:2]
    text = f"**{img.name}**, {w}x{h}"
    if img.notices:
        text += "  \n" + "  \n".join(f"note: {n}" for n in img.notices)
    return text


def _gr_error(e: Exception):
    import gradio as gr

    if isinstance(e, DemoError):
        return gr.Error(str(e))
    log.exception("demo handler failed")  # the details (and any server path) stay in the server's log
    return gr.Error(f"internal error ({type(e).__name__}); the input was left as it was")


def build_app(tokenizers: Union[Dict[str, List[DemoTokenizer]], Sequence[DemoTokenizer], None] = None,
              generator: Optional[DemoGenerator] = None, *, default_set: Optional[str] = None,
              max_side: int = core.MAX_INPUT_SIDE, display: Optional[int] = None, fmnist_count: int = 100,
              initial_photo: str = "chelsea", title: str = "l-DeTok demo", concurrency: int = 2):
    """The Gradio app. ``tokenizers``: set name -> loaded entries (``resolve_tokenizer_sets``), or a flat
    list (one set); entries that failed to load are listed with the command that makes them.
    ``generator``: a ``DemoGenerator`` for the sampling tab. The app is queued (``concurrency`` jobs at a
    time per event, 2 by default so that two requests use two cores; at most 64 waiting) and sends no
    analytics. Handlers share no mutable state but the clean-pass cache (locked) and run under no_grad;
    images travel as files of their own (``OutputFiles``)."""
    if concurrency < 1:
        raise DemoError(f"concurrency must be >= 1, got {concurrency}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    if tokenizers is None:
        tokenizers = resolve_tokenizer_sets()
    sets = dict(tokenizers) if isinstance(tokenizers, dict) else {CUSTOM_SET: list(tokenizers)}
    if not sets:
        sets = {CUSTOM_SET: []}
    if default_set is None:
        default_set = next((n for n, es in sets.items() if any(e.ok for e in es)), next(iter(sets)))
    if default_set not in sets:
        raise DemoError(f"default_set {default_set!r} is not one of {list(sets)}")
    start = core.default_corruption(sets[default_set])  # the sliders start at the run's own settings
    photo_names = list(bundled_photos())
    fm_choices, fm_missing = core.fashion_mnist_choices(fmnist_count)
    # the first input: a Fashion-MNIST image for the Fashion-MNIST set, a bundled photo otherwise
    first_photo = first_fm = None
    if default_set == FMNIST_SET and fm_choices:
        first_fm = fm_choices[0]
        first = core.fashion_mnist_image(first_fm)
    else:
        first_photo = initial_photo if initial_photo in photo_names else photo_names[0]
        first = core.bundled_photo(first_photo, max_side)

    out = OutputFiles()

    def entries(set_name):
        if set_name not in sets:
            raise DemoError(f"unknown tokenizer set {set_name!r}; choose one of {', '.join(sets)}")
        return sets[set_name]

    # ---- handlers: core calls, DemoError -> gr.Error ------------------------------------------
    def _loaded(img: core.InputImage, prefer: Optional[str], current: str):
        target = prefer if prefer in sets and any(e.ok for e in sets[prefer]) else current
        return out.png(img.pixels), _describe(img), gr.update(value=target)

    def load_photo(name, current_set):
        try:
            return _loaded(core.bundled_photo(name, max_side), PHOTO_SET, current_set)
        except Exception as e:  # noqa: BLE001 - every failure becomes a message
            raise _gr_error(e) from None

    def load_fmnist(choice, current_set):
        try:
            return _loaded(core.fashion_mnist_image(choice), FMNIST_SET, current_set)
        except Exception as e:  # noqa: BLE001
            raise _gr_error(e) from None

    def load_upload(path, current_set):
        try:
            if not path:
                raise DemoError("no file was uploaded")
            return _loaded(core.read_image(path, max_side), None, current_set)
        except Exception as e:  # noqa: BLE001
            raise _gr_error(e) from None

    def reconstruct(image, set_name, t, gamma, mask_ratio, noise_type, seed):
        try:
            img = core.prepare_image(image, max_side)
            items, table = core.compare_tokenizers(entries(set_name), img, t, gamma, mask_ratio, noise_type, seed,
                                                   display=display)
            return out.gallery(items), table
        except Exception as e:  # noqa: BLE001
            raise _gr_error(e) from None

    def sweep(image, set_name, gamma, noise_type, seed):
        try:
            return out.gallery(core.sweep_gallery(entries(set_name), core.prepare_image(image, max_side), gamma,
                                                  noise_type, seed))
        except Exception as e:  # noqa: BLE001
            raise _gr_error(e) from None

    def sample(class_choice, cfg, steps, seed, n):
        try:
            if generator is None:
                raise DemoError("no generator run was given (ldetok demo --generator RUN)")
            cls = None
            if class_choice not in (None, ALL_CLASSES):
                if class_choice not in generator.class_names:
                    raise DemoError(f"unknown class {class_choice!r}; choose one of {', '.join(generator.class_names)}")
                cls = generator.class_names.index(class_choice)
            return out.png(core.sample_grid(generator, cls, cfg, int(steps) or None, seed, int(n)))
        except Exception as e:  # noqa: BLE001
            raise _gr_error(e) from None

    # ---- layout ---------------------------------------------------------------------------------
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\n{INTRO}")
        status = _status_markdown(sets, generator)
        gr.Markdown(status, visible=bool(status), elem_id="status")
        with gr.Tabs():
            with gr.Tab("Tokenizers"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=260):
                        photo = gr.Dropdown(photo_names, value=first_photo, label="a bundled photo (scikit-image, "
                                            "scikit-learn, matplotlib)", elem_id="photo")
                        fmnist = gr.Dropdown(fm_choices, value=first_fm, label="a Fashion-MNIST test image",
                                             elem_id="fmnist", interactive=bool(fm_choices),
                                             info=None if fm_choices else f"not installed: {fm_missing}")
                        upload = gr.File(label="or upload an image", type="filepath", height=120, elem_id="upload")
                        image = gr.Image(value=first.pixels, type="numpy", image_mode="RGB", format="png",
                                         label="input", interactive=False, height=220, elem_id="input-image")
                        notice = gr.Markdown(_describe(first), elem_id="input-notice")
                    with gr.Column(scale=3):
                        set_radio = gr.Radio(list(sets), value=default_set, label="tokenizers",
                                             visible=len(sets) > 1, elem_id="tokenizer-set")
                        with gr.Row():
                            t = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="noise level t", elem_id="t")
                            gamma = gr.Slider(0.0, 6.0, value=start.gamma, step=0.5, label="γ (noise scale)",
                                              elem_id="gamma")
                            mask = gr.Slider(0.0, 0.9, value=0.0, step=0.05, label="mask ratio", elem_id="mask")
                        with gr.Row():
                            noise_type = gr.Radio(list(NOISE), value=start.noise_type,
                                                  label="noise type", elem_id="noise-type")
                            seed = gr.Number(18, precision=0, label="seed", elem_id="seed")
                        gallery = gr.Gallery(label="input at the tokenizer's size | clean | corrupted | latents | "
                                             "corrupted latents", columns=5, format="png", object_fit="contain",
                                             elem_id="recon")
                        table = gr.Markdown(elem_id="psnr")
                with gr.Accordion("Sweeps: t = 0 … 0.9 and mask ratio 0 … 0.9 (as the official demo)", open=False):
                    sweep_btn = gr.Button("run the sweeps", elem_id="sweep-button")
                    sweep_gal = gr.Gallery(columns=len(core.SWEEP_VALUES), format="png", object_fit="contain",
                                           label="per tokenizer: a noise row, then a mask row",
                                           elem_id="sweep")
            if generator is not None:
                with gr.Tab("Generator"):
                    if generator.ok:
                        tc = generator.meta.get("train_config", {}) or {}
                        gr.Markdown(f"**{generator.name}** from `{generator.source}` "
                                    f"({generator.gen.num_params() / 1e6:.2f}M parameters)")
                        with gr.Row():
                            cls = gr.Dropdown([ALL_CLASSES] + generator.class_names, value=ALL_CLASSES,
                                              label="class", elem_id="gen-class")
                            cfg = gr.Slider(1.0, 8.0, value=float(tc.get("sample_cfg") or 1.5), step=0.1,
                                            label="cfg", elem_id="gen-cfg")
                            steps = gr.Slider(0, 250, value=int(tc.get("sample_steps") or 0), step=1,
                                              label="steps (0: the family's default)", elem_id="gen-steps")
                            gseed = gr.Number(0, precision=0, label="seed", elem_id="gen-seed")
                            n = gr.Slider(1, 64, value=16, step=1, label="samples", elem_id="gen-n")
                        sample_btn = gr.Button("sample", elem_id="sample-button")
                        grid = gr.Image(type="numpy", format="png", label="samples", interactive=False,
                                        elem_id="samples")
                        sample_btn.click(sample, [cls, cfg, steps, gseed, n], grid, api_name="sample")
                    else:
                        gr.Markdown(f"**No generator:** {generator.error}")

        # ---- events ---------------------------------------------------------------------------
        render_inputs = [image, set_radio, t, gamma, mask, noise_type, seed]
        render_kw = dict(fn=reconstruct, inputs=render_inputs, outputs=[gallery, table])
        # registered first, so that the public endpoint gets the plain name "/reconstruct"
        t.change(**render_kw, trigger_mode="always_last", show_progress="hidden", api_name="reconstruct")
        for src, fn, api in ((photo, load_photo, "load_photo"), (fmnist, load_fmnist, "load_fmnist")):
            src.input(fn, [src, set_radio], [image, notice, set_radio], api_name=api).success(
                **render_kw, show_progress="hidden", api_visibility="private")
        upload.upload(load_upload, [upload, set_radio], [image, notice, set_radio], api_name="load_upload").success(
            **render_kw, show_progress="hidden", api_visibility="private")
        for ctl in (gamma, mask, seed):
            ctl.change(**render_kw, trigger_mode="always_last", show_progress="hidden", api_visibility="private")
        for ctl in (noise_type, set_radio):
            ctl.input(**render_kw, trigger_mode="always_last", show_progress="hidden", api_visibility="private")
        app.load(**render_kw, api_visibility="private")
        sweep_btn.click(sweep, [image, set_radio, gamma, noise_type, seed], sweep_gal, api_name="sweep")
    app.queue(default_concurrency_limit=concurrency, max_size=64)
    return app


def launch(args) -> int:
    """``ldetok demo``: optionally train the photo tokenizers, load everything, report what is missing
    on the command line, then serve (127.0.0.1 unless ``--host`` says otherwise)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    if args.prepare:
        core.prepare_demo_tokenizers(args.demo_dir, args.steps)
        if args.no_launch:
            return 0
    sets = resolve_tokenizer_sets(args.tokenizer, args.demo_dir, args.main_dir)
    generator = core.load_generator(args.generator) if args.generator else None
    problems = [e for es in sets.values() for e in es if not e.ok]
    for e in problems:
        print(f"ldetok demo: {e.name}: {e.error}", file=sys.stderr)
    if generator is not None and not generator.ok:
        print(f"ldetok demo: generator: {generator.error}", file=sys.stderr)
    ready = sum(e.ok for es in sets.values() for e in es)
    if args.check:
        print(f"ldetok demo: {ready} tokenizer(s) ready, {len(problems)} missing")
        return 0 if not problems and (generator is None or generator.ok) else 2
    if not ready:
        print("ldetok demo: no tokenizer is available yet; the app starts and says how to make one", file=sys.stderr)
    app = build_app(sets, generator, max_side=args.max_side)
    serve(app, args.host, args.port, prevent_thread_lock=getattr(args, "prevent_thread_lock", False))
    return 0


def serve(app, host: str = "127.0.0.1", port: Optional[int] = 7860, **kwargs):
    """``app.launch`` with the demo's settings: loopback unless told otherwise, errors shown in the UI,
    no browser opened, uploads up to 64 MB, the demo's CSS. Extra keywords go to ``launch``."""
    kwargs = {"show_error": True, "inbrowser": False, "css": CSS, "max_file_size": "64mb", **kwargs}
    return app.launch(server_name=host, server_port=port, **kwargs)
