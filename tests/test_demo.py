"""The Gradio demo: its plain functions, and the app served on loopback and called with gradio_client.

Tokenizers and the generator are tiny untrained models the tests build and save themselves (with latent
statistics, so they are complete exports); nothing here trains.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require_module
from ldetok import corruption as C
from ldetok.corruption import CorruptionConfig, CorruptionDraw, denoising_forward
from ldetok.demo import core
from ldetok.demo.core import DemoError

# ------------------------------------------------------------------ fixtures


def _save_tiny(directory, seed, corruption=None, legacy=False, **overrides):
    """An export as the trainer writes it (its corruption settings in ``corruption``), or, with ``legacy``,
    as exports were written when the model config held them."""
    from ldetok.runs import save_tokenizer
    from ldetok.tokenizers import build

    torch.manual_seed(seed)
    tok = build("detok_MM", **overrides)
    tok.set_latent_stats(0.0, 1.0)
    if not legacy:
        return save_tokenizer(tok, directory, extra=None if corruption is None else {"corruption": corruption.to_dict()})
    d = save_tokenizer(tok, directory)
    meta = json.loads((d / "tokenizer.json").read_text())
    meta["config"].update(corruption.to_dict())
    (d / "tokenizer.json").write_text(json.dumps(meta))
    return d


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_toks")
    return {
        # a run-folder layout
        "detok": _save_tiny(root / "detok" / "tokenizer", 0, CorruptionConfig(gamma=3.0, max_mask_ratio=0.7)),
        "ae": _save_tiny(root / "ae", 1, CorruptionConfig.off(), legacy=True),
        "big": _save_tiny(root / "big", 2, image_size=64, patch_size=16),  # another size: 64 px, 4x4 tokens
    }


@pytest.fixture(scope="module")
def toks(tiny_dirs):
    return core.load_tokenizers([str(tiny_dirs["detok"].parent), "AE=" + str(tiny_dirs["ae"])])


@pytest.fixture(scope="module")
def photo():
    return core.bundled_photo("chelsea")


def _png(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return str(path)


# ------------------------------------------------------------------ tokenizers and corruption


def test_load_tokenizers_names_and_sizes(toks, tiny_dirs):
    assert [e.ok for e in toks] == [True, True]
    assert toks[0].name == "detok (γ=3, M=0.7)"  # label from the run folder and its config
    assert toks[1].name == "AE"  # LABEL=PATH
    assert toks[0].image_size == 32 and toks[0].channels == 3
    assert not any(p.requires_grad for p in toks[0].tok.parameters())
    # the corruption each was trained with: from the export's record, or a legacy export's model config
    assert toks[0].corruption == CorruptionConfig(gamma=3.0, max_mask_ratio=0.7)
    assert toks[1].corruption == CorruptionConfig.off()
    assert core.load_tokenizer_spec(str(tiny_dirs["ae"])).name == "ae (γ=0, M=0)"
    # the sliders start at the first tokenizer trained with noise, else at the paper's recipe
    assert core.default_corruption(toks[::-1]) == toks[0].corruption
    assert core.default_corruption(toks[1:]) == CorruptionConfig()


def test_fashion_mnist_set_is_what_the_main_job_links(tmp_path):
    """The default Fashion-MNIST set names the main job's tokenizers by their links (make run: the setting
    confirmed at this scale and the autoencoder), and the paper's γ=3/M=0.7 one only when it is there."""
    from ldetok.config import resolve_reproduce_config
    from ldetok.main_job import MAIN_PRESET, link_name

    assert resolve_reproduce_config(MAIN_PRESET).variants == ("ae", "g0.5_m0_add")
    main = tmp_path / "main"
    fm = core.default_tokenizer_sets(tmp_path / "demo", main)[core.FMNIST_SET]
    assert [(s.path, s.label) for s in fm] == [(str(main / "cpu-fmnist-g0.5_m0_add"), "l-DeTok (additive γ=0.5, M=0)"),
                                               (str(main / "cpu-fmnist-ae"), "AE (γ=0, M=0)")]
    (main / link_name("detok")).mkdir(parents=True)  # e.g. from ldetok main --preset cpu-quick
    fm = core.default_tokenizer_sets(tmp_path / "demo", main)[core.FMNIST_SET]
    assert [s.label for s in fm] == ["l-DeTok (additive γ=0.5, M=0)", "l-DeTok (γ=3, M=0.7)", "AE (γ=0, M=0)"]
    assert fm[1].path == str(main / "cpu-fmnist") and link_name("ae") == "cpu-fmnist-ae"


