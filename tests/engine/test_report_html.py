"""report.html as a person sees it: rendered in headless Chromium, the screenshot checked with
Pillow (the plots are there and show the data), plus the page's safety properties (escaping, no
network references) and its behaviour on partial reports.

The subject is ``report_digits_compare.json``: the report.json of a real engine run (DARE on the
reference MLP for digits, all five attacks on 40 points, with ``compare: true``), written once by
``python -m tests.engine.test_report_html --regenerate`` (about 20 s on 2 cores, so not per test
session). ``python -m tests.engine.test_report_html --screenshot PATH`` saves the screenshot the
test looks at.

Needs Debian's ``chromium`` (``apt-get install chromium``; ``.ci/run`` installs it): the test
fails, not skips, without it.
"""
from __future__ import annotations

import copy
import html
import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.engine import report_html as H
from worker.engine.report_html import render_html

FIXTURE = Path(__file__).with_name("report_digits_compare.json")
WIDTH, HEIGHT = 1280, 4000  # tall enough for the whole page: no scrolling, one screenshot
# Collects where every chart and section landed, into an attribute --dump-dom prints. Only the
# probe copy of the page carries it; the screenshot is of the page exactly as served.
PROBE = """<script>
const r = {};
for (const el of document.querySelectorAll('svg[data-chart], section[id]')) {
  const b = el.getBoundingClientRect();
  r[el.dataset.chart || ('#' + el.id)] = [b.left + scrollX, b.top + scrollY, b.right + scrollX,
                                          b.bottom + scrollY];
}
// The content's end: with a viewport taller than the page, scrollHeight is the viewport's.
r.page = [0, 0, document.documentElement.scrollWidth,
          Math.ceil(document.querySelector('main').getBoundingClientRect().bottom + scrollY)];
document.documentElement.setAttribute('data-probe', JSON.stringify(r));
</script>"""


def _load() -> dict:
    return json.loads(FIXTURE.read_text())


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if exe := shutil.which(name):
            return exe
    pytest.fail("headless Chromium is needed to check that report.html renders, and none is on "
                "PATH. Install Debian's package: apt-get install chromium (.ci/run does this)")


def _chromium_run(exe: str, profile: Path, url: str, *args: str) -> str:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-extensions", "--mute-audio", "--force-device-scale-factor=1",
           f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", *args, url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"chromium failed ({p.returncode}): {p.stderr[-2000:]}"
    return p.stdout


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)


@dataclass
class Rendered:
    html: str
    image: np.ndarray                       # (H, W, 3) uint8, cropped to the page
    boxes: dict[str, tuple[int, int, int, int]]  # chart name or '#section-id' -> x0, y0, x1, y1
    png: Path

    def region(self, name: str) -> np.ndarray:
        x0, y0, x1, y1 = self.boxes[name]
        return self.image[y0:y1, x0:x1]

    def count(self, name: str, colour: str, tol: int = 6) -> int:
        """Pixels of ``colour`` (within ``tol`` per channel) inside the box of ``name``."""
        diff = np.abs(self.region(name).astype(np.int16) - _rgb(colour))
        return int((diff <= tol).all(axis=-1).sum())

    def bar_length(self, name: str, colour: str, tol: int = 6) -> int:
        """The typical length (px) of horizontal bars of ``colour`` in the box of ``name``."""
        rows = (np.abs(self.region(name).astype(np.int16) - _rgb(colour)) <= tol).all(-1).sum(1)
        return int(np.median(rows[rows > 0])) if rows.any() else 0


def render(report: dict, out: Path) -> Rendered:
    """Screenshot the page and, in parallel, measure its layout from a probe copy."""
    exe = _chromium()
    out.mkdir(parents=True, exist_ok=True)
    page = render_html(report)
    (out / "report.html").write_text(page, encoding="utf-8")
    (out / "probe.html").write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    png = out / "screenshot.png"
    with ThreadPoolExecutor(2) as pool:
        shot = pool.submit(_chromium_run, exe, out / "profile-shot", (out / "report.html").as_uri(),
                           f"--screenshot={png}")
        dom = pool.submit(_chromium_run, exe, out / "profile-dom", (out / "probe.html").as_uri(),
                          "--dump-dom")
        shot.result()
        m = re.search(r'data-probe="([^"]*)"', dom.result())
    assert m, "the probe script did not run in Chromium"
    boxes = {k: tuple(round(v) for v in b) for k, b in json.loads(html.unescape(m.group(1))).items()}
    page_h = boxes.pop("page")[3]
    assert page_h <= HEIGHT, f"the page is {page_h} px tall; raise HEIGHT to screenshot all of it"
    image = np.asarray(Image.open(png).convert("RGB"))[:page_h]
    return Rendered(page, image, boxes, png)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Rendered:
    return render(_load(), tmp_path_factory.mktemp("full"))


