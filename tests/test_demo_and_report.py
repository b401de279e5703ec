"""`vlcurate demo --quick` end to end (the README's main command, shortened), and its report opened in a real
headless Chromium, which must load every figure and image."""

import json
import os
import re
import shutil
import subprocess

import pytest

from pipeline.demo import run_demo


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing on CI: .ci/run installs Debian's chromium package")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return binary


def rendered_body(page, profile) -> dict:
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", result.stdout)
    assert body, result.stderr[-2000:]
    return dict(re.findall(r'data-(\w+)="(\d+)"', body.group(1)))


@pytest.fixture(scope="module")
def demo(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    quality = run_demo(str(folder), quick=True)
    return folder, quality


@pytest.mark.slow
def test_quick_demo_runs_the_whole_loop(demo):
    folder, quality = demo
    for task in ("clip", "blip-captioner", "blip-itm", "diffusion"):
        assert (folder / "train" / task / "export").is_dir(), task
    final = json.loads((folder / "curated" / "stats.json").read_text())
    assert final["total"] == 800 and 0 < final["kept"] < final["total"]
    assert {row["stage"] for row in final["funnel"]} >= {"clip_score", "capfilt"}
    assert len(list((folder / "samples").glob("*.png"))) == 4
    # The rules alone already remove most of the noise they target, and keep most clean samples.
    rules = quality["rules"]["per_type"]
    for noise in ("emoji", "other_script", "too_short", "too_long", "tiny_image", "extreme_aspect", "corrupt_image"):
        assert rules[noise]["dropped_share"] >= 0.8, noise
    assert rules["clean"]["dropped_share"] < 0.1
    assert rules["html"]["dropped_share"] < 0.2 and rules["patterns"]["dropped_share"] < 0.5


@pytest.mark.slow
def test_report_loads_every_figure_and_image_in_chromium(demo, tmp_path):
    folder, _ = demo
    page = folder / "curated" / "report" / "index.html"
    body = rendered_body(page, tmp_path / "profile")
    assert int(body["figures"]) >= 6  # funnel, score histograms, loss curves
    assert int(body["images"]) > 20 and body["loaded"] == body["images"]
    assert (folder / "curated" / "report" / "funnel.png").is_file()


def test_report_marks_the_cutoff_actually_applied():
    from pipeline.report import cutoff_label
    from stages.model_scores import ClipScoreParams

    by_fraction = ClipScoreParams(threshold=-1.0, top_fraction=0.9)
    assert cutoff_label(by_fraction, "threshold", 0.2314, "below") == "cutoff 0.2314: top_fraction 0.9 kept (below fails)"
    fixed = ClipScoreParams(threshold=0.28)
    assert cutoff_label(fixed, "threshold", 0.28, "below") == "threshold 0.28 (below fails)"
