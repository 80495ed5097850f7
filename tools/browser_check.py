"""Opens a report's index.html in headless Chromium and says what rendered.

    python tools/browser_check.py WORKDIR/report [--screenshot docs/toy_report.png]

Prints, as JSON, the page's console errors, its tables (rows x columns and the header), its
images (source, loaded, natural size), its charts (the curves' lines) and its scatters (the
Pareto front's points and labels: drawn inside the chart or not, labels overlapping), and
exits 1 if the page logged an error or an image failed to load. With --screenshot, also writes
the whole page as a PNG.

Needs Debian's Chromium and ChromeDriver (`apt-get install chromium chromium-driver`, which
put them in /usr/bin) and selenium (the `test` extra); nothing is downloaded. tests/
test_report_browser.py runs it on a report it writes.
"""

import argparse
import base64
import json
import os
import sys
import tempfile

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Headless on a machine without a display or a network: no sandbox (root in a container), and
# none of Chromium's own connections (updates, sync, QUIC), which a closed network refuses.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")
WIDTH = 1280

_INSPECT = """
const cells = r => Array.from(r.cells).map(c => c.textContent.trim());
return {
  title: document.title,
  tables: Array.from(document.querySelectorAll('table')).map(t => ({
      rows: t.rows.length, columns: t.rows.length ? t.rows[0].cells.length : 0,
      header: t.rows.length ? cells(t.rows[0]) : [],
      body: Array.from(t.rows).slice(1).map(cells)})),
  images: Array.from(document.images).map(i => ({
      src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth,
      height: i.naturalHeight})),
  charts: document.querySelectorAll('svg:not(.scatter) polyline').length,
  scatters: Array.from(document.querySelectorAll('svg.scatter')).map(scatter),
  height: document.documentElement.scrollHeight,
};
"""
# A scatter (the Pareto front's): its points and labels, whether each is drawn inside the chart,
# and how many pairs of labels overlap.
_SCATTER = """
const scatter = s => {
  const box = s.getBoundingClientRect();
  const seen = e => {
    const b = e.getBoundingClientRect(), st = getComputedStyle(e);
    return st.visibility !== 'hidden' && st.display !== 'none' && b.width > 0 && b.height > 0
        && b.left >= box.left - 1 && b.right <= box.right + 1 && b.top >= box.top - 1
        && b.bottom <= box.bottom + 1;
  };
  const texts = Array.from(s.querySelectorAll('text.point'));
  const r = texts.map(t => t.getBoundingClientRect());
  let overlaps = 0;
  for (let i = 0; i < r.length; i++) for (let j = i + 1; j < r.length; j++)
    if (r[i].left < r[j].right && r[j].left < r[i].right && r[i].top < r[j].bottom
        && r[j].top < r[i].bottom) overlaps++;
  return {title: s.getAttribute('data-title'),
          points: Array.from(s.querySelectorAll('circle')).map(c => ({
              label: c.getAttribute('data-label'), front: c.classList.contains('front'),
              visible: seen(c)})),
          labels: texts.map(t => ({text: t.textContent, visible: seen(t)})),
          front_lines: s.querySelectorAll('polyline.front').length, label_overlaps: overlaps};
};
"""


def available() -> str | None:
  """None when the check can run here, else what is missing."""
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
  if missing:
    return (f"{' and '.join(missing)} not found: apt-get install chromium chromium-driver")
  try:
    import selenium  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return "selenium is not installed: pip install -e '.[test]'"
  return None


def check(page: str, screenshot: str | None = None) -> dict:
  """What rendered of `page` (a file): see the module docstring; `errors` lists the console's
  SEVERE messages (a missing image is one) and the images that did not load."""
  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel

  page = os.path.abspath(page)
  if not os.path.isfile(page):
    raise FileNotFoundError(f"{page} does not exist")
  with tempfile.TemporaryDirectory() as profile:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + (f"--user-data-dir={profile}", f"--window-size={WIDTH},900"):
      options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
      driver.get("file://" + page)
      found = driver.execute_script(_SCATTER + _INSPECT)
      found["console"] = [{"level": e["level"], "message": e["message"]}
                          for e in driver.get_log("browser")]
      if screenshot:  # the whole page, not only the window (DevTools' capture beyond it)
        shot = driver.execute_cdp_cmd("Page.captureScreenshot",
                                      {"format": "png", "captureBeyondViewport": True})
        os.makedirs(os.path.dirname(os.path.abspath(screenshot)), exist_ok=True)
        with open(screenshot, "wb") as f:
          f.write(base64.b64decode(shot["data"]))
    finally:
      driver.quit()
  found["errors"] = [e["message"] for e in found["console"] if e["level"] == "SEVERE"] + [
      f"image {i['src']} did not load" for i in found["images"]
      if not (i["complete"] and i["width"] > 0)]
  return found


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("report", help="a report folder (its index.html) or an HTML file")
  parser.add_argument("--screenshot", help="write the whole page to this PNG")
  args = parser.parse_args(argv)
  missing = available()
  if missing:
    print(missing, file=sys.stderr)
    return 2
  page = os.path.join(args.report, "index.html") if os.path.isdir(args.report) else args.report
  found = check(page, args.screenshot)
  print(json.dumps({k: v for k, v in found.items() if k != "console"}, indent=1))
  return 1 if found["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