def _bar_shares(attacks: dict) -> dict[str, float]:
    """Each series' share of the total bar area: bars are equally wide, heights are the values."""
    sums = {key: sum(a[key] or 0.0 for a in attacks.values()) for key, _, _ in H.SERIES}
    total = sum(sums.values())
    return {k: v / total for k, v in sums.items()}


def _check_attack_bars(r: Rendered, attacks: dict) -> None:
    counts = {key: r.count("attacks", colour) for key, _, colour in H.SERIES}
    for key, n in counts.items():
        assert n > 3000, f"{key} bars barely rendered ({n} px): {counts}"
    shares = _bar_shares(attacks)
    total = sum(counts.values())
    for key, n in counts.items():  # the bars are as tall as the numbers say
        assert n / total == pytest.approx(shares[key], abs=0.02), (key, counts, shares)


def test_page_renders_every_plot_in_chromium(full):
    rep = _load()
    img = full.image
    assert img.shape[0] > 1500 and img.shape[1] == WIDTH
    background = (np.abs(img.astype(np.int16) - _rgb("#f4f6f8")) <= 2).all(-1)
    assert 0.15 < 1 - background.mean() < 0.9, "the page is blank or one colour"
    packed = (img[..., 0].astype(np.int32) << 16) | (img[..., 1].astype(np.int32) << 8) | img[..., 2]
    assert len(np.unique(packed)) > 200  # text, anti-aliasing and charts, not a flat fill

    for name in ("attacks", "clean", "pgd", "timings", "#comparison", "#sanity", "#settings"):
        assert name in full.boxes, f"{name} is missing from the rendered page: {sorted(full.boxes)}"
        x0, y0, x1, y1 = full.boxes[name]
        assert 0 <= x0 < x1 <= WIDTH and 0 <= y0 < y1 <= img.shape[0] and (x1 - x0) * (y1 - y0) > 20000
    charts = [full.boxes[n] for n in ("attacks", "clean", "pgd", "timings")]
    for i, a in enumerate(charts):  # no plot is drawn over another
        for b in charts[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)

    _check_attack_bars(full, rep["attacks"])

    # clean accuracy: both bars, in proportion, and the budget line
    ca = rep["clean_accuracy"]
    o, h = full.bar_length("clean", H.ORIGINAL), full.bar_length("clean", H.HARDENED)
    assert o > 200 and h > 200
    assert o / h == pytest.approx(ca["original"] / ca["hardened"], rel=0.02)
    assert full.count("clean", H.BUDGET) > 80

    # PGD curve: original and hardened bold, the recommended method, the others in grey
    for colour in (H.ORIGINAL, H.HARDENED, H.RECOMMENDED):
        assert full.count("pgd", colour) > 150, colour
    assert full.count("pgd", H.OTHER, tol=2) > 200  # tight: anti-aliased grey text comes close

    assert full.count("timings", H.TIMING) > 1500
    # the recommended row is highlighted; one sanity check failed among many passes
    assert full.count("#comparison", "#e4f1fa") > 5000
    assert full.count("#sanity", H.PASS, tol=2) > 20 * full.count("#sanity", H.FAIL, tol=2) > 0


def test_page_without_comparison_and_with_a_failed_attack_still_renders(tmp_path):
    rep = _load()
    rep["comparison"] = None
    rep["pgd_curve"] = {k: v for k, v in rep["pgd_curve"].items() if k in ("eps", "original", "dare")}
    rep["attacks"]["cw"].update(transfer_er=None, adaptive_accuracy=None)  # the attack failed
    rep["attacks"]["jsma"]["adaptive_accuracy"] = None
    del rep["timings_s"]["compare"]
    r = render(rep, tmp_path)
    assert "#comparison" not in r.boxes and "Method comparison" not in r.html
    _check_attack_bars(r, rep["attacks"])
    assert r.html.count(">n/a</text>") == 3
    assert r.count("pgd", H.ORIGINAL) > 150 and r.count("pgd", H.HARDENED) > 150
    assert r.count("pgd", H.RECOMMENDED) == 0 and r.count("pgd", H.OTHER, tol=2) == 0
    assert r.count("clean", H.HARDENED) > 3000 and r.count("timings", H.TIMING) > 300


