"""The Gradio demo: tokenizers side by side on clean and corrupted latents, the official demo's sweeps,
and sampling from a generator run.

- ``ldetok.demo.images``: input images (files of any kind, arrays, the bundled photos, Fashion-MNIST);
- ``ldetok.demo.core``: the logic as plain functions (no gradio): ``load_tokenizers``,
  ``corrupt_and_decode``, ``latent_pca_image``, ``compare_tokenizers``, ``sweep_gallery``,
  ``prepare_demo_tokenizers``, ``read_image`` / ``prepare_image``, ``load_generator``, ``sample_grid``;
- ``ldetok.demo.app``: ``build_app(...) -> gr.Blocks`` and ``launch(args)``;
- ``ldetok.demo.cli``: ``add_demo_parser(subparsers)`` (the ``ldetok demo`` sub-command) and ``main(argv)``
  (``python -m ldetok.demo``).

Names are imported lazily, so ``import ldetok.demo`` costs nothing until one is used.
"""

from __future__ import annotations

import importlib

_CORE = ("DemoError", "InputImage", "TokenizerSpec", "DemoTokenizer", "Reconstruction", "DemoGenerator",
         "read_image", "prepare_image", "load_tokenizer_spec", "load_tokenizers", "default_tokenizer_sets",
         "corrupt_and_decode", "latent_pca_basis", "latent_pca_image", "compare_tokenizers", "sweep_gallery",
         "prepare_demo_tokenizers", "load_generator", "sample_grid", "psnr")
_APP = ("build_app", "launch", "resolve_tokenizer_sets")
_CLI = ("add_demo_parser", "main")

__all__ = list(_CORE + _APP + _CLI)


def __getattr__(name):
    for module, names in (("core", _CORE), ("app", _APP), ("cli", _CLI)):
        if name in names:
            return getattr(importlib.import_module(f".{module}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
