"""The web page in Debian's Chromium (playwright drives it; it downloads nothing): what a person sees and does."""

from __future__ import annotations

import base64
import os

import cv2
import numpy as np
import pytest
from conftest import random_images

from onnxcam.core.files import encode_png
from onnxcam.serving import create_app, serving

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, small_onnx):
    with serving(create_app(small_onnx, name="small", provider="cpu")) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page.goto(url)
        yield page
        page.close()


@pytest.fixture(scope="module")
def detector_page(browser, tmp_path_factory):
    """The page of a tiny YOLOv8-layout detector (its file's score output is a detection head)."""
    from test_targets import TinyYolo, _explainable

    folder = tmp_path_factory.mktemp("detector")
    _explainable(TinyYolo().eval(), folder, "backbone.3")
    with serving(create_app(folder / "explain.onnx", name="yolo", provider="cpu")) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        yield page
        page.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A smooth picture (blurred noise): the overlay's colours then stand out from it."""
    image = cv2.GaussianBlur(random_images(1, seed=4, size=(120, 160))[0], (31, 31), 0)
    path = tmp_path_factory.mktemp("page") / "photo.png"
    path.write_bytes(encode_png(image))
    return path


def _shot(locator) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(locator.screenshot(), np.uint8), cv2.IMREAD_COLOR).astype(np.float32)


def test_original_and_overlay_side_by_side_with_an_opacity_slider(page, photo):
    page.select_option("#method", "layercam")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#overlay[data-drawn]")
    original, overlay = page.locator("#original"), page.locator("#overlay")
    left, right = original.bounding_box(), overlay.bounding_box()
    assert right["x"] >= left["x"] + left["width"] - 1 and abs(right["y"] - left["y"]) < 2  # side by side
    page.locator("#opacity").fill("0")
    plain = _shot(overlay)
    assert np.abs(plain - _shot(original)).mean() < 3  # opacity 0: the original alone
    page.locator("#opacity").fill("100")
    heat = _shot(overlay)
    assert np.abs(heat - plain).mean() > 20  # the heatmap is drawn over it
    saturation = cv2.cvtColor(heat.astype(np.uint8), cv2.COLOR_BGR2HSV)[..., 1]
    assert np.median(saturation) > 150  # in the colormap's saturated colours, not the grey-ish photo
    page.locator("#opacity").fill("45")


def test_top_classes_are_items_to_click_and_to_reach_by_keyboard(page, photo):
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#classes button")
    items = page.locator("#classes button")
    assert items.count() == 5 and page.locator("#classes button[aria-pressed='true']").count() == 1
    assert items.nth(0).get_attribute("data-kind") == "class"
    assert page.input_value("#task") == "classify" and page.inner_text("#targets-title") == "Top classes"
    first = _shot(page.locator("#overlay"))
    other = items.nth(3).get_attribute("data-class")
    items.nth(3).click()
    page.wait_for_selector(f"#classes button[aria-pressed='true'][data-class='{other}']")
    assert f"class {other}" in page.inner_text("#overlay-caption")
    assert np.abs(_shot(page.locator("#overlay")) - first).mean() > 1  # that class's map is shown
    chosen = page.locator("#classes button[aria-pressed='true']")
    chosen.focus()
    page.keyboard.press("ArrowDown")
    focused = page.evaluate("document.activeElement.dataset.class")
    assert focused != other
    page.keyboard.press("Enter")
    page.wait_for_selector(f"#classes button[aria-pressed='true'][data-class='{focused}']")


def test_every_method_the_file_supports_in_a_comparison_grid(page, photo, small_onnx):
    from onnxcam import Explainer

    supported = [m for m, reason in Explainer(small_onnx, provider="cpu").capabilities().items() if reason is None]
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#overlay[data-drawn]")
    page.keyboard.press("c")
    page.wait_for_function(f"document.querySelectorAll('.tile canvas[data-drawn]').length === {len(supported)}",
                           timeout=120_000)
    assert page.locator(".tile figcaption").all_inner_texts() == supported
    tiles = [_shot(page.locator(f".tile[data-method='{m}'] canvas")) for m in ("gradcam", "eigencam")]
    assert np.abs(tiles[0] - tiles[1]).mean() > 1  # each tile its own map


def test_download_gives_the_overlay_as_png(page, photo):
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#overlay[data-drawn]")
    with page.expect_download() as download:
        page.click("#download")
    picture = cv2.imread(download.value.path())
    assert picture.shape == (120, 160, 3) and download.value.suggested_filename.endswith(".png")


def test_drag_and_drop_and_clear_errors(page, photo):
    dropped = page.evaluate_handle("""encoded => {
        const bytes = Uint8Array.from(atob(encoded), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        return transfer;
    }""", base64.b64encode(photo.read_bytes()).decode())
    page.evaluate("document.getElementById('overlay').removeAttribute('data-drawn')")
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    page.wait_for_selector("#overlay[data-drawn]")
    assert page.inner_text("#error") == ""

    broken = photo.parent / "broken.png"
    broken.write_bytes(b"this is not a picture")
    page.set_input_files("#file", str(broken))
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert page.inner_text("#error") == "broken.png: not a PNG, JPEG, BMP or WebP image"
    notes = photo.parent / "notes.txt"
    notes.write_text("hello")
    page.set_input_files("#file", str(notes))
    page.wait_for_function("document.getElementById('error').textContent.includes('notes.txt')")
    assert "is not an image file" in page.inner_text("#error")


def test_detections_are_items_and_clicking_one_shows_its_map(detector_page, photo):
    page = detector_page
    assert page.input_value("#task") == "detect"  # the file's score output is a detection head
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#classes button[data-kind='detection']")
    page.wait_for_selector("#overlay[data-drawn]")
    items = page.locator("#classes button")
    assert items.count() >= 2 and items.nth(0).get_attribute("aria-pressed") == "true"
    assert page.inner_text("#targets-title") == "Detections" and page.inner_text("#error") == ""
    assert "detection 1: class" in page.inner_text("#overlay-caption")
    page.locator("#opacity").fill("100")
    first = _shot(page.locator("#overlay"))
    items.nth(1).click()
    page.wait_for_selector("#classes button[aria-pressed='true'][data-rank='1']")
    assert "detection 2: class" in page.inner_text("#overlay-caption")
    assert items.count() >= 2  # the list stays: one detection was asked for, by its rank
    assert np.abs(_shot(page.locator("#overlay")) - first).mean() > 1  # its map (and box) is shown
    page.select_option("#task", "classify")  # a detector's head has no classes: the server says so in one line
    page.wait_for_function("document.getElementById('error').textContent.includes('not class scores')")
    assert "explain it with a target" in page.inner_text("#error")
    page.select_option("#task", "detect")
