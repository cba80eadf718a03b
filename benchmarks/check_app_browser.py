"""Check the demo app in a real browser: start `protoquant app` for a model folder, open it in headless Chromium
(Debian's `chromium`; never a downloaded browser), take a screenshot and check the page shows the prediction.

The app predicts its first example when the page loads, so the page text must contain that example's predicted
label, as `pipeline("image-classification")` gives it.

    apt-get install -y chromium chromium-driver && pip install selenium
    python benchmarks/check_app_browser.py --model outputs/demo --screenshot /tmp/app.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/demo", help="a trained model folder with examples/ (the main job writes one)")
    parser.add_argument("--screenshot", default="app_screenshot.png")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium not found: apt-get install -y chromium chromium-driver", file=sys.stderr)
        return 2
    examples = sorted(Path(args.model, "examples").glob("*.png"))
    if not examples:
        print(f"{args.model} has no examples/ to show; train it with `protoquant train` (which writes them).", file=sys.stderr)
        return 2
    from transformers import pipeline

    import protoquant_hf  # noqa: F401

    expected = pipeline("image-classification", model=args.model)(str(examples[0]), top_k=1)[0]["label"]
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    server = subprocess.Popen(
        [sys.executable, "-m", "protoquant_hf", "app", "--model", args.model, "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + args.timeout
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None:
                print(server.stderr.read()[-3000:], file=sys.stderr)
                return 2
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/"
        shown_label = read_prediction(browser, url, args.screenshot, args.timeout)
    finally:
        server.terminate()
        server.wait(timeout=30)
    shown = shown_label == expected
    print(f"page at {url}: the prediction box shows {shown_label!r}; pipeline('image-classification') says {expected!r}: "
          f"{'same' if shown else 'DIFFERENT'}; screenshot {args.screenshot} ({Path(args.screenshot).stat().st_size} bytes)")
    return 0 if shown else 1


def read_prediction(browser: str, url: str, screenshot: str, timeout: float) -> str | None:
    """Open the app in headless Chromium through Debian's chromedriver, wait for the prediction the page computes
    on load, screenshot the page and return the top label shown."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1600"):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
        try:
            driver.get(url)
            label = WebDriverWait(driver, timeout).until(
                lambda d: next((e.text for e in d.find_elements(By.CSS_SELECTOR, '[data-testid="label-output-value"]') if e.text), None)
            )
            time.sleep(1.0)  # let the figure render before the screenshot
            driver.save_screenshot(screenshot)
            return label.strip()
        finally:
            driver.quit()


if __name__ == "__main__":
    sys.exit(main())