def test_missing_checkpoint_clear_error_naming_the_path(tmp_path):
    missing = tmp_path / "no" / "such-run"
    with pytest.raises(DemoError, match="no such tokenizer") as ei:
        core.load_tokenizer_spec(str(missing))
    assert str(missing) in str(ei.value)
    pth = tmp_path / "detok-BB-gamm3.0-m0.7.pth"
    with pytest.raises(DemoError, match=str(pth).replace(".", r"\.")):
        core.load_tokenizer_spec(str(pth))
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(DemoError, match="no finished tokenizer"):
        core.load_tokenizer_spec(str(tmp_path / "unfinished"))
    # load_tokenizers never raises: the entry carries the message and the command that makes one
    [entry] = core.load_tokenizers([core.TokenizerSpec(str(missing), "x", "ldetok demo --prepare")])
    assert not entry.ok and str(missing) in entry.error and "ldetok demo --prepare" in entry.error
    with pytest.raises(DemoError, match=str(missing)):
        core.corrupt_and_decode(entry, np.zeros((8, 8, 3), np.uint8))


def test_released_checkpoint_layout(tmp_path):
    """A .pth in the released layout ({"model", "model_ema"}, no statistics) loads through
    load_official_detok, at the size its name says (here the CPU size MM, to stay small)."""
    from ldetok.tokenizers import Tokenizer, build

    torch.manual_seed(0)
    state = {k: v for k, v in build("detok_MM").state_dict().items() if k not in Tokenizer.STATS_KEYS}
    for name, label, corruption in (
            ("detok-MM-gamm3.0-m0.7-decoder_tuned.pth", "l-DeTok MM decoder-tuned",
             CorruptionConfig(gamma=3.0, max_mask_ratio=0.7)),
            ("vitok-MM.pth", "ViTok MM (γ=0, M=0)", CorruptionConfig.off())):
        torch.save({"model": state, "model_ema": state}, tmp_path / name)
        entry = core.load_tokenizer_spec(str(tmp_path / name))
        assert entry.name == label and entry.image_size == 32 and entry.corruption == corruption
        assert core.corrupt_and_decode(entry, np.zeros((40, 40, 3), np.uint8)).clean.shape == (32, 32, 3)


def test_not_a_checkpoint_file(tmp_path):
    bad = tmp_path / "vitok-BB.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DemoError, match="could not be loaded"):
        core.load_tokenizer_spec(str(bad))


def test_psnr_at_t0_equals_clean_psnr(toks, photo):
    for e in toks:
        r = core.corrupt_and_decode(e, photo, t=0.0, gamma=3.0, mask_ratio=0.0, seed=5)
        assert r.psnr_corrupted == pytest.approx(r.psnr_clean, abs=1e-4)
        assert np.abs(r.corrupted.astype(int) - r.clean.astype(int)).max() <= 1
        assert r.input.shape == r.clean.shape == (32, 32, 3) and r.mask is None


def _denoising_pass(tok, x, t, gamma, mask_ratio, noise_type, seed):
    """The demo's settings as one denoising pass: a fixed draw, the posterior mean."""
    cfg = CorruptionConfig(noise_type=noise_type, gamma=gamma, max_mask_ratio=0.0)
    draw = CorruptionDraw(mask_ratio, torch.full((x.shape[0],), t))
    with torch.no_grad():
        return denoising_forward(tok, x, cfg, torch.Generator().manual_seed(seed), draw=draw, sample=False)


def test_unmasked_fast_path_equals_the_denoising_pass(toks, photo):
    """Without masking the demo noises the cached clean latents and runs only the decoder; the result
    must be the denoising pass's at the same draw (same ε from the seed, same values)."""
    tok = toks[0].tok
    x = core.to_model_input(photo.pixels, 32)
    for noise_type in ("interpolative", "additive"):
        r = core.corrupt_and_decode(toks[0], photo, t=0.6, gamma=3.0, mask_ratio=0.0, noise_type=noise_type, seed=7)
        ref = _denoising_pass(tok, x, 0.6, 3.0, 0.0, noise_type, 7)
        assert np.abs(r.corrupted.astype(int) - core._to_uint8(ref.recon).astype(int)).max() <= 1
        torch.testing.assert_close(r.z_corrupted, ref.latents[0], rtol=1e-5, atol=1e-5)


