"""The report pages as a reader sees them: opened in headless Chromium, every image decoded,
every link leading to a file that exists, and a screenshot kept in the test's folder.

Chromium is Debian's package (scripts/test.sh installs it). Without it the tests skip, except in CI,
where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest

pytestmark = pytest.mark.e2e

# Run after the page and its images loaded: writes what the browser made of each image and
# link into the page, which --dump-dom then prints.
PROBE = """<script>addEventListener('load', () => {
  for (const img of document.images) img.dataset.naturalWidth = img.naturalWidth;
  for (const a of document.links) a.dataset.resolved = a.href;
  document.body.dataset.loaded = 'yes';
});</script>"""
# A hang guard only: Chromium renders these pages in about a second.
BROWSER_TIMEOUT = 120


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("headless Chromium expected in CI: scripts/test.sh installs Debian's chromium package")
    pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")


def browser(chromium: str, profile: Path, *args: str) -> str:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start; the pages are our own files.
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               f"--user-data-dir={profile}", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT, check=True).stdout


@dataclass
class RenderedPage:
    loaded: bool = False
    images: list[tuple[str, int]] = field(default_factory=list)  # (src, natural width in pixels; 0: not decoded)
    links: list[str] = field(default_factory=list)  # absolute URLs, as the browser resolved them


class DomReader(HTMLParser):
    def __init__(self):
        super().__init__()
        self.page = RenderedPage()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "body":
            self.page.loaded = values.get("data-loaded") == "yes"
        elif tag == "img":
            self.page.images.append((str(values.get("src")), int(values.get("data-natural-width") or 0)))
        elif tag == "a":
            self.page.links.append(str(values.get("data-resolved")))


def render(chromium: str, page: Path, work: Path) -> RenderedPage:
    """The page as Chromium loaded it. The probe goes into a copy beside the page, so relative paths resolve."""
    probe = page.with_name(f"{page.stem}.probe.html")
    probe.write_text(page.read_text() + PROBE)
    try:
        dom = browser(chromium, work / "profile", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    reader = DomReader()
    reader.feed(dom)
    return reader.page


def missing_target(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme != "file" or not Path(url2pathname(parsed.path)).is_file()


def check_in_browser(chromium: str, page: Path, work: Path) -> Path:
    """Every image decoded and every link leads to a file; returns the screenshot."""
    rendered = render(chromium, page, work)
    assert rendered.loaded, "the page's load event never fired"
    assert len(rendered.images) == page.read_text().count("<img") >= 3
    assert [src for src, width in rendered.images if width == 0] == [], "images that did not load"
    assert rendered.links, "the page links the numbers behind it"
    assert [url for url in rendered.links if missing_target(url)] == [], "broken links"
    screenshot = work / f"{page.parent.name}.png"
    browser(chromium, work / "profile", "--window-size=1200,2400", f"--screenshot={screenshot}", page.as_uri())
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank one
    return screenshot


def test_the_simulation_report_loads_every_figure_and_link_in_chromium(chromium, finished_run, tmp_path):
    check_in_browser(chromium, finished_run.out / "report.html", tmp_path)


def test_the_evaluation_report_loads_every_figure_and_link_in_chromium(chromium, finished_run, tmp_path):
    check_in_browser(chromium, finished_run.evaluation / "report.html", tmp_path)
