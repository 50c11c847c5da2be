"""The OHIF viewer build and headless Chromium for the browser tests (and bench/viewer).

- `ohif_dir()`: OHIF's built files, fetched once by `scripts/fetch-viewer` into ~/.cache (or $OHIF_DIR).
- `browser()`: Debian's Chromium driven by Playwright (`playwright install` cannot download browsers here).
- `PageWatch`: everything that went wrong on a page: failed requests, HTTP errors, console errors,
  uncaught exceptions.
- `canvas_stats()`: what the viewport's canvas shows, to tell an image from a blank viewport.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OHIF_VERSION = "3.13.2"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "tests" / "integration" / "artifacts"


def ohif_dir() -> Path:
    """OHIF's dist/, fetched by scripts/fetch-viewer if it is not there yet (a no-op when it is)."""
    path = Path(os.environ.get("OHIF_DIR", Path.home() / ".cache" / "dicom-gateway" / f"ohif-{OHIF_VERSION}"))
    subprocess.run([str(REPO / "scripts" / "fetch-viewer"), str(path)], check=True, timeout=900,
                   env={**os.environ, "OHIF_VERSION": OHIF_VERSION})
    assert (path / "index.html").is_file(), f"no OHIF build in {path}"
    return path


@contextlib.contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise AssertionError(f"{CHROMIUM} missing: apt-get install chromium (scripts/test does)")
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start. WebGL through
        # SwiftShader (software), since a CI machine has no GPU: OHIF renders with WebGL.
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                  "--ignore-gpu-blocklist"],
        )
        try:
            yield b
        finally:
            b.close()


@dataclass
class PageWatch:
    """Problems seen on a page since it was opened (or since `clear()`)."""

    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: list = field(default_factory=list)

    def attach(self, page) -> "PageWatch":
        page.on("requestfailed", lambda r: self.failed.append(f"{r.method} {r.url}: {r.failure}"))
        page.on("response", self._response)
        page.on("console", lambda m: m.type == "error" and self.errors.append(
            f"console: {m.text} (at {m.location.get('url', '?')})"))
        page.on("pageerror", lambda e: self.errors.append(f"exception: {e}"))
        page.on("requestfinished", lambda r: self.requests.append(r))
        return self

    def _response(self, response) -> None:
        if response.status >= 400:
            self.failed.append(f"{response.request.method} {response.url}: HTTP {response.status}")

    def clear(self) -> None:
        self.failed.clear()
        self.errors.clear()
        self.requests.clear()

    def problems(self) -> list[str]:
        return self.failed + self.errors


# The canvas's pixels (its 2D context: cornerstone draws each rendered image there), summarised in the page.
_CANVAS_STATS = """(canvas) => {
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  if (!ctx || canvas.width === 0 || canvas.height === 0) return null;
  const { data } = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const seen = new Set();
  let lit = 0;
  for (let i = 0; i < data.length; i += 4) {
    const v = data[i] + data[i + 1] + data[i + 2];
    if (v > 30) lit++;
    if (seen.size < 64) seen.add(v);
  }
  return { width: canvas.width, height: canvas.height, distinct: seen.size, lit: lit / (data.length / 4) };
}"""


def canvas_stats(page, selector: str = "canvas.cornerstone-canvas"):
    """{width, height, distinct (grey levels seen, up to 64), lit (share of pixels not near black)} of the
    first viewport canvas, or None when there is none yet."""
    canvas = page.query_selector(selector)
    if canvas is None:
        return None
    return canvas.evaluate(_CANVAS_STATS)
