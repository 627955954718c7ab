"""References for generation metrics (``ldetok.eval.Reference``): ADM statistics and reference batches
(.npz), ``released:`` reference files, ``DATASET:SPLIT[:N]`` spread evenly, image folders, the cache,
clear errors for damaged files, and ``ldetok eval-generator --reference`` end to end. Stub extractors
stand in for Inception, so nothing here needs Inception weights."""

import http.server
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import ldetok.eval.generation as G
from ldetok import weights as W
from ldetok.cli import main as cli
from ldetok.data import build_dataset, from_uint8
from ldetok.eval import (
    BadReferenceError,
    Reference,
    evaluate_generation,
    even_indices,
    fid_from_stats,
    save_reference_stats,
    stats_from_features,
)


# ---- stubs ---------------------------------------------------------------------------------------
def _cat(images):
    return images.float() if torch.is_tensor(images) else torch.cat([b.float() for b in images])


class Moments:
    """Per-image mean, std and the first pixel of each channel (5-d); counts the images it sees."""

    description = "stub moments"
    cache_key = "stub-moments"

    def __init__(self):
        self.seen = 0

    def features(self, images):
        x = _cat(images)
        self.seen += len(x)
        return torch.cat([x.mean((1, 2, 3))[:, None], x.std((1, 2, 3))[:, None],
                          x[:, :, 0, 0].expand(-1, 3)], 1).numpy()


class PixelIndex:
    """The first pixel in 8 bits: reads back an index painted into a constant image."""

    description = "stub pixel index"
    cache_key = "stub-pixel-index"

    def features(self, images):
        x = _cat(images)
        v = ((x[:, 0, 0, 0] + 1) * 127.5).round()
        return torch.stack([v, v * 0 + 1], 1).numpy()


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _uint8_images(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---- .npz files ------------------------------------------------------------------------------------
def test_adm_statistics_npz_gives_the_closed_form_fid(tmp_path):
    ext = Moments()
    fake = torch.rand(30, 3, 8, 8) * 2 - 1
    real = np.random.default_rng(0).normal(size=(50, 5)) * 0.3
    mu, sigma = stats_from_features(real)
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma)  # ADM's layout: mu, sigma and nothing else
    ref = Reference.parse(tmp_path / "adm.npz")
    assert ref.kind == "file" and ref.source("inception") == "stats" and "mu/sigma" in ref.label
    res = evaluate_generation(fake, ref, extractors={"inception": ext}, metrics=("fid", "kid"))
    expected = fid_from_stats(*stats_from_features(ext.features(fake)), mu, sigma)
    assert res["fid"].value == pytest.approx(expected, rel=1e-12)
    assert res["kid"].value is None and "mu/sigma" in res["kid"].protocol["unavailable"]
    rec = res["fid"].protocol["reference"]
    assert rec["kind"] == "file" and rec["path"] == str(tmp_path / "adm.npz")
    assert rec["size"] == (tmp_path / "adm.npz").stat().st_size and len(rec["sha256_ends"]) == 64
    assert json.loads(json.dumps(rec)) == rec  # JSON-able
    assert "reference=" not in res["fid"].format()  # the one-line form keeps the label only