# --- the page's text, without a browser ----------------------------------------------------

EVIL = '<script>alert(1)</script>" onmouseover="alert(2)'


def test_every_user_string_is_escaped():
    rep = _load()
    rep["config"]["dataset"] = EVIL
    rep["config"]["note"] = EVIL
    rep["mining"]["window"] = [f"{EVIL}.safetensors"]  # history file names from the user's zip
    rep["slicing"]["layers_in_mt"] = [EVIL]               # node names from the user's graph
    rep["method"] = EVIL
    rep["attacks"][EVIL] = rep["attacks"].pop("jsma")
    rep["attacks"]["fgsm"]["params"]["eps"] = EVIL
    rep["sanity_checks"][0].update(name=f"{EVIL}: {EVIL}", detail=EVIL)
    rep["timings_s"][EVIL] = 1.0
    rep["pgd_curve"][EVIL] = rep["pgd_curve"].pop("dare")
    rep["comparison"]["methods"][EVIL] = rep["comparison"]["methods"].pop("dare_adv")
    rep["comparison"]["recommended"] = EVIL
    page = render_html(rep)
    assert not re.search(r"<script", page, re.I)
    assert 'onmouseover="' not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;&quot; onmouseover=&quot;") >= 12
    # the file name is shown (inside a JSON list, hence the backslashes), escaped
    assert re.search(r"&lt;script&gt;alert\(1\)&lt;/script&gt;\\&quot; onmouseover=\\&quot;"
                     r"alert\(2\)\.safetensors", page)
    assert 'class="rec"' in page  # the escaped name still finds its row


def test_page_references_nothing_on_the_network():
    page = render_html(_load())
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|img|iframe|object|embed|frame|audio|video|source)\b", page, re.I)
    assert not re.search(r"\b(src|href|srcset|action|xlink:href)\s*=", page, re.I)
    assert "url(" not in page and "@import" not in page and "@font-face" not in page


def test_webhook_url_in_the_config_is_redacted():
    rep = _load()
    rep["config"]["webhook_url"] = "https://hooks.example.com/T0KEN"
    page = render_html(rep)
    assert "T0KEN" not in page and "(redacted)" in page


def test_headline_verdicts():
    rep = _load()
    page = render_html(rep)  # DARE went 44.5% -> 47.5% mean adaptive over the five attacks:
    # +3 points with overlapping 95% intervals is a tie, not a rise
    assert ">TIE<" in page and "RAISED" not in page
    assert "WITHIN BUDGET" in page and "77 / 78 PASSED" in page
    assert "44.5% → 47.5%" in page and "within the sampling noise" in page

    better = copy.deepcopy(rep)
    for a in better["attacks"].values():
        a["adaptive_accuracy"] = min(1.0, (a["original_accuracy"] or 0.0) + 0.3)
    assert ">RAISED<" in render_html(better)

    worse = copy.deepcopy(rep)
    for a in worse["attacks"].values():
        a["adaptive_accuracy"] = max(0.0, a["original_accuracy"] - 0.3)  # beyond the intervals
    worse["clean_accuracy"].update(hardened=0.8, drop=0.153, within_budget=False)
    page = render_html(worse)
    assert "LOWERED" in page and "OVER BUDGET" in page and "did not raise" in page

    blind = copy.deepcopy(rep)
    for a in blind["attacks"].values():
        a["adaptive_accuracy"] = None
    assert "NOT MEASURED" in render_html(blind)


