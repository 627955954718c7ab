"""The named-file resolver (``ldetok.weights``) against a local HTTP server on 127.0.0.1.

The server stands in for torch hub's download URLs (the table entry is pointed at it through the
resolver's ``WeightFile`` argument) and for the Hugging Face Hub (``HF_ENDPOINT``, read by
huggingface_hub at import: those checks run in a subprocess with a temporary ``HF_HOME``). It counts
requests per path and can cut a response mid-file.
"""

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ldetok import weights as W
from ldetok.eval import inception as inception_mod
from ldetok.tokenizers import build, load_official_detok

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HF_FILE = "/jjiaweiyang/l-DeTok/resolve/main/detok-BB-gamm3.0-m0.7.pth"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files[path] = (bytes, mode)``; mode "ok", "cut" (every GET stops half-way) or
    "cut_then_503" (the first GET stops half-way, later ones get 503). HEAD answers as the Hub does."""

    def log_message(self, *args):  # quiet
        pass

    def _head(self, data: bytes) -> None:
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()

    def do_HEAD(self):
        self.server.hits[("HEAD", self.path)] += 1
        if self.path not in self.server.files:
            self.send_error(404)
            return
        self.send_response(200)
        self._head(self.server.files[self.path][0])

    def do_GET(self):
        self.server.hits[("GET", self.path)] += 1
        if self.path not in self.server.files:
            self.send_error(404)
            return
        data, mode = self.server.files[self.path]
        if mode == "cut_then_503" and self.server.hits[("GET", self.path)] > 1:
            self.send_error(503)
            return
        self.send_response(200)
        self._head(data)
        if mode in ("cut", "cut_then_503"):
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.hits = {}, Counter()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def online(tmp_path, monkeypatch):
    """A fresh torch hub cache, and no offline flag (conftest sets HF_HUB_OFFLINE for every test)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(W.OFFLINE_ENV, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _state_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))}, buf)
    return buf.getvalue()


def _hub_entry(server, data: bytes, served: bytes | None = None, mode: str = "ok") -> W.WeightFile:
    """A torch hub entry named with ``data``'s SHA-256 prefix, served (as ``served``) by the local server."""
    name = f"tiny-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    server.files["/models/" + name] = (data if served is None else served, mode)
    return replace(W.TABLE["vgg16"], name="tiny", filename=name, env_var="LDETOK_TEST_TINY_WEIGHTS",
                   url=f"{server.url}/models/{name}")


def _gets(server) -> int:
    return sum(n for (method, _), n in server.hits.items() if method == "GET")


# ---- the table -------------------------------------------------------------------------------------
def test_table_and_specs():
    assert W.TABLE["vgg16"].hash_prefix == "397923af" and W.TABLE["convnext_s"].hash_prefix == "0c510722"
    assert W.TABLE["inception"].hash_prefix == "6726825d"
    assert {"detok_BB", "detok_BB_decoder_tuned", "vitok_BB", "marvae", "mar_base", "mar_large"} == set(W.RELEASED)
    assert W.entry("released:detok_BB").filename == "detok-BB-gamm3.0-m0.7.pth"
    assert W.entry("released:mar_large").repo_id == "jjiaweiyang/l-DeTok"
    for bad in ("released:vgg16", "released:nope", "nope"):
        with pytest.raises(KeyError, match="known"):
            W.entry(bad)
    # the torch-fidelity URL is the one the installed package downloads
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert W.TABLE["inception"].url == URL_INCEPTION_V3
    # the package files resolve from their wheels, never from the network
    assert W.resolve("lpips_vgg").name == "vgg.pth" and W.resolve("effnet_lite0").is_file()


# ---- torch hub files -------------------------------------------------------------------------------
def test_download_lands_in_cache_and_is_reused(server, online):
    data = _state_bytes()
    e = _hub_entry(server, data)
    p = W.resolve(e, progress=False)
    assert p == online / e.filename and p.read_bytes() == data
    assert torch.equal(torch.load(p, weights_only=True)["w"], torch.load(io.BytesIO(data), weights_only=True)["w"])
    assert _gets(server) == 1
    assert W.resolve(e) == p and W.download(e) == p  # found in the cache: no second download
    assert _gets(server) == 1
    assert not [f for f in online.iterdir() if f.name != e.filename]  # no temporary files left


def test_explicit_path_and_env_var_come_first(server, online, tmp_path, monkeypatch):
    data = _state_bytes()
    e = _hub_entry(server, data)
    mine = tmp_path / "mine.pth"
    mine.write_bytes(data)
    assert W.resolve(e, mine) == mine and W.resolve(e, tmp_path / "nowhere") != mine  # missing path: go on
    monkeypatch.setenv(e.env_var, str(tmp_path))  # a folder holding the file works too
    (tmp_path / e.filename).write_bytes(data)
    assert W.resolve(e) == tmp_path / e.filename
    assert _gets(server) == 1  # only the "nowhere" lookup fell through to a download