def test_adm_batch_npz_features_are_computed_and_cached(tmp_path):
    imgs = _uint8_images(24, 8, 1)
    np.savez(tmp_path / "batch.npz", arr_0=imgs)
    fake = torch.rand(20, 3, 8, 8) * 2 - 1
    ext = Moments()
    ref = Reference.parse(tmp_path / "batch.npz", cache_dir=tmp_path / "cache")
    assert (ref.resolution, ref.images_n, ref.source("inception")) == (8, 24, "images")
    res = evaluate_generation(fake, ref, extractors={"m": ext}, metrics=("fid", "kid"), kid_subset_size=10,
                              kid_subsets=5)
    direct = ext.features(from_uint8(imgs.transpose(0, 3, 1, 2)))
    expected = fid_from_stats(*stats_from_features(ext.features(fake)), *stats_from_features(direct))
    assert res["fd_m"].value == pytest.approx(expected, rel=1e-9) and res["kid_m"].value is not None
    assert len(list((tmp_path / "cache").glob("npz-batch-*__arr_0__r8__nall__stub-moments.npz"))) == 1
    ext.seen = 0
    again = evaluate_generation(fake, Reference.parse(tmp_path / "batch.npz", cache_dir=tmp_path / "cache"),
                                extractors={"m": ext}, metrics=("fid",))
    assert ext.seen == 20 and again["fd_m"].value == res["fd_m"].value  # the reference came from the cache
    # N spread evenly over the batch: another cache entry, the selected images only
    ext.seen = 0
    part = Reference.parse(tmp_path / "batch.npz", count=6, cache_dir=tmp_path / "cache")
    mu, _, feats = part.stats("m", ext, 5)
    assert np.allclose(feats, ext.features(from_uint8(imgs[even_indices(24, 6)].transpose(0, 3, 1, 2))))
    with pytest.raises(ValueError, match="at 8 px"):
        evaluate_generation(fake[:, :, :4, :4], ref, extractors={"m": ext}, metrics=("fid",))


def test_batch_with_statistics_uses_them_for_inception_only(tmp_path):
    imgs = _uint8_images(12, 8, 2)
    mu, sigma = np.full(5, 0.1), np.eye(5) * 0.2
    np.savez(tmp_path / "virtual.npz", arr_0=imgs, mu=mu, sigma=sigma)
    ref = Reference.parse(tmp_path / "virtual.npz", cache_dir=tmp_path)
    assert "Inception mu/sigma from the file" in ref.label
    assert (ref.source("inception"), ref.source("m"), ref.source("classifier")) == ("stats", "images", "images")
    fake = torch.rand(10, 3, 8, 8) * 2 - 1
    ext = Moments()
    res = evaluate_generation(fake, ref, extractors={"inception": ext}, metrics=("fid",))
    assert res["fid"].value == pytest.approx(fid_from_stats(*stats_from_features(ext.features(fake)), mu, sigma))
    ref_images = Reference.parse(tmp_path / "virtual.npz", prefer="images", cache_dir=tmp_path)
    assert ref_images.source("inception") == "images" and "features of its 12 images" in ref_images.label
    assert ref_images.record()["prefer"] == "images"


@pytest.mark.parametrize("case", ["garbage", "truncated", "wrong_keys", "bad_sigma", "bad_images", "missing"])
def test_damaged_or_wrong_npz_is_one_named_error(tmp_path, case):
    p = tmp_path / f"{case}.npz"
    if case == "garbage":
        p.write_bytes(b"not a zip at all" * 10)
    elif case == "truncated":
        np.savez(p, mu=np.zeros(4), sigma=np.eye(4))
        p.write_bytes(p.read_bytes()[:-40])
    elif case == "wrong_keys":
        np.savez(p, foo=np.zeros(3), images=np.zeros((2, 4, 4, 3), np.uint8))
    elif case == "bad_sigma":
        np.savez(p, mu=np.zeros(4), sigma=np.eye(3))
    elif case == "bad_images":
        np.savez(p, arr_0=np.zeros((4, 8, 8), np.float32))
    expect = FileNotFoundError if case == "missing" else BadReferenceError
    with pytest.raises(expect) as err:
        Reference.parse(p)
    msg = str(err.value)
    assert str(p) in msg
    if case == "wrong_keys":
        assert "'foo'" in msg and "'images'" in msg and "'mu'" in msg and "'arr_0'" in msg
    if case in ("garbage", "truncated"):
        assert "not a readable .npz" in msg and "'mu'" in msg


