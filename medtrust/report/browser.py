"""Open a report in headless Chromium: a screenshot, and a count of images the browser could not
decode (checked by the browser itself, not by parsing the HTML)."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
PROBE = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
         "document.body.setAttribute('data-images',im.length);"
         "document.body.setAttribute('data-broken',im.filter(i=>!i.complete||i.naturalWidth===0).length);});</script>")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def check_report(html_path: str | Path, screenshot: str | Path, timeout: int = 120) -> dict[str, int]:
    """Render ``html_path`` headless: write ``screenshot`` (PNG) and return ``{"images", "broken"}``.

    Raises:
        FileNotFoundError: no Chromium on this machine (Debian: ``apt-get install chromium``).
        RuntimeError: Chromium failed or the page did not finish loading.
    """
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium binary found (Debian package 'chromium')")
    html_path, screenshot = Path(html_path).resolve(), Path(screenshot).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(html_path.read_text().replace("</body>", PROBE + "</body>"))
        common = [exe, *FLAGS, f"--user-data-dir={tmp}/profile", "--virtual-time-budget=10000"]
        dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=timeout)
        shot = subprocess.run([*common, f"--screenshot={screenshot}", "--window-size=1280,2000", html_path.as_uri()],
                              capture_output=True, text=True, timeout=timeout)
    m_img = re.search(r'data-images="(\d+)"', dom.stdout)
    m_bad = re.search(r'data-broken="(\d+)"', dom.stdout)
    if dom.returncode != 0 or not m_img or not m_bad:
        raise RuntimeError(f"chromium could not load {html_path}: rc {dom.returncode}, {dom.stderr[-500:]}")
    if shot.returncode != 0 or not screenshot.is_file():
        raise RuntimeError(f"chromium screenshot failed: rc {shot.returncode}, {shot.stderr[-500:]}")
    return {"images": int(m_img.group(1)), "broken": int(m_bad.group(1))}


def rendered_dom(html_path: str | Path, timeout: int = 120) -> str:
    """The page's DOM after Chromium loaded it and ran whatever scripts it holds (``--dump-dom``): what a
    reader's browser would show, attributes set by any script included.

    Raises:
        FileNotFoundError: no Chromium on this machine.
        RuntimeError: Chromium failed.
    """
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium binary found (Debian package 'chromium')")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([exe, *FLAGS, f"--user-data-dir={tmp}/profile", "--virtual-time-budget=10000",
                               "--dump-dom", Path(html_path).resolve().as_uri()], capture_output=True, text=True,
                              timeout=timeout)
    if proc.returncode != 0 or "<html" not in proc.stdout:
        raise RuntimeError(f"chromium could not load {html_path}: rc {proc.returncode}, {proc.stderr[-500:]}")
    return proc.stdout