def test_masked_path_is_the_denoising_pass(toks, photo):
    tok = toks[0].tok
    x = core.to_model_input(photo.pixels, 32)
    r = core.corrupt_and_decode(toks[0], photo, t=0.3, gamma=3.0, mask_ratio=0.5, seed=4)
    ref = _denoising_pass(tok, x, 0.3, 3.0, 0.5, "interpolative", 4)
    assert np.array_equal(r.corrupted, core._to_uint8(ref.recon.clamp(-1, 1)))
    torch.testing.assert_close(r.z_corrupted, ref.latents[0], rtol=0, atol=0)
    assert torch.equal(r.mask.flatten(), ref.mask[0] > 0.5)


def test_a_registered_noise_type_is_offered(toks, photo, monkeypatch):
    """A noise type registered in ldetok.corruption.NOISE is usable from the demo."""
    monkeypatch.setitem(C.NOISE, "scaled", lambda z, t, gamma, generator=None, noise=None: z * (1 + t * gamma))
    r = core.corrupt_and_decode(toks[0], photo, t=0.5, gamma=1.0, mask_ratio=0.0, noise_type="scaled", seed=0)
    torch.testing.assert_close(r.z_corrupted, 1.5 * r.z_clean)


def test_corruption_changes_output_and_is_seeded(toks, photo):
    e = toks[0]
    clean = core.corrupt_and_decode(e, photo, t=0.0).clean
    a = core.corrupt_and_decode(e, photo, t=0.7, gamma=3.0, mask_ratio=0.5, seed=1)
    b = core.corrupt_and_decode(e, photo, t=0.7, gamma=3.0, mask_ratio=0.5, seed=1)
    c = core.corrupt_and_decode(e, photo, t=0.7, gamma=3.0, mask_ratio=0.5, noise_type="additive", seed=1)
    assert np.array_equal(a.corrupted, b.corrupted) and not np.array_equal(a.corrupted, clean)
    assert not np.array_equal(a.corrupted, c.corrupted)
    assert a.mask.shape == (4, 4) and int(a.mask.sum()) == 8  # 16 tokens, ceil(16 * 0.5) kept
    assert torch.all(a.z_corrupted[:, a.mask] == 0)  # masked tokens are zeros in the latent grid
    with pytest.raises(DemoError, match="mask ratio"):
        core.corrupt_and_decode(e, photo, mask_ratio=1.0)
    with pytest.raises(DemoError, match="noise type"):
        core.corrupt_and_decode(e, photo, noise_type="pink")


def test_conv_vae_noise_only(photo):
    from ldetok.tokenizers import build

    torch.manual_seed(0)
    entry = core.DemoTokenizer("vae", "", build("convvae_tiny").eval())
    r = core.corrupt_and_decode(entry, photo, t=0.5, gamma=3.0, mask_ratio=0.3, seed=0)
    assert r.mask is None and "no token masking" in r.notices[0] and r.corrupted.shape == (32, 32, 3)
    assert core.corrupt_and_decode(entry, photo, t=0.0).psnr_corrupted == pytest.approx(r.psnr_clean, abs=1e-4)


def test_latent_pca_image_shape_and_masked_grey():
    z = torch.randn(16, 4, 6, generator=torch.Generator().manual_seed(0))
    img = core.latent_pca_image(z)
    assert img.shape == (4, 6, 3) and img.dtype == np.uint8
    assert img.std() > 10  # the components spread over the colour range
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, 2] = mask[3, 0] = True
    basis = core.latent_pca_basis(z)
    masked = core.latent_pca_image(z[None], mask, basis)
    assert (masked[mask.numpy()] == core.GREY).all()
    assert np.array_equal(masked[~mask.numpy()], img[~mask.numpy()])  # same basis, same colours elsewhere
    assert core.latent_pca_image(torch.zeros(16, 2, 2)).shape == (2, 2, 3)  # degenerate latents do not fail