def test_cli_names_a_damaged_reference_without_traceback(tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.npz").write_bytes(b"\x00" * 100)
    monkeypatch.setattr(G, "load_generator_run", lambda run_dir, device="cpu": (None, None, {}))
    assert cli(["eval-generator", str(tmp_path), "--reference", str(tmp_path / "bad.npz")]) == 2
    err = capsys.readouterr().err
    assert "bad.npz" in err and "not a readable .npz" in err and "Traceback" not in err


# ---- released reference files ---------------------------------------------------------------------------
def test_released_reference_files(tmp_path, monkeypatch):
    assert {"adm_in256_stats", "adm_in256_ref_batch"} == set(W.REFERENCE_FILES)
    assert W.entry("released:adm_in256_stats").filename == "fid_stats/adm_in256_stats.npz"
    assert W.entry("released:adm_in256_stats").repo_id == "jjiaweiyang/l-DeTok"
    assert W.entry("released:adm_in256_ref_batch").url.endswith("/256/VIRTUAL_imagenet256_labeled.npz")
    assert not set(W.REFERENCE_FILES) & set(W.RELEASED)  # RELEASED stays the checkpoints
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LDETOK_ADM_IN256_STATS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for spec, name in (("released:adm_in256_stats", "fid_stats/adm_in256_stats.npz"),
                       ("released:adm_in256_ref_batch", "VIRTUAL_imagenet256_labeled.npz")):
        with pytest.raises(W.MissingWeightsError, match=name) as err:
            Reference.parse(spec)
        assert "offline" in str(err.value)
    with pytest.raises(BadReferenceError, match="weight file"):
        Reference.parse("released:detok_BB")
    save_reference_stats(tmp_path / "adm.npz", np.zeros(5), np.eye(5))
    monkeypatch.setenv("LDETOK_ADM_IN256_STATS", str(tmp_path / "adm.npz"))
    ref = Reference.parse("released:adm_in256_stats")
    assert ref.resolution == 256 and ref.label.startswith("released:adm_in256_stats")
    assert ref.record()["released"] == "released:adm_in256_stats" and ref.record()["path"] == str(tmp_path / "adm.npz")
    with pytest.raises(ValueError, match="32 px but the reference released:adm_in256_stats"):
        ref.check_resolution(32)


def test_reference_batch_downloads_without_a_hash_prefix(tmp_path, monkeypatch):
    """ADM's batch has no published checksum: the torch hub download runs unchecked, into the hub cache."""
    np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz", arr_0=_uint8_images(2, 256, 5))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for var in ("HF_HUB_OFFLINE", W.OFFLINE_ENV, "LDETOK_ADM_IN256_REF_BATCH"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        url = f"http://127.0.0.1:{server.server_port}/VIRTUAL_imagenet256_labeled.npz"
        e = W.TABLE["adm_in256_ref_batch"]
        monkeypatch.setitem(W.TABLE, e.name, W.WeightFile(**{**e.__dict__, "url": url}))
        ref = Reference.parse("released:adm_in256_ref_batch")
    finally:
        server.shutdown()
    assert ref.path == tmp_path / "torch" / "hub" / "checkpoints" / "VIRTUAL_imagenet256_labeled.npz"
    assert ref.images_n == 2 and ref.resolution == 256


# ---- datasets and folders ---------------------------------------------------------------------------
@pytest.fixture
def class_sorted_folder(tmp_path):
    """5 classes x 6 constant 16 px images; image k (in sorted order) has the grey level 5k + 3."""
    root = tmp_path / "folder"
    for k in range(30):
        _png(root / f"class{k // 6}" / f"img{k % 6:02d}.png", np.full((16, 16, 3), 5 * k + 3, np.uint8))
    return root


def test_dataset_split_n_is_spread_evenly(class_sorted_folder, tmp_path):
    ref = Reference.parse("imagefolder:train:10", root=class_sorted_folder, resolution=16, cache_dir=tmp_path / "c")
    assert (ref.kind, ref.selection, ref.count) == ("dataset", "even", 10)
    _, _, feats = ref.stats("p", PixelIndex(), 2)
    picked = [int(v - 3) // 5 for v in feats[:, 0]]
    assert picked == even_indices(30, 10) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    targets = build_dataset("imagefolder", "train", 16, root=class_sorted_folder).targets
    assert sorted({targets[i] for i in picked}) == [0, 1, 2, 3, 4]  # every class, never the first N
    assert ref.record()["selection"] == "even" and "spread evenly" in ref.label
    # the older "first N" form: its own cache entry, never mixed up with the spread one
    first = Reference.parse(("imagefolder", "train", 16, 10, class_sorted_folder), cache_dir=tmp_path / "c")
    _, _, f_first = first.stats("p", PixelIndex(), 2)
    assert [int(v - 3) // 5 for v in f_first[:, 0]] == list(range(10))
    assert json.loads(json.dumps(first.record()))["spec"][4] == str(class_sorted_folder)
    stems = sorted(p.stem for p in (tmp_path / "c").glob("*.npz"))
    assert len(stems) == 2 and stems[0].endswith("__even") != stems[1].endswith("__even")
    whole = Reference.parse("imagefolder:train", root=class_sorted_folder, resolution=16, cache_dir=tmp_path / "c")
    _, _, f_all = whole.stats("p", PixelIndex(), 2)
    assert len(f_all) == 30 and whole.count == 30 and whole.record()["selection"] == "all"
    with pytest.raises(ValueError, match="only 30 images"):
        Reference.parse("imagefolder:train:31", root=class_sorted_folder, resolution=16,
                        cache_dir=tmp_path / "c").stats("p", PixelIndex(), 2)


def test_fashion_mnist_split_spread_evenly_against_labels(tmp_path):
    ds = build_dataset("fashion_mnist", "test", 32, 1)
    ref = Reference.parse("fashion_mnist:test:50", cache_dir=tmp_path)
    ext = Moments()
    fake = torch.rand(8, 1, 32, 32) * 2 - 1
    res = evaluate_generation(fake, ref, extractors={"m": ext}, metrics=("fid",))
    real = ext.features(ds.tensor_batch(even_indices(len(ds), 50))[0])
    expected = fid_from_stats(*stats_from_features(ext.features(fake)), *stats_from_features(real))
    assert res["fd_m"].value == pytest.approx(expected, rel=1e-9)
    assert ref.resolution == 32  # taken from the samples
    rec = res["fd_m"].protocol["reference"]
    assert (rec["dataset"], rec["split"], rec["count"], rec["selection"]) == ("fashion_mnist", "test", 50, "even")
    assert len(set(ds.labels[even_indices(len(ds), 50)].tolist())) == 10


def test_folder_reference_equals_the_same_images_as_a_tensor(tmp_path):
    imgs = _uint8_images(7, 16, 3)
    names = ["b/1.png", "a/x/2.png", "a/3.jpg.png", "c.png", "a/y/z/4.png", "0.png", "b/0.png"]
    for name, arr in zip(names, imgs):
        _png(tmp_path / "f" / name, arr)
    (tmp_path / "f" / "notes.txt").write_text("not an image")
    (tmp_path / "f" / "broken.png").write_bytes(b"\x89PNG garbage")
    order = sorted(range(7), key=lambda i: names[i])
    ext = Moments()
    ref = Reference.parse(tmp_path / "f", cache_dir=tmp_path / "c")
    assert ref.kind == "folder" and ref.images_n == 8  # 7 images + the broken one (skipped when read)
    fake = torch.rand(5, 3, 16, 16) * 2 - 1
    res = evaluate_generation(fake, ref, extractors={"m": ext}, metrics=("fid",))
    tensor = from_uint8(imgs[order].transpose(0, 3, 1, 2))
    _, _, feats = ref.stats("m", ext, 5)
    assert np.allclose(feats, ext.features(tensor), atol=1e-6) and len(feats) == 7
    expected = fid_from_stats(*stats_from_features(ext.features(fake)), *stats_from_features(ext.features(tensor)))
    assert res["fd_m"].value == pytest.approx(expected, rel=1e-6)
    rec = res["fd_m"].protocol["reference"]
    assert rec["kind"] == "folder" and rec["files"] == 8 and len(rec["list_sha256"]) == 64
    # larger photos get the ADM centre crop at the samples' resolution
    big = Reference.parse(tmp_path / "f", resolution=8, cache_dir=tmp_path / "c")
    _, _, small = big.stats("m", ext, 5)
    assert small.shape == (7, 5)


def test_spec_errors(tmp_path):
    with pytest.raises(BadReferenceError, match="DATASET:SPLIT"):
        Reference.parse("nonsense")
    with pytest.raises(FileNotFoundError, match="not found"):
        Reference.parse(str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="count must be >= 2"):
        Reference.parse("fashion_mnist:test:1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        Reference.parse(tmp_path / "empty")
    ref = Reference.parse({"dataset": "fashion_mnist", "split": "test", "resolution": 32, "count": 4})
    assert ref.label == "fashion_mnist/test@32 (n=4)" and ref.selection == "first"


# ---- eval-generator end to end -------------------------------------------------------------------------
class StubInception(Moments):
    """Stands in for InceptionFeatures in the CLI (no weights): moments, and logits when asked."""

    description = "stub inception"
    cache_key = "stub-inception"
    torch_home = None
    with_logits = False

    def __init__(self, device="cpu", batch_size=50, torch_home=None):
        super().__init__()

    def extract(self, images):
        f = self.features(images)
        out = {"2048": f}
        if self.with_logits:
            out["logits_unbiased"] = np.concatenate([f, -f], 1) * 3
        return out


@pytest.fixture(scope="module")
def gen_run(tok_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    assert cli(["train-generator", "--preset", "cpu-fmnist", "--tokenizer", str(tok_run), "--out", str(out),
                "model=dit", "sample_steps=2", "max_steps=2", "batch_size=8", "log_every=1", "tensorboard=false"]) == 0
    return out


def test_eval_generator_reference_end_to_end(gen_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LDETOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(G, "InceptionFeatures", StubInception)
    common = ["eval-generator", str(gen_run), "--n", "20", "--features", "inception", "--steps", "2",
              "--batch-size", "10"]
    # the default: the tokenizer's dataset, TRAIN split, n images spread evenly; IS unavailable (no logits)
    assert cli(common) == 0
    out = capsys.readouterr().out
    assert "reference: fashion_mnist/train@32 (n=20 spread evenly)" in out and "IS unavailable: " in out
    saved = json.loads((gen_run / "eval" / "gen_n20_cfg1.json").read_text())
    assert saved["reference"]["dataset"] == "fashion_mnist" and saved["reference"]["split"] == "train"
    assert saved["reference"]["selection"] == "even" and saved["reference"]["count"] == 20
    assert saved["metrics"]["fid"]["value"] is not None and saved["metrics"]["is"]["value"] is None
    assert saved["metrics"]["fid"]["protocol"]["reference"] == saved["reference"]
    # an explicit dataset reference, and the Inception Score where the extractor gives logits
    monkeypatch.setattr(StubInception, "with_logits", True)
    monkeypatch.setattr(G, "inception_score_available", lambda torch_home=None: True)
    assert cli([*common, "--reference", "fashion_mnist:test:40"]) == 0
    saved = json.loads((gen_run / "eval" / "gen_n20_cfg1.json").read_text())
    assert saved["reference"]["split"] == "test" and saved["reference"]["count"] == 40
    assert saved["metrics"]["is"]["value"] > 1 and saved["metrics"]["is"]["protocol"]["splits"] == 10
    capsys.readouterr()
    # an ADM statistics file
    mu, sigma = stats_from_features(np.random.default_rng(0).normal(size=(30, 5)))
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma)
    assert cli([*common, "--reference", str(tmp_path / "adm.npz")]) == 0
    saved = json.loads((gen_run / "eval" / "gen_n20_cfg1.json").read_text())
    assert saved["reference"]["kind"] == "file" and saved["reference"]["keys"]["mu"] == {"shape": [5], "dtype": "float64"}
    assert "adm.npz (statistics file: mu/sigma)" in capsys.readouterr().out
