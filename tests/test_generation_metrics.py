"""ldetok.eval.generation / classifier: precision-recall against a direct numpy implementation,
FID/KID through evaluate_generation against closed forms and kid_from_features (stub extractors,
so no Inception runs except one 8-image check), references from datasets and .npz files, PNG round
trips, the Fashion-MNIST classifier (trained on a subset, cached, class consistency) and guidance sweeps."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldetok.eval import (
    InceptionFeatures,
    MetricResult,
    ensure_inception_weights,
    kid_from_features,
    save_reference_stats,
    stats_from_features,
    weights_info,
)
from ldetok.eval import generation as G
from ldetok.eval.classifier import ClassifierFeatures, train_classifier
from ldetok.eval.generation import (
    evaluate_generation,
    evaluate_generator,
    evaluate_generator_run,
    guidance_sweep,
    precision_recall,
    reference_score,
    write_samples_png,
)
from ldetok.sampling import generate_images, to_uint8


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ---- stubs ---------------------------------------------------------------------------------------
class TableExtractor:
    """Image i (pixel [0, 0, 0] = i / 1000) -> row i of a fixed feature table: exact features, no network."""

    description = "stub table features"

    def __init__(self, table, cache_key="stub-table"):
        self.table, self.cache_key = np.asarray(table, np.float32), cache_key

    def features(self, images):
        return self.table[(images[:, 0, 0, 0].double() * 1000).round().long().numpy()]


def index_images(n, size=8):
    x = torch.zeros(n, 1, size, size)
    x[:, 0, 0, 0] = torch.arange(n) / 1000
    return x


class MomentExtractor:
    """Per-image mean, std and four pixels: a deterministic function of the pixels."""

    description = "stub moments"
    cache_key = "stub-moments"

    def features(self, images):  # a tensor, or an iterable of batches (as reference_stats passes)
        x = images.float() if torch.is_tensor(images) else torch.cat([b.float() for b in images])
        return torch.cat([x.mean((1, 2, 3))[:, None], x.std((1, 2, 3))[:, None], x[:, 0, 10:12, 10:12].flatten(1)],
                         1).numpy()


def gaussian_with_exact_stats(n, mu, var, seed):
    """Samples whose sample mean and (unbiased) covariance are exactly mu and diag(var)."""
    x = np.random.default_rng(seed).normal(size=(n, len(mu)))
    x -= x.mean(0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # whitened: cov == I
    return x * np.sqrt(var) + mu


# ---- precision / recall --------------------------------------------------------------------------
def numpy_precision_recall(real, fake, k):
    d = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    r_real = np.sort(d(real, real), axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(d(fake, fake), axis=1)[:, k]
    precision = np.mean([(d(f[None], real)[0] <= r_real).any() for f in fake])
    recall = np.mean([(d(r[None], fake)[0] <= r_fake).any() for r in real])
    return precision, recall


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_numpy_and_torch_fidelity(k, monkeypatch):
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    rng = np.random.default_rng(k)
    real = rng.normal(size=(70, 6))
    fake = rng.normal(size=(55, 6)) * 1.3 + 0.4
    expected = numpy_precision_recall(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a non-trivial case
    assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12)
    tf = calculate_precision_recall_full(torch.from_numpy(fake), torch.from_numpy(real), k)  # (fake, real) order
    assert tf == pytest.approx(expected, abs=1e-6)  # torch-fidelity averages in float32
    monkeypatch.setattr(G, "_rows_per_chunk", lambda n_cols, budget=0: 7)  # many small chunks: same answer
    assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_sanity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="at least 4 points"):
        precision_recall(x[:3], x, k=3)
    with pytest.raises(ValueError, match="same D"):
        precision_recall(x, x[:, :4])


# ---- evaluate_generation with stub extractors ----------------------------------------------------
def test_fid_kid_pr_through_evaluate_generation(tmp_path):
    d = 6
    mu_r, var_r = np.linspace(-1, 1, d), np.linspace(0.5, 2.0, d)
    mu_f, var_f = mu_r + 0.3, var_r[::-1].copy()
    real = gaussian_with_exact_stats(120, mu_r, var_r, seed=1)
    fake = gaussian_with_exact_stats(100, mu_f, var_f, seed=2)
    closed = np.sum((mu_f - mu_r) ** 2) + np.sum((np.sqrt(var_f) - np.sqrt(var_r)) ** 2)
    npz = save_reference_stats(tmp_path / "ref.npz", *stats_from_features(real), features=real)
    ensure_inception_weights()  # a fresh machine has none yet; IS availability depends on which weights exist

    res = evaluate_generation(index_images(100), npz, extractors={"inception": TableExtractor(fake)},
                              kid_subsets=20, kid_subset_size=50, protocol={"cfg": 2.0, "sampler": "stub"})
    assert set(res) == {"fid", "kid", "is", "precision", "recall"}
    assert all(isinstance(r, MetricResult) for r in res.values())
    assert res["fid"].value == pytest.approx(closed, rel=1e-6)  # features stored as float32
    fake32, real32 = fake.astype(np.float32), real.astype(np.float32)
    mean, std = kid_from_features(fake32, real32, subsets=20, subset_size=50, seed=0)
    assert res["kid"].value == mean and res["kid"].protocol["std"] == std
    assert res["kid"].protocol["subset_size"] == 50
    p, r = precision_recall(real32, fake32, k=3)
    assert (res["precision"].value, res["recall"].value) == (p, r)
    proto = res["fid"].protocol
    assert proto["n"] == 100 and proto["resolution"] == 8 and proto["features"] == "stub table features"
    assert str(npz) in proto["ref"] and proto["cfg"] == 2.0 and proto["sampler"] == "stub"
    # IS: only with torch-fidelity's own weights; the converted ones have no classifier head
    if weights_info()["converted"]:
        assert res["is"].value is None and "converted" in res["is"].protocol["unavailable"]
    assert "n/a" in res["is"].format() and "unavailable=" in res["is"].format()


def test_npz_with_only_mu_sigma(tmp_path):
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(50, 4)), rng.normal(size=(30, 4)) + 0.5
    npz = save_reference_stats(tmp_path / "adm_style.npz", *stats_from_features(real))  # no features
    res = evaluate_generation(index_images(30), npz, extractors={"inception": TableExtractor(fake)}, labels=[0] * 30)
    mu, s = stats_from_features(fake.astype(np.float32))
    assert res["fid"].value == pytest.approx(G.fid_from_stats(mu, s, *stats_from_features(real)), rel=1e-9)
    for key in ("kid", "precision", "recall"):
        assert res[key].value is None and "real features" in res[key].protocol["unavailable"]
    # the classifier space has no reference in a statistics file: reported, not trained
    res = evaluate_generation(index_images(30), npz, extractors=({"inception": TableExtractor(fake)}),
                              metrics=("fid",))
    assert set(res) == {"fid"}
    res = evaluate_generation(index_images(30), npz, extractors=["classifier"], labels=[0] * 30)
    assert {r.value for r in res.values()} == {None}
    assert set(res) == {"fd_clf", "kid_clf", "precision_clf", "recall_clf", "class_consistency"}
    with pytest.raises(ValueError, match="4-d statistics"):
        evaluate_generation(index_images(30), npz, extractors={"inception": TableExtractor(np.zeros((30, 5)))})
    with pytest.raises(FileNotFoundError):
        evaluate_generation(index_images(30), tmp_path / "missing.npz", extractors={"inception": TableExtractor(fake)})


def test_dataset_reference_and_streamed_batches(tmp_path):
    from ldetok.data import build_dataset

    ext = MomentExtractor()
    train = build_dataset("fashion_mnist", "train", 32, 1)
    fake, labels = train.tensor_batch(range(60))
    real, _ = build_dataset("fashion_mnist", "test", 32, 1).tensor_batch(range(80))

    def batches():  # (images, labels) pairs: the labels are picked up
        for i in range(0, 60, 25):
            yield fake[i:i + 25], labels[i:i + 25]

    ref = ("fashion_mnist", "test", 32, 80)
    res = evaluate_generation(batches, ref, extractors={"moments": ext}, kid_subsets=10, kid_subset_size=40,
                              cache_dir=tmp_path)
    assert set(res) == {"fd_moments", "kid_moments", "precision_moments", "recall_moments"}
    assert res["kid_moments"].value == kid_from_features(ext.features(fake), ext.features(real), 10, 40)[0]
    mu_f, s_f = stats_from_features(ext.features(fake))
    mu_r, s_r = stats_from_features(ext.features(real))
    assert res["fd_moments"].value == pytest.approx(G.fid_from_stats(mu_f, s_f, mu_r, s_r), rel=1e-6)
    assert res["fd_moments"].protocol["ref"] == "fashion_mnist/test@32 (n=80)"
    assert len(list(tmp_path.glob("fashion_mnist__test__r32__n80__stub-moments.npz"))) == 1  # cached
    with pytest.raises(ValueError, match="at 32 px"):
        evaluate_generation(fake[:, :, :16, :16], ref, extractors={"moments": ext}, cache_dir=tmp_path)


# ---- PNG ----------------------------------------------------------------------------------------
def test_write_samples_png_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    for c in (1, 3):
        x = torch.rand(5, c, 12, 12, generator=g) * 2.2 - 1.1  # includes out-of-range values
        x[0, 0, 0, :4] = torch.tensor([-1.0, (0.5 / 127.5) - 1, (1.5 / 127.5) - 1, 0.998])  # rounding edges
        paths = write_samples_png(x, [3, None, 1, 0, 9], tmp_path / f"c{c}")
        assert [p.name for p in paths] == ["00000_class3.png", "00001_classnone.png", "00002_class1.png",
                                           "00003_class0.png", "00004_class9.png"]
        back = np.stack([np.asarray(Image.open(p)) for p in paths])
        assert back.dtype == np.uint8 and np.array_equal(back, to_uint8(x))
        assert back[0, 0, 3, 0] == 255  # 0.998 rounds to 255 (truncation would give 254)


# ---- the classifier ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_classifier(tmp_path_factory):
    cache = tmp_path_factory.mktemp("classifiers")
    model, acc = train_classifier(epochs=1, limit=2000, test_limit=1000, batch_size=16, cache_dir=cache)
    return model, acc, cache


def test_classifier_trains_and_is_cached(small_classifier):
    model, acc, cache = small_classifier
    assert acc > 0.5 and not model.meta["cached"]  # chance is 0.1
    record = json.loads(next(cache.glob("*.json")).read_text())
    assert record["test_accuracy"] == acc and record["dataset"] == "fashion_mnist"
    assert (record["epochs"], record["seed"], record["train_images"], record["test_images"]) == (1, 0, 2000, 1000)
    again, acc2 = train_classifier(epochs=1, limit=2000, test_limit=1000, batch_size=16, cache_dir=cache)
    assert again.meta["cached"] and acc2 == acc  # loaded, not retrained
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    ext = ClassifierFeatures(again)
    assert ext.description == f"fmnist-cnn penultimate 128 (test acc {acc * 100:.1f}%)"
    assert ext.cache_key.startswith("fmnist-cnn-pen128-e1-s0-") and ext.cache_key == ClassifierFeatures(model).cache_key


def test_classifier_weights_do_not_depend_on_the_callers_threads(small_classifier, tmp_path):
    """Trained on one thread whatever the caller set: a 1-thread and a 2-thread caller get the same weights
    (other weights would give other distances), and the caller's setting is restored."""
    model, _, _ = small_classifier  # trained under the test session's thread setting
    prev = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            again, _ = train_classifier(epochs=1, limit=2000, test_limit=1000, batch_size=16,
                                        cache_dir=tmp_path / f"t{threads}")
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(prev)
        assert not again.meta["cached"] and again.meta["sha1"] == model.meta["sha1"], threads