def test_compare_tokenizers_common_display_size(tiny_dirs, photo):
    entries = core.load_tokenizers([str(tiny_dirs["ae"]), str(tiny_dirs["big"]),
                                    core.TokenizerSpec("/nonexistent/run", "gone", "make run")])
    items, table = core.compare_tokenizers(entries, photo, t=0.4, gamma=3.0, mask_ratio=0.25, seed=0)
    assert len(items) == 10  # five pictures per loaded tokenizer
    assert {im.shape for im, _ in items} == {(192, 192, 3)}  # one display size for 32 px and 64 px tokenizers
    assert items[5][1].endswith(", 64 px") and "dB" in items[1][1]
    assert "/nonexistent/run" in table and "make run" in table and table.count("\n|") >= 4


def test_sweep_gallery_matches_the_main_panel(toks, photo):
    items = core.sweep_gallery(toks, photo, gamma=3.0, seed=18, display=32)
    assert len(items) == 2 * 2 * len(core.SWEEP_VALUES)
    assert items[0][1].endswith("t=0") and items[10][1].endswith("mask=0")
    # one shared ε per seed: the sweep's t=0.3 picture is the main panel's corrupted output at t=0.3
    r = core.corrupt_and_decode(toks[0], photo, t=0.3, gamma=3.0, mask_ratio=0.0, seed=18)
    assert np.array_equal(items[3][0], r.corrupted)
    assert np.array_equal(items[0][0], r.clean)


# ------------------------------------------------------------------ input images


def test_huge_image_resized_with_notice(tmp_path):
    yy, xx = np.mgrid[0:1800, 0:2600]
    a = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    img = core.read_image(_png(tmp_path / "huge.png", a))
    assert max(img.pixels.shape[:2]) == core.MAX_INPUT_SIDE and img.pixels.shape[1] == 1024
    assert any("resized" in n and "2600x1800" in n for n in img.notices)
    Image.fromarray(a).save(tmp_path / "huge.jpg", quality=80)  # JPEGs decode at a reduced scale
    img = core.read_image(tmp_path / "huge.jpg", max_side=300)
    assert max(img.pixels.shape[:2]) == 300 and img.notices


def test_16bit_rgba_grayscale_files(tmp_path):
    g16 = np.full((20, 30), 40000, np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    img = core.read_image(tmp_path / "g16.png")
    assert img.pixels.shape == (20, 30, 3) and abs(int(img.pixels[0, 0, 0]) - 156) <= 1  # rescaled, not clipped
    assert any("16-bit" in n for n in img.notices)
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:5, :, 3] = 255  # top half opaque red, bottom half fully transparent
    img = core.read_image(_png(tmp_path / "rgba.png", rgba))
    assert tuple(img.pixels[0, 0]) == (255, 0, 0) and tuple(img.pixels[9, 9]) == (255, 255, 255)
    assert any("transparency" in n for n in img.notices)
    img = core.read_image(_png(tmp_path / "gray.png", np.full((12, 12), 77, np.uint8)))
    assert img.pixels.shape == (12, 12, 3) and (img.pixels == 77).all() and any("grayscale" in n for n in img.notices)


def test_arrays_of_any_kind():
    assert core.prepare_image(np.full((8, 8), 65535, np.uint16)).pixels.max() == 255
    rgba = np.zeros((8, 8, 4), np.uint8)
    assert (core.prepare_image(rgba).pixels == 255).all()  # transparent -> white
    assert core.prepare_image(np.ones((8, 8, 1), np.float32) * 0.5).pixels[0, 0, 0] == 128
    assert core.prepare_image(Image.new("L", (5, 7), 9)).pixels.shape == (7, 5, 3)
    with pytest.raises(DemoError, match="shape"):
        core.prepare_image(np.zeros((2, 3, 4, 5)))
    with pytest.raises(DemoError, match="no input image"):
        core.prepare_image(None)


