"""The demo in a real browser: headless Chromium driven through chromedriver (selenium), on loopback.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them) and the ``selenium``
package (dev extra); without them the test is skipped, and under ``CI=true`` it fails (``require``). No
browser is ever downloaded: selenium is pointed at the system chromium and chromedriver.

It loads the page, moves the noise-level slider with the keyboard, checks that the corrupted output
changes (and the clean one does not), and saves ``figures/demo.png`` for the README. The tokenizers are
the repository's own runs when they exist (``runs/demo`` from ``ldetok demo --prepare``, ``runs/main``
from ``make run``: the screenshot then shows trained models), tiny untrained ones otherwise.
"""

from __future__ import annotations

import io
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import require

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "figures" / "demo.png"
# headless, sandbox-free (root in a container), nothing reaching the network
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1400,1250", "--hide-scrollbars"]


def _browser():
    """(chromium, chromedriver) paths; every missing piece named at once through ``require``."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [] if chromium else ["chromium (apt-get install chromium)"]
    if not driver:
        missing.append("chromedriver (apt-get install chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    require(not missing, "the browser test needs " + ", ".join(missing))
    return chromium, driver


def start_chromium(tmp_path, chromium: str, driver_path: str):
    """Headless Chromium under selenium with a profile of its own in ``tmp_path``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tokenizer_sets(tmp_path):
    from ldetok.corruption import CorruptionConfig
    from ldetok.demo import core
    from ldetok.demo.app import resolve_tokenizer_sets
    from ldetok.runs import save_tokenizer
    from ldetok.tokenizers import build

    sets = resolve_tokenizer_sets(None, "runs/demo", "runs/main")  # relative: the screenshot shows no local paths
    if any(e.ok for es in sets.values() for e in es):
        return sets
    specs = []
    for name, gamma, ratio in (("l-DeTok (tiny, untrained)", 3.0, 0.7), ("AE (tiny, untrained)", 0.0, 0.0)):
        tok = build("detok_MM")
        tok.set_latent_stats(0.0, 1.0)
        corruption = CorruptionConfig(gamma=gamma, max_mask_ratio=ratio).to_dict()
        specs.append(core.TokenizerSpec(str(save_tokenizer(tok, tmp_path / name.split()[0],
                                                           extra={"corruption": corruption})), name))
    return {core.CUSTOM_SET: core.load_tokenizers(specs)}


def _fetch(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=30) as r:  # loopback only
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


def test_slider_moves_change_the_output_and_screenshot(tmp_path, monkeypatch):
    chromium, driver_path = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from ldetok.demo.app import build_app, serve

    monkeypatch.chdir(ROOT)
    app = build_app(_tokenizer_sets(tmp_path))
    serve(app, "127.0.0.1", _free_port(), prevent_thread_lock=True, quiet=True)
    driver = None
    try:
        driver = start_chromium(tmp_path, chromium, driver_path)
        driver.get(app.local_url)
        wait = WebDriverWait(driver, 60, poll_frequency=0.1)

        def gallery_srcs(_=None):
            srcs = [im.get_attribute("src") for im in driver.find_elements(By.CSS_SELECTOR, "#recon img")]
            return srcs if len(srcs) >= 5 and all(srcs) else False

        before = wait.until(gallery_srcs)  # the page rendered the first comparison on load
        assert "dB" in driver.find_element(By.ID, "psnr").text

        slider = driver.find_element(By.CSS_SELECTOR, "#t input[type=range]")
        number = driver.find_element(By.CSS_SELECTOR, "#t input[type=number]")
        t0 = float(number.get_attribute("value"))
        start = time.perf_counter()
        slider.send_keys(Keys.ARROW_RIGHT)  # one step: t 0.5 -> 0.55
        after = wait.until(lambda d: (s := gallery_srcs()) and s[2] != before[2] and s)
        latency = time.perf_counter() - start
        assert float(number.get_attribute("value")) == pytest.approx(t0 + 0.05)
        for _ in range(6):  # then a longer move: t -> 0.85
            slider.send_keys(Keys.ARROW_RIGHT)
        wait.until(lambda d: float(number.get_attribute("value")) == pytest.approx(t0 + 0.35))
        final = wait.until(lambda d: (s := gallery_srcs()) and s[2] not in (before[2], after[2]) and s)

        # the corrupted output changed, the clean reconstruction did not
        assert not np.array_equal(_fetch(before[2]), _fetch(final[2]))
        assert np.array_equal(_fetch(before[1]), _fetch(final[1]))
        print(f"\nslider move -> new output in the browser: {latency * 1000:.0f} ms")

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        driver.execute_script("window.scrollTo(0, 0)")
        assert driver.save_screenshot(str(SCREENSHOT))
        shot = Image.open(SCREENSHOT)
        assert shot.size[0] >= 1000 and np.asarray(shot).std() > 10  # a real page, not a blank one
    finally:
        if driver is not None:
            driver.quit()
        app.close()