def test_corrupted_download_fails_hash_check_and_is_not_kept(server, online):
    data = _state_bytes()
    e = _hub_entry(server, data, served=_state_bytes(seed=1))
    with pytest.raises(W.MissingWeightsError) as err:
        W.resolve(e, progress=False)
    assert e.filename in str(err.value) and "hash" in str(err.value).lower()
    assert not online.exists() or not list(online.iterdir())


def test_interrupted_download_leaves_nothing_loadable(server, online):
    data = _state_bytes()
    e = _hub_entry(server, data, mode="cut")
    with pytest.raises(W.MissingWeightsError, match=e.filename):
        W.resolve(e, progress=False)
    assert not online.exists() or not list(online.iterdir())
    server.files["/models/" + e.filename] = (data, "ok")  # the server recovers: a clean download
    assert W.resolve(e, progress=False).read_bytes() == data


def test_offline_refuses_fast_naming_file_and_places(server, online, monkeypatch):
    e = _hub_entry(server, _state_bytes())
    monkeypatch.setenv(W.OFFLINE_ENV, "1")
    t0 = time.monotonic()
    with pytest.raises(W.MissingWeightsError) as err:
        W.resolve(e)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert e.filename in msg and e.env_var in msg and str(online) in msg and "LDETOK_OFFLINE=1" in msg
    assert "ldetok weights download tiny" in msg and e.url in msg
    assert _gets(server) == 0 and isinstance(err.value, FileNotFoundError)


def test_no_route_refuses_fast(online):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = replace(W.TABLE["vgg16"], name="tiny", filename="tiny-00000000.pth", url=f"http://127.0.0.1:{port}/x.pth")
    t0 = time.monotonic()
    with pytest.raises(W.MissingWeightsError, match="no route to 127.0.0.1"):
        W.resolve(e)
    assert time.monotonic() - t0 < 5