def test_non_image_file_clear_error(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(DemoError, match="notes.png is not an image"):
        core.read_image(bad)
    with pytest.raises(DemoError, match="no such file"):
        core.read_image(tmp_path / "absent.png")


# ------------------------------------------------------------------ preparing, generator, command line


def test_prepare_demo_tokenizers_trains_both_presets(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(core, "train_tokenizer", lambda cfg, run: calls.append((cfg, run)))
    done = tmp_path / "cpu-photos-ae" / "tokenizer"
    done.mkdir(parents=True)
    (done / "tokenizer.json").write_text(json.dumps({"step": 800}))
    runs = core.prepare_demo_tokenizers(tmp_path, steps=800, log=lambda s: None)
    assert runs == [tmp_path / "cpu-photos", tmp_path / "cpu-photos-ae"]
    assert len(calls) == 1  # the finished one is kept
    cfg, run = calls[0]
    assert run == tmp_path / "cpu-photos" and cfg.data.dataset == "photos" and cfg.optim.max_steps == 800
    assert cfg.corruption == CorruptionConfig(gamma=3.0, max_mask_ratio=0.7)
    calls.clear()
    core.prepare_demo_tokenizers(tmp_path, steps=900, log=lambda s: None)
    assert [c.corruption for c, _ in calls] == [CorruptionConfig(gamma=3.0, max_mask_ratio=0.7),
                                                CorruptionConfig.off()]


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory, tiny_dirs):
    from ldetok.runs import save_generator
    from ldetok.generators import build_generator

    torch.manual_seed(0)
    gen = build_generator("dit_tiny", depth=1)
    run = tmp_path_factory.mktemp("gen_run")
    save_generator(gen, run / "generator", {"name": "dit_tiny", "tokenizer": str(tiny_dirs["detok"].parent)})
    return run


def test_generator_sample_grid(gen_run, tmp_path):
    g = core.load_generator(gen_run)
    assert g.ok and len(g.class_names) == 10
    grid = core.sample_grid(g, class_index=3, cfg=2.0, steps=2, seed=0, n=4, display=32)
    assert grid.shape == (2 * 34 + 2, 2 * 34 + 2, 3)
    missing = core.load_generator(tmp_path / "nope")
    assert not missing.ok and str(tmp_path / "nope") in missing.error
    with pytest.raises(DemoError, match="class"):
        core.sample_grid(g, class_index=12, steps=2)


def test_cli_reports_missing_tokenizer(tmp_path, capsys, tiny_dirs):
    import argparse

    from ldetok.demo.cli import add_demo_parser, main

    missing = tmp_path / "missing-run"
    assert main(["--check", "--tokenizer", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such tokenizer" in err
    assert main(["--check", "--tokenizer", str(tiny_dirs["ae"])]) == 0
    parser = argparse.ArgumentParser()
    add_demo_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--tokenizer", "a", "--tokenizer", "b=c"])
    assert args.tokenizer == ["a", "b=c"] and args.host == "127.0.0.1" and args.port == 7860 and callable(args.fn)


# ------------------------------------------------------------------ the served app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_dirs, gen_run):
    require_module("gradio", "pip install -e '.[demo]'")
    gradio_client = require_module("gradio_client", "pip install -e '.[demo]'")
    from ldetok.demo.app import build_app, serve

    sets = {core.CUSTOM_SET: core.load_tokenizers([str(tiny_dirs["detok"].parent), str(tiny_dirs["big"]),
                                                   "/nonexistent/checkpoint.pth"])}
    app = build_app(sets, core.load_generator(gen_run))
    serve(app, "127.0.0.1", _free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield app, gradio_client.Client(app.local_url, verbose=False)
    finally:
        app.close()


def test_app_binds_loopback_and_queues(served):
    app, _ = served
    assert app.server_name == "127.0.0.1" and "127.0.0.1" in app.local_url
    assert app.analytics_enabled is False
    assert app._queue.default_concurrency_limit == 2 and app._queue.max_size == 64  # queued, two jobs at a time


def test_app_reconstruct_endpoint(served, tmp_path):
    from gradio_client import handle_file

    _, client = served
    src = _png(tmp_path / "in.png", np.asarray(Image.fromarray(core.bundled_photo("coffee").pixels).resize((96, 96))))
    gallery, table = client.predict(handle_file(src), core.CUSTOM_SET, 0.5, 3.0, 0.25, "interpolative", 3,
                                    api_name="/reconstruct")
    assert len(gallery) == 10
    first = Image.open(gallery[2]["image"])
    assert first.size == (192, 192) and "corrupted" in gallery[2]["caption"]
    assert "/nonexistent/checkpoint.pth" in table and "dB" in table
    again, _ = client.predict(handle_file(src), core.CUSTOM_SET, 0.9, 3.0, 0.25, "interpolative", 3,
                              api_name="/reconstruct")
    assert not np.array_equal(np.asarray(first), np.asarray(Image.open(again[2]["image"])))


def test_app_input_endpoints_and_bad_input(served, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, client = served
    image, notice, _ = client.predict("astronaut", core.CUSTOM_SET, api_name="/load_photo")
    assert Image.open(image).size == (512, 512) and "astronaut" in notice
    Image.fromarray(np.full((16, 24), 50000, np.uint16)).save(tmp_path / "deep.png")
    image, notice, _ = client.predict(handle_file(str(tmp_path / "deep.png")), core.CUSTOM_SET,
                                      api_name="/load_upload")
    assert Image.open(image).size == (24, 16) and "16-bit" in notice
    bad = tmp_path / "readme.txt"
    bad.write_text("hello")
    with pytest.raises(AppError, match="readme.txt is not an image") as ei:
        client.predict(handle_file(str(bad)), core.CUSTOM_SET, api_name="/load_upload")
    assert "/" not in str(ei.value)  # the server's (temporary) folders are never shown
    with pytest.raises(AppError, match="seed must be a whole number in 0 .. 9223372036854775807, got -5"):
        client.predict(handle_file(image), core.CUSTOM_SET, 0.5, 3.0, 0.0, "interpolative", -5, api_name="/reconstruct")
    with pytest.raises(Exception):  # noqa: B017 - out of the slider's range: refused, the server lives on
        client.predict(handle_file(image), core.CUSTOM_SET, 0.5, 3.0, 2.0, "interpolative", 0, api_name="/reconstruct")
    gallery, _ = client.predict(handle_file(image), core.CUSTOM_SET, 0.0, 3.0, 0.0, "additive", 0,
                                api_name="/reconstruct")
    assert len(gallery) == 10


def test_app_sweep_and_sample(served, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, client = served
    path = _png(tmp_path / "rocket.png", core.bundled_photo("rocket").pixels)
    sweep = client.predict(handle_file(path), core.CUSTOM_SET, 3.0, "interpolative", 18, api_name="/sweep")
    assert len(sweep) == 2 * 2 * len(core.SWEEP_VALUES) and "mask=0.9" in sweep[-1]["caption"]
    grid = client.predict("class 3", 1.5, 2, 0, 4, api_name="/sample")
    assert Image.open(grid).size == (2 * 66 + 2, 2 * 66 + 2)
    with pytest.raises((AppError, ValueError)):
        client.predict("no such class", 1.5, 2, 0, 4, api_name="/sample")


def test_seeds_refused_not_wrapped(toks, photo):
    for bad in (-5, 2**63, 1.5, "x", float("inf"), None):
        with pytest.raises(DemoError, match="seed must be a whole number"):
            core.corrupt_and_decode(toks[0], photo, seed=bad)
    assert core.check_seed(7.0) == 7 and core.check_seed("12") == 12 and core.check_seed(2**63 - 1) == 2**63 - 1


@pytest.mark.slow
def test_app_serves_concurrent_clients(served, tmp_path):
    """8 clients x 5 identical /reconstruct requests at once, three times: every one is answered and every
    image downloads whole (identical outputs never share a file that is being rewritten)."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    app, _ = served
    src = _png(tmp_path / "in.png", np.asarray(Image.fromarray(core.bundled_photo("coffee").pixels).resize((64, 64))))
    clients = [Client(app.local_url, verbose=False, download_files=str(tmp_path / f"c{k}")) for k in range(8)]

    def five(client):
        failures = []
        for _ in range(5):
            try:
                gallery, table = client.predict(handle_file(src), core.CUSTOM_SET, 0.5, 3.0, 0.0, "interpolative", 3,
                                                api_name="/reconstruct")
                assert len(gallery) == 10 and "dB" in table
                for item in gallery:
                    Image.open(item["image"]).load()  # a truncated download fails here
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                failures.append(repr(e))
        return failures

    for _ in range(3):
        with ThreadPoolExecutor(len(clients)) as pool:
            failures = [f for fs in pool.map(five, clients) for f in fs]
        assert failures == []
