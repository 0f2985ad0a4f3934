"""The HTML report: its metrics table, that it is self-contained, its errors, and that it renders in a real headless
browser (Debian chromium driven by playwright) with the plotly surface drawn and no console errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from test_figures import (
    describe_run,
    save_hessian,
    save_interpolation,
    save_surface,
    write_comparison,
    write_run,
)

from landscape.core.errors import CheckpointError, ConfigError

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A report of one FSAM run with a 2-D surface (NaN cells included), a Hessian and an interpolation."""
    from figures import build_report

    root = tmp_path_factory.mktemp("report")
    run = write_run(root / "cola-fsam", sam="fsam", mcc=-0.12)
    described = describe_run(run, sam="fsam")
    save_surface(
        run / "analyses" / "surface-2d",
        described,
        np.linspace(-1, 1, 21),
        np.linspace(-0.6, 0.6, 13),
        nan_cells=[(6, 10), (6, 11), (7, 10)],
    )
    save_hessian(run / "analyses" / "hessian", described, 20.0)
    save_interpolation(root / "interpolation", described, 1.0)
    return build_report([run, root / "interpolation"], root / "out" / "report.html", title="CoLA <FSAM>")


def test_metrics_table_has_one_row_per_run_with_the_analyses_scalars(tmp_path):
    from figures import collect, metrics_table

    columns, rows = metrics_table(collect(write_comparison(tmp_path)))
    assert [row["optimizer"] for row in rows] == ["adamw", "adamw+fsam"]  # the transfer result joins its source run
    adamw, fsam = rows
    assert adamw["task"] == "cola" and adamw["dev mcc"] == 0.3 and fsam["dev mcc"] == 0.35
    assert adamw["top Hessian eigenvalue"] == 400.0 and fsam["top Hessian eigenvalue"] == 100.0
    assert fsam["Hessian trace ± SE"] == "300 ± 0.5"
    assert adamw["2-D surface loss at (0, 0)"] == pytest.approx(0.1)
    assert adamw["1-D surface loss at 0"] == pytest.approx(0.1)
    assert fsam["ε-sharpness ρ=0.05 (1 step)"] == pytest.approx(0.05**2 * 100 - 1e-4)
    assert fsam["ε-sharpness ρ=0.05 (PGD)"] == pytest.approx(0.05**2 * 150)
    assert adamw["interpolation loss at θ0"] == pytest.approx(4 * 0.95**2 + 0.05)  # α = −1 of 4 (α + 0.05)² + 0.05
    assert fsam["Fisher trace"] == 1.5
    assert columns[:4] == ["run", "task", "optimizer", "seed"]


def test_report_is_one_self_contained_page(report):
    html = report.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "<title>CoLA &lt;FSAM&gt;</title>" in html  # text is escaped
    markup = re.sub(r"<script[^>]*>.*?</script>", "", html, flags=re.S)  # plotly.js itself mentions URLs
    assert "<script src=" not in html and not re.search(r"""(src|href)=["']?(https?:)?//""", markup)
    figures = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', html)
    assert len(figures) == 6  # 3 surface views, interpolation, training curves, Hessian spectrum
    assert html.count('class="plot"') == 1 and len(html) > 1_000_000  # plotly.js inlined once
    assert "<td>-0.12</td>" in html  # the dev metric of run.json, negative
    assert "<td>20</td>" in html  # the top Hessian eigenvalue
    assert not list(report.parent.glob(".*.tmp"))  # written atomically, no leftovers


def test_report_refuses_what_is_neither_a_run_nor_a_result(tmp_path, capsys):
    from figures import build_report
    from landscape.cli.main import main

    with pytest.raises(CheckpointError, match="does not exist"):
        build_report([tmp_path / "missing"], tmp_path / "r.html")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match=r"plain is neither a run directory \(no run.json\)"):
        build_report([tmp_path / "plain"], tmp_path / "r.html")
    assert main(["report", str(tmp_path / "plain"), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("landscape report: error:") and err.count("\n") == 1
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(ConfigError, match="is a directory; expected the HTML file"):
        build_report([tmp_path / "plain"], tmp_path)


def _launch_chromium():
    in_ci = bool(os.environ.get("CI"))
    if not CHROMIUM.exists():
        if in_ci:
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian chromium before the tests")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); the browser test needs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if in_ci:
            pytest.fail("playwright is not installed; pip install -e '.[test]'")
        pytest.skip("playwright not installed (pip install -e '.[test]')")
    return sync_playwright


def test_report_renders_in_headless_chromium(report):
    from PIL import Image

    sync_playwright = _launch_chromium()
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
            page.on(
                "request",
                lambda r: (
                    None
                    if r.url.split(":")[0] in ("file", "data", "blob")
                    else problems.append(f"network request: {r.url}")
                ),
            )
            page.goto(report.as_uri(), wait_until="load")
            page.wait_for_selector("#surface-0 .main-svg", timeout=30_000)  # plotly has drawn its scene
            page.wait_for_timeout(500)
            assert page.evaluate("() => document.querySelector('#surface-0 canvas') !== null")  # the WebGL scene
            images = page.evaluate("() => Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
            assert images and all(images)  # every embedded figure decoded
            assert page.locator("table tbody tr").count() == 1
            shot = report.parent / "surface.png"
            page.locator("#surface-0").screenshot(path=str(shot))
        finally:
            browser.close()
    assert problems == []
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    colours = np.unique(pixels, axis=0)
    assert len(colours) > 500, f"the surface screenshot looks blank ({len(colours)} colours)"
    # Viridis' dark purple end (the minimum of the bowl) is on screen, not only the white page and grey axes.
    purple = (pixels[:, 0] > 50) & (pixels[:, 0] < 90) & (pixels[:, 1] < 40) & (pixels[:, 2] > 70)
    assert purple.sum() > 50
