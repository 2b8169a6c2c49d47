"""Publish the asv dashboard and check that it renders in a real browser.

    python -m benchmarks.dashboard [--out dashboard.png] [--benchmark NAME]

Runs ``asv publish`` (results in ``.asv/results`` -> site in ``.asv/html``), serves the
site on 127.0.0.1 for the length of the check, opens the graph page of one benchmark
in headless Chromium (Debian's ``chromium``, ``--no-sandbox --headless``) and saves a
screenshot.  Exits non-zero when the page does not render (a blank screenshot).

To look at the dashboard yourself: ``asv preview`` (serves ``.asv/html``) and open the
address it prints.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


#: asv's page loads these from CDNs; this machine (and many CI runners) has no internet.
#: Debian packages them: apt-get install libjs-jquery libjs-jquery-flot libjs-bootstrap
#: libjs-jquery-stupidtable node-blueimp-md5.  Flot 4 (Debian's) keeps the 0.8 API.
JS = "/usr/share/javascript"
VENDOR = {
    "jquery-3.3.1.min.js": f"{JS}/jquery/jquery.min.js",
    "jquery.flot.min.js": f"{JS}/jquery-flot/jquery.flot.pack.js",
    "jquery.flot.time.min.js": f"{JS}/jquery-flot/jquery.flot.time.min.js",
    "jquery.flot.selection.min.js": f"{JS}/jquery-flot/jquery.flot.selection.min.js",
    "jquery.flot.categories.min.js": f"{JS}/jquery-flot/jquery.flot.categories.min.js",
    "stupidtable.min.js": f"{JS}/jquery-stupidtable/stupidtable.min.js",
    "md5.min.js": f"{JS}/blueimp-md5/md5.min.js",
    "bootstrap.min.js": f"{JS}/bootstrap/js/bootstrap.min.js",
    "bootstrap.min.css": f"{JS}/bootstrap/css/bootstrap.min.css",
}
#: the bar-ordering plugin has no Debian package; the graphs this dashboard shows are lines
ORDERBARS_STUB = ("(function ($) { $.plot.plugins.push({init: function () {}, name: 'orderBars', "
                  "version: 'stub'}); })(jQuery);\n")


def vendor_assets(html: Path) -> list[str]:
    """Point index.html at local copies of its CDN scripts; returns what is still remote."""
    import re

    index = html / "index.html"
    text = index.read_text()
    (html / "vendor").mkdir(exist_ok=True)
    missing = []
    for url in re.findall(r'(?:src|href)="(https://[^"]+\.(?:js|css))"', text):
        name = url.rsplit("/", 1)[1]
        if name == "jquery.flot.orderBars.js":
            (html / "vendor" / name).write_text(ORDERBARS_STUB)
        elif name in VENDOR and Path(VENDOR[name]).exists():
            shutil.copyfile(VENDOR[name], html / "vendor" / name)
        else:
            missing.append(url)
            continue
        text = text.replace(url, f"vendor/{name}")
    # the subresource-integrity hashes name the CDN builds; the local copies differ
    text = re.sub(r'(src|href)="(vendor/[^"]+)"\s+integrity="[^"]*"', r'\1="\2"', text)
    # flot 4 draws its legend as SVG and leaves the styling to the page
    legend_css = ("<style>.legendLayer .background { fill: rgba(255,255,255,0.85); "
                  "stroke: rgba(0,0,0,0.85); stroke-width: 1; } .legendLayer text { fill: #333; }</style>")
    if legend_css not in text:
        text = text.replace("</head>", legend_css + "\n</head>", 1)
    index.write_text(text)
    return missing


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found: apt-get install chromium")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / ".asv" / "dashboard.png"))
    parser.add_argument("--benchmark", default="bench_training.TrainingStep.time_step")
    args = parser.parse_args(argv)
    subprocess.run([sys.executable, "-m", "asv", "publish"], cwd=ROOT, check=True)
    html = ROOT / ".asv" / "html"
    missing = vendor_assets(html)
    if missing:
        print("still loaded from the internet (install Debian's libjs-* packages): " + ", ".join(missing),
              file=sys.stderr)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(html))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/#{args.benchmark}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    chrome = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--window-size=1400,900", "--virtual-time-budget=8000"]
    try:
        subprocess.run(chrome + [f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)
        dom = subprocess.run(chrome + ["--dump-dom", url], check=True, capture_output=True, text=True,
                             timeout=120).stdout
    finally:
        server.shutdown()
        server.server_close()
    if not out.exists():
        print(f"no screenshot was written for {url}", file=sys.stderr)
        return 1
    if "continental origin" in dom or "flot-base" not in dom:
        print(f"the dashboard did not draw its graph (see {out})", file=sys.stderr)
        return 1
    try:
        from PIL import Image

        pixels = np.asarray(Image.open(out).convert("L"), dtype=float)
        if pixels.std() < 5:
            print(f"the dashboard page looks blank: {out}", file=sys.stderr)
            return 1
    except ImportError:
        pass
    print(f"dashboard for {args.benchmark} rendered: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