def test_perceptual_weights_offline_message(online, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LDETOK_VGG16_WEIGHTS", raising=False)
    with pytest.raises(W.MissingWeightsError) as err:
        W.resolve("vgg16")
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and "IMAGENET1K_V1" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in msg


# ---- Hugging Face Hub files (subprocess: huggingface_hub reads HF_ENDPOINT at import) -----------------
_HF_SCRIPT = """
import json, sys, time
import torch
from ldetok import weights as W
out = {}
for i in range(2):
    t0 = time.monotonic()
    try:
        p = W.resolve(sys.argv[1], progress=False)
        out[f"path{i}"] = str(p)
        out[f"ok{i}"] = bool(torch.load(p, weights_only=True)["w"].shape == (64, 64))
    except Exception as e:
        out[f"error{i}"] = f"{type(e).__name__}: {e}"
    out[f"seconds{i}"] = time.monotonic() - t0
print(json.dumps(out))
"""


def _env(tmp_path, server=None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", W.OFFLINE_ENV, "HF_ENDPOINT")}
    env.update(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"), PYTHONPATH=str(ROOT), **extra)
    if server is not None:
        env["HF_ENDPOINT"] = server.url
    return env


def _run_hf(tmp_path, server, spec="released:detok_BB", **extra) -> dict:
    r = subprocess.run([sys.executable, "-c", _HF_SCRIPT, spec], env=_env(tmp_path, server, **extra),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a subprocess (huggingface_hub reads HF_ENDPOINT at import)
def test_hub_download_lands_in_hf_cache_once(server, tmp_path):
    server.files[HF_FILE] = (_state_bytes(), "ok")
    out = _run_hf(tmp_path, server)
    assert out.get("ok0") and out.get("ok1"), out
    assert out["path0"] == out["path1"] and out["path0"].startswith(str(tmp_path / "hf" / "hub"))
    assert Path(out["path0"]).name == "detok-BB-gamm3.0-m0.7.pth"
    assert server.hits[("GET", HF_FILE)] == 1  # the second lookup found it in the cache
    out = _run_hf(tmp_path, server)  # a new process: still from the cache, no request at all
    assert out.get("ok0") and server.hits[("GET", HF_FILE)] == 1 and server.hits[("HEAD", HF_FILE)] == 1


@pytest.mark.slow  # a subprocess (huggingface_hub reads HF_ENDPOINT at import)
def test_hub_interrupted_download_leaves_nothing_loadable(server, tmp_path):
    data = _state_bytes()
    server.files[HF_FILE] = (data, "cut_then_503")
    out = _run_hf(tmp_path, server)
    assert "error0" in out and "detok-BB-gamm3.0-m0.7.pth" in out["error0"], out
    snapshots = list((tmp_path / "hf").rglob("detok-BB-gamm3.0-m0.7.pth"))
    assert snapshots == []  # only an .incomplete blob may remain, which no lookup returns
    server.files[HF_FILE] = (data, "ok")
    out = _run_hf(tmp_path, server)
    assert out.get("ok0") and Path(out["path0"]).read_bytes() == data


@pytest.mark.slow  # a subprocess (huggingface_hub reads HF_ENDPOINT at import)
def test_hub_offline_refuses_fast(server, tmp_path):
    server.files[HF_FILE] = (_state_bytes(), "ok")
    out = _run_hf(tmp_path, server, HF_HUB_OFFLINE="1")
    assert "error0" in out and out["seconds0"] < 5, out
    assert "detok-BB-gamm3.0-m0.7.pth" in out["error0"] and "LDETOK_DETOK_BB_WEIGHTS" in out["error0"]
    assert "ldetok weights download released:detok_BB" in out["error0"]
    assert sum(server.hits.values()) == 0


# ---- the CLI ---------------------------------------------------------------------------------------
_CLI = """
import sys, time
import torch  # imported first: the timing below is the command's own, not the import of torch
from ldetok.cli import main
t0 = time.monotonic()
rc = main(sys.argv[1:])
print(f"SECONDS {time.monotonic() - t0:.3f} RC {rc}")
"""


def _cli(tmp_path, *args, **extra):
    r = subprocess.run([sys.executable, "-c", _CLI, *args], env=_env(tmp_path, **extra), capture_output=True,
                       text=True, timeout=120)
    last = r.stdout.strip().splitlines()[-1].split()
    return int(last[3]), float(last[1]), r.stdout, r.stderr


@pytest.mark.slow  # a subprocess (huggingface_hub reads HF_ENDPOINT at import)
def test_cli_weights_list_and_offline_download(tmp_path):
    rc, seconds, out, err = _cli(tmp_path, "weights", "list", HF_HUB_OFFLINE="1")
    assert rc == 0 and seconds < 5, err
    for e in W.TABLE.values():
        assert e.spec in out
    assert "effnet_lite0" in out and "yes" in out  # the package file is here
    rc, seconds, out, err = _cli(tmp_path, "weights", "download", "released:detok_BB", HF_HUB_OFFLINE="1")
    assert rc == 2 and seconds < 5
    assert "detok-BB-gamm3.0-m0.7.pth" in err and "HF_HUB_OFFLINE=1" in err


# ---- users of the resolver -------------------------------------------------------------------------
def test_released_spec_loads_through_the_resolver(tmp_path, monkeypatch):
    cfg = dict(image_size=32, patch_size=8)
    tok = build("detok_MM", **cfg)
    sd = {k: v for k, v in tok.state_dict().items() if k not in tok.STATS_KEYS}
    torch.save({"model": sd, "model_ema": sd}, tmp_path / "detok-BB-gamm3.0-m0.7.pth")
    monkeypatch.setenv("LDETOK_DETOK_BB_WEIGHTS", str(tmp_path / "detok-BB-gamm3.0-m0.7.pth"))
    loaded = load_official_detok("released:detok_BB", model="detok_MM", **cfg)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    monkeypatch.delenv("LDETOK_DETOK_BB_WEIGHTS")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    with pytest.raises(FileNotFoundError, match="detok-BB-gamm3.0-m0.7.pth"):
        load_official_detok("released:detok_BB", model="detok_MM", **cfg)


def _converted_inception(tmp_path, name):
    """A 10-byte stand-in for the offline conversion saved as ``name``, with its sidecar record."""
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    conv = ckpt / name
    conv.write_bytes(b"c" * 10)
    conv.with_name(conv.name + ".ldetok.json").write_text(json.dumps({"converted": True, "weights_size": 10}))
    return ckpt, conv


def test_real_inception_wins_over_conversion(tmp_path):
    ckpt, conv = _converted_inception(tmp_path, inception_mod.CONVERTED_NAME)
    info = inception_mod.weights_info(tmp_path)
    assert info["converted"] and not info["inception_score"] and info["path"] == str(conv)
    assert inception_mod.ensure_inception_weights(tmp_path, allow_download=False) == conv
    real = ckpt / inception_mod.WEIGHTS_NAME
    real.write_bytes(b"r" * 20)  # a real download arrives: it is used as it is
    info = inception_mod.weights_info(tmp_path)
    assert info["inception_score"] and not info["converted"] and info["path"] == str(real)
    assert inception_mod.ensure_inception_weights(tmp_path, allow_download=False) == real


def test_legacy_conversion_under_real_name_moves_aside(tmp_path):
    ckpt, old = _converted_inception(tmp_path, inception_mod.WEIGHTS_NAME)
    assert not inception_mod.inception_score_available(tmp_path)
    path = inception_mod.ensure_inception_weights(tmp_path, allow_download=False)
    assert path == ckpt / inception_mod.CONVERTED_NAME and not old.exists()
    assert inception_mod.weights_info(tmp_path)["converted"]