def test_class_consistency_of_real_images_is_the_accuracy(small_classifier, tmp_path):
    from ldetok.data import build_dataset

    model, acc, _ = small_classifier
    ext = ClassifierFeatures(model)
    x, y = build_dataset("fashion_mnist", "test", 32, 1).tensor_batch(range(1000))
    f = ext.features(x[:10])
    assert f.shape == (10, 128) and f.dtype == np.float32 and ext.logits(x[:10]).shape == (10, 10)
    assert np.allclose(ext.features(x[:10].expand(-1, 3, -1, -1)), f, atol=1e-5)  # RGB-replicated gray: same
    res = evaluate_generation(x, ("fashion_mnist", "test", 32, 1000), extractors=[ext], labels=y,
                              kid_subsets=5, cache_dir=tmp_path)
    assert res["class_consistency"].value == pytest.approx(acc, abs=1e-12)
    assert res["class_consistency"].value == ext.accuracy(x, y)
    assert res["class_consistency"].protocol["features"] == ext.description
    assert abs(res["fd_clf"].value) < 1e-4 and res["precision_clf"].value == res["recall_clf"].value == 1.0
    assert res["fd_clf"].name == "FD-clf" and res["kid_clf"].name == "KID-clf"
    res = evaluate_generation(x[:20], ("fashion_mnist", "test", 32, 1000), extractors=[ext], cache_dir=tmp_path,
                              metrics=("class_consistency",))
    assert res["class_consistency"].value is None and "no labels" in res["class_consistency"].protocol["unavailable"]