@pytest.mark.parametrize("partial", [
    {},
    {"schema_version": 1, "attacks": {}, "sanity_checks": []},
    # the service's stand-in engine writes this much (no curve, no comparison, no method)
    {"schema_version": 1, "config": {"seed": 0}, "timings_s": {"slice": 0.1, "tune": None},
     "clean_accuracy": {"original": 0.9, "hardened": 0.88, "drop": 0.02, "budget": 0.1,
                        "within_budget": True},
     "attacks": {"fgsm": {"params": {"eps": 0.1}, "n": 10, "original_accuracy": 0.2,
                          "transfer_er": float("nan"), "adaptive_accuracy": 0.3}},
     "sanity_checks": [{"name": "iterative_beats_single_step", "passed": True, "detail": ""}],
     "pgd_curve": {"eps": [0.0], "original": [0.9]}, "comparison": {"methods": {}}},
])
def test_partial_reports_render(partial):
    page = render_html(partial)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "n/a" in page or "No attack results" in page


# --- maintenance: regenerate the fixture, save a screenshot ---------------------------------

def _regenerate(out: Path) -> None:
    import tempfile

    import torch

    from worker.cli import main as cli
    from worker.engine.reference.train import train_reference

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        train_reference("mlp", "digits", 6, Path(tmp) / "subject", seed=0)
        cfg = {"evaluation": {"n_samples": 40, "attacks": ["fgsm", "bim", "pgd", "cw", "jsma"]},
               "tune": {"epochs": 3}, "baselines": {"max_train": 100},
               "selection": {"dare": {"epochs": [3], "lr": [3e-3], "history_fraction": [0.5]},
                             "adversarial": {"epochs": [1], "lr": [1e-3]}},
               "compare": True, "seed": 0}
        rc = cli(["harden", "--model", f"{tmp}/subject/model.onnx", "--history",
                  f"{tmp}/subject/history.zip", "--dataset", "digits", "--out", f"{tmp}/out",
                  "--config", json.dumps(cfg)])
        assert rc == 0
        shutil.copyfile(f"{tmp}/out/report.json", out)


def _save_screenshot(dest: Path) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        r = render(_load(), Path(tmp))
        # A palette keeps the PNG a third of the size; octree keeps the rare series colours
        # (median cut merged the one purple line into grey).
        Image.fromarray(r.image).quantize(256, method=Image.Quantize.FASTOCTREE,
                                          dither=Image.Dither.NONE).save(dest, optimize=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--regenerate"]:
        _regenerate(FIXTURE)
    elif sys.argv[1:2] == ["--screenshot"] and len(sys.argv) == 3:
        _save_screenshot(Path(sys.argv[2]))
    else:
        raise SystemExit("usage: python -m tests.engine.test_report_html --regenerate | --screenshot PATH")


def _minimal_report(orig: list[float | None], hard: list[float | None]) -> dict:
    """A minimal-protocol report whose attacks have these median sizes (None: infinite), and an
    adaptive accuracy that a failed attack on a few points has pushed up (what used to decide)."""
    rep = {"method": "dare", "protocol": "minimal", "clean_accuracy": {
        "original": 0.9, "hardened": 0.9, "drop": 0.0, "budget": 0.1, "within_budget": True},
        "sanity_checks": [], "attacks": {}}
    for name, o, h in zip(("fgsm", "pgd", "jsma"), orig, hard):
        rep["attacks"][name] = {
            "n": 90, "original_accuracy": 0.0, "adaptive_accuracy": 0.3, "transfer_er": 0.5,
            "minimal_perturbation": {
                "norm": "linf",
                "original": {"n": 90, "median": o, "q1": o, "q3": None, "failed": 30},
                "hardened": {"n": 90, "median": h, "q1": h, "q3": None, "failed": 30}}}
    return rep


def test_minimal_protocol_verdict_is_the_perturbation_size_not_adaptive_accuracy():
    same = H.headline(_minimal_report([0.08, 0.08, 6.0], [0.081, 0.079, 6.0]))
    assert "NO CLEAR CHANGE" in same and "RAISED" not in same  # adaptive 0% -> 30% is not it
    larger = H.headline(_minimal_report([0.08, 0.08, 6.0], [0.1, 0.12, None]))
    assert "LARGER" in larger and "larger in 3 of 3" in larger
    smaller = H.headline(_minimal_report([0.08, 0.08, 6.0], [0.05, 0.06, 6.0]))
    assert "SMALLER" in smaller
    # an unreachable quartile is infinity, not 0
    page = render_html(_minimal_report([0.08, 0.08, 6.0], [0.1, 0.12, None]))
    assert "to ∞" in page and "to 0;" not in page