# ---- one real Inception run ----------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_real_inception_small(tmp_path):
    g = torch.Generator().manual_seed(0)
    low = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1
    imgs = torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    ext = InceptionFeatures("cpu", batch_size=8)
    feats = ext.features(imgs[:4])
    npz = save_reference_stats(tmp_path / "ref.npz", *stats_from_features(feats), features=feats)
    res = evaluate_generation(imgs[:4], npz, extractors=[ext], metrics=("fid", "is"), batch_size=2)
    assert abs(res["fid"].value) < 1e-2  # the same four images
    assert res["fid"].protocol["features"] == ext.description
    if weights_info()["converted"]:
        assert res["is"].value is None


# ---- sweeps with a stub generator -----------------------------------------------------------------
class StubGenerator(torch.nn.Module):
    """'Latents' whose mean moves with |guidance_scale - 2.5|: the sweep must pick 2.5."""

    kind = "stub"
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def sample(self, n, labels=None, guidance_scale=1.0, steps=None, temperature=1.0, generator=None):
        self.calls.append((guidance_scale, None if labels is None else labels.tolist()))
        return torch.randn(n, 1, 16, 16, generator=generator) * 0.3 + 0.4 * abs(guidance_scale - 2.5)


class StubTokenizer:
    def detokenize(self, z):
        return z.clamp(-1, 1)


@pytest.fixture
def sweep_setup(tmp_path):
    ext = MomentExtractor()
    real = (torch.randn(200, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 0.3).clamp(-1, 1)
    feats = ext.features(real)
    return ext, save_reference_stats(tmp_path / "ref.npz", *stats_from_features(feats), features=feats)


@pytest.mark.parametrize("metric", ["fid", "kid"])
def test_guidance_sweep_picks_the_minimum(sweep_setup, metric):
    ext, npz = sweep_setup
    gen = StubGenerator()
    score = reference_score(npz, extractor=ext, metric=metric, kid_subsets=10, kid_subset_size=20)
    best, table = guidance_sweep(gen, StubTokenizer(), [1.0, 2.0, 2.5, 3.5], 40, score)
    assert list(table) == [1.0, 2.0, 2.5, 3.5] and best == 2.5
    assert best == min(table, key=lambda g: table[g].value)
    assert table[1.0].protocol["cfg"] == 1.0 and table[1.0].protocol["n"] == 40
    assert gen.calls[0][1] == [i % 10 for i in range(40)]  # class-balanced
    # a plain-number score (reproduce's FD): the samples and their indices, the first listed wins a tie
    seen = []

    def flat(images, indices, protocol):
        seen.append((images, list(indices), protocol["cfg"]))
        return 1.0

    best, table = guidance_sweep(gen, StubTokenizer(), [3.0, 2.0], 6, flat, seed=4)
    assert best == 3.0 and table == {3.0: 1.0, 2.0: 1.0} and seen[0][1:] == (list(range(6)), 3.0)
    assert torch.equal(seen[0][0], generate_images(gen, StubTokenizer(), 6, 3.0, seed=4)[0])  # one process
    with pytest.raises(ValueError, match="empty"):
        guidance_sweep(gen, StubTokenizer(), [], 6, flat)


def test_evaluate_generator_and_run(sweep_setup, tmp_path, monkeypatch):

    ext, npz = sweep_setup
    gen, tok = StubGenerator(), StubTokenizer()
    res = evaluate_generator(gen, tok, 30, 2.5, npz, extractors={"inception": ext}, chunk=100,
                             png_dir=tmp_path / "png", protocol={"ema": True}, kid_subset_size=10)
    x, _ = generate_images(gen, tok, 30, 2.5, seed=0)  # one chunk: exactly these samples
    mu, s = stats_from_features(ext.features(x))
    with np.load(npz) as z:
        assert res["fid"].value == pytest.approx(G.fid_from_stats(mu, s, z["mu"], z["sigma"]), rel=1e-9)
    assert res["fid"].protocol["ema"] is True and res["fid"].protocol["class_balanced"] is True
    assert len(list((tmp_path / "png").glob("*.png"))) == 30

    run = tmp_path / "run"
    monkeypatch.setattr(G, "load_generator_run",
                        lambda run_dir, device="cpu": (gen, tok, {"name": "stub", "tokenizer": "/x/tok", "ema": True}))
    out = evaluate_generator_run(run, n=30, guidance_scales=[1.0, 2.5, 4.0], n_search=20, reference=npz,
                                 extractors={"inception": ext}, sweep_extractor=ext, device="cpu", verbose=False,
                                 kid_subset_size=10)
    path = run / "eval" / "gen_n30_cfg2.5.json"
    assert out["cfg"] == 2.5 and out["path"] == str(path)
    saved = json.loads(path.read_text())
    assert saved["sweep"]["best_cfg"] == 2.5 and set(saved["sweep"]["table"]) == {"1", "2.5", "4"}
    assert saved["metrics"]["fid"]["protocol"]["ema"] is True and saved["metrics"]["fid"]["protocol"]["cfg"] == 2.5
