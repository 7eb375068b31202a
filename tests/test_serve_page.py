"""The page at / in a real headless Chromium (Debian's, via Playwright) against the real service on
loopback: an image chosen, dropped or named by URL is classified, and the page shows what the API
answers. Nothing the page requests may leave 127.0.0.1, and its Content-Security-Policy must hold."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import expect

from serve.app import Settings, create_app
from serve.remote import RemotePolicy
from serve.running import running
from tests import images
from tests.browser import chromium
from tests.http_server import Server, body

ROOT = Path(__file__).resolve().parents[1]
KEY = "page-test-key-0123456789abcdef"
# Recorded in the page before its own scripts run: CSP violations and uncaught errors.
WATCH = """
window.__violations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__violations.push(e.violatedDirective + " " + e.blockedURI));
"""


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def served(bundles):
    """The service on the cam bundle, fetching {"url": ...} from loopback (as --allow-remote with
    --remote-allow-cidr 127.0.0.1/32 would)."""
    settings = Settings(bundle=bundles["cam"], max_wait_ms=5, remote=RemotePolicy.from_cidrs(True, ["127.0.0.1/32"]))
    with running(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def keyed(bundles, tmp_path_factory):
    """The service on the cam bundle with an API key, and no URL fetching."""
    with running(create_app(Settings(bundle=bundles["cam"], max_wait_ms=5, api_keys=(KEY,)))) as url:
        yield url


def open_page(browser, url: str, **viewport):  # type: ignore[no-untyped-def]
    page = browser.page(**viewport)
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.add_init_script(WATCH)
    page.goto(url + "/")
    return page


def upload(page, data: bytes, name: str = "cat.png", mime: str = "image/png") -> None:  # type: ignore[no-untyped-def]
    page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])


def outcome(page) -> str:  # type: ignore[no-untyped-def]
    """Waits until the page has shown a result or an error; which one."""
    page.wait_for_selector('#result[data-state="done"], #result[data-state="error"]')
    return page.get_attribute("#result", "data-state")


def assert_done(page) -> None:  # type: ignore[no-untyped-def]
    assert outcome(page) == "done", page.inner_text("#result")


def assert_clean(page, browser) -> None:  # type: ignore[no-untyped-def]
    """No uncaught error, no CSP violation, no request to another host (so far, in any page)."""
    assert page.errors == []
    assert page.evaluate("window.__violations") == []
    assert browser.foreign_requests() == []


def predicted(url: str, **request) -> dict:  # type: ignore[no-untyped-def]
    response = httpx.post(url + "/predict", params={"top_k": 5}, timeout=30, **request)
    assert response.status_code == 200, response.text
    return response.json()


def shown_image_width(page) -> int:  # type: ignore[no-untyped-def]
    return page.evaluate("(() => { const img = document.getElementById('annotated');"
                         " return img.complete ? img.naturalWidth : 0; })()")


def assert_png(path, width: int | None = None) -> None:  # type: ignore[no-untyped-def]
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    if width is not None:
        assert Image.open(io.BytesIO(data)).width == width


def test_an_uploaded_image_shows_what_predict_and_metadata_say(browser, served, tmp_path):
    data = images.rgb_png(3, size=(90, 60))
    page = open_page(browser, served)
    upload(page, data)
    assert_done(page)
    expected = predicted(served, files={"image": ("cat.png", data, "image/png")})
    assert page.inner_text("#label") == expected["label"]
    assert page.inner_text("#confidence") == f"{expected['confidence'] * 100:.1f} %"
    rows = page.locator("#scores li")
    assert rows.count() == 3 and rows.first.locator(".score-label").inner_text() == expected["label"]
    assert shown_image_width(page) == 90  # the annotated PNG, at the upload's size
    assert "class-activation map" in page.inner_text("#caption")  # from X-Attention-Method
    meta = httpx.get(served + "/metadata").json()
    assert page.inner_text("#model-name") == meta["name"] == "cam"
    assert page.inner_text("#model-version") == meta["version"]
    assert page.inner_text("#model-precision") == meta["precision"]
    assert page.inner_text("#model-accuracy") == f"{meta['metrics']['test']['accuracy'] * 100:.1f} %"
    assert page.inner_text("#model-f1") == f"{meta['metrics']['test']['macro_f1']:.3f}"
    # The tiny test model is no better than chance on its tiny data; the page must say so when not.
    assert page.is_visible("#model-warning") == (not meta["metrics"]["beats_baseline"])
    assert page.is_visible("#url-form")  # this service fetches URLs
    page.screenshot(path=tmp_path / "page.png", full_page=True)
    assert_png(tmp_path / "page.png", width=1280)
    paths = {url.removeprefix(served) for url in browser.requests}
    assert {"/", "/page/page.css", "/page/page.js", "/metadata", "/predict?top_k=5", "/annotate"} <= paths
    assert_clean(page, browser)


def test_a_file_that_is_not_an_image_shows_the_api_s_message(browser, served):
    data = b"these are notes, not pixels"
    page = open_page(browser, served)
    upload(page, data, "notes.txt", "text/plain")
    assert outcome(page) == "error"
    refused = httpx.post(served + "/predict", files={"image": ("notes.txt", data, "text/plain")})
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]["message"]
    assert message.rstrip(".") in page.inner_text("#error")
    assert page.get_attribute("#error", "role") == "alert"
    assert not page.is_visible("#prediction") and not page.is_visible("#figure")
    assert_clean(page, browser)


def holding(page, data: bytes, name: str, mime: str):  # type: ignore[no-untyped-def]
    """A DataTransfer in the page holding one file, as a drop or a paste carries it."""
    return page.evaluate_handle(
        """([b64, name, mime]) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                                     const transfer = new DataTransfer();
                                     transfer.items.add(new File([bytes], name, {type: mime}));
                                     return transfer; }""", [base64.b64encode(data).decode(), name, mime])


def test_a_dropped_or_pasted_file_is_classified(browser, served):
    dropped, pasted = images.rgb_jpeg(4), images.rgb_png(12, size=(70, 30))
    page = open_page(browser, served)
    page.dispatch_event("#drop", "drop", {"dataTransfer": holding(page, dropped, "dropped.jpg", "image/jpeg")})
    assert_done(page)
    assert page.inner_text("#label") == predicted(served, files={"image": ("d.jpg", dropped, "image/jpeg")})["label"]
    # A paste on the page (not in a text field): the state is "busy" again as soon as it is dispatched.
    page.evaluate("(transfer) => document.body.dispatchEvent(new ClipboardEvent('paste', "
                  "{clipboardData: transfer, bubbles: true}))", holding(page, pasted, "pasted.png", "image/png"))
    assert_done(page)
    assert page.inner_text("#status") == "Classified pasted.png."
    assert page.inner_text("#label") == predicted(served, files={"image": ("p.png", pasted, "image/png")})["label"]
    assert shown_image_width(page) == 70
    assert_clean(page, browser)


def test_a_pasted_url_is_classified_by_the_service(browser, served):
    data = images.rgb_png(8, size=(50, 70))
    with Server() as remote:
        remote.routes["/photo.png"] = body(data, "image/png")
        page = open_page(browser, served)
        page.fill("#url-input", remote.url("/photo.png"))
        page.press("#url-input", "Enter")  # the form submits from the keyboard
        assert_done(page)
        assert page.inner_text("#label") == predicted(served, json={"url": remote.url("/photo.png")})["label"]
        assert shown_image_width(page) == 50
        assert remote.hits["/photo.png"] >= 2  # /predict and /annotate: the service fetched it, not the browser
    assert_clean(page, browser)  # the browser asked only the service (127.0.0.1 under another port is fine)


def test_on_a_phone_the_page_is_one_column_without_sideways_scrolling(browser, served, tmp_path):
    page = open_page(browser, served, width=390, height=844, is_mobile=True, has_touch=True, device_scale_factor=2)
    upload(page, images.rgb_png(5, size=(400, 300)), "a-photo-with-a-rather-long-file-name-from-a-phone-camera.png")
    assert_done(page)
    assert page.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth")
    drop, model, result = (page.locator(s).bounding_box() for s in ("#drop", "#model", "#result"))
    # Stacked, the answer right below the image and the model card after it.
    assert result["y"] >= drop["y"] + drop["height"] and model["y"] >= result["y"] + result["height"]
    assert abs(result["x"] - model["x"]) < 1
    assert result["x"] + result["width"] <= 390 and drop["width"] > 300
    assert shown_image_width(page) == 400
    page.screenshot(path=tmp_path / "phone.png", full_page=True)
    assert_png(tmp_path / "phone.png", width=780)  # 390 CSS px at 2 device pixels each
    assert_clean(page, browser)


def test_the_file_chooser_is_reachable_with_the_keyboard(browser, served):
    page = open_page(browser, served)
    # Playwright turns on file-chooser interception without waiting for it: listen well before
    # the key press, or a fast Enter opens a (headless, invisible) native dialog instead.
    page.on("filechooser", lambda chooser: None)
    for _ in range(10):
        if page.evaluate("document.activeElement.id") == "file":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file", "Tab never reached the file input"
    assert page.evaluate("getComputedStyle(document.getElementById('drop')).outlineStyle") == "solid"  # visible focus
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(files=[{"name": "k.png", "mimeType": "image/png", "buffer": images.rgb_png(6)}])
    assert_done(page)
    assert_clean(page, browser)


def test_a_service_with_keys_asks_for_one_and_then_works(browser, keyed):
    # The page and its files need no key; the API does.
    page_response = httpx.get(keyed + "/")
    assert page_response.status_code == 200 and "text/html" in page_response.headers["content-type"]
    assert "script-src 'self'" in page_response.headers["content-security-policy"]
    assert httpx.get(keyed + "/page/page.js").status_code == 200
    assert httpx.get(keyed + "/metadata").status_code == 401
    page = open_page(browser, keyed)
    page.wait_for_selector("#key-input", state="visible")
    assert page.get_attribute("#key-input", "type") == "password"
    assert "needs an API key" in page.inner_text("#key-reason")
    assert page.evaluate("document.activeElement.id") == "key-input"
    page.fill("#key-input", "not-the-key-at-all-0000")
    page.press("#key-input", "Enter")
    expect(page.locator("#key-reason")).to_contain_text("not valid")  # (no wait_for_function: CSP forbids eval)
    assert page.is_visible("#key-input")
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    page.wait_for_selector("#model-card", state="visible")
    assert page.inner_text("#model-name") == "cam" and not page.is_visible("#key")
    assert not page.is_visible("#url-form")  # this service does not fetch URLs
    assert page.evaluate("sessionStorage.getItem('imgpipe.apiKey')") == KEY
    data = images.rgb_png(9)
    upload(page, data)
    assert_done(page)
    answer = predicted(keyed, files={"image": ("k.png", data, "image/png")}, headers={"Authorization": f"Bearer {KEY}"})
    assert page.inner_text("#label") == answer["label"]
    assert shown_image_width(page) == 48
    assert_clean(page, browser)


def test_an_upload_before_the_key_runs_once_the_key_is_given(browser, keyed):
    page = open_page(browser, keyed)
    page.wait_for_selector("#key-input", state="visible")
    upload(page, images.rgb_png(10))
    expect(page.locator("#status")).to_contain_text("Enter the API key")
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    assert_done(page)  # the upload waiting for the key was sent again with it
    assert page.inner_text("#model-name") == "cam"
    assert_clean(page, browser)


def test_the_readme_screenshot_tool_classifies_on_the_page(bundles, tmp_path):
    # Its own process: Playwright's sync API runs one instance per thread, and this module's is open.
    image, out = tmp_path / "photo.jpg", tmp_path / "docs" / "serve-page.png"
    image.write_bytes(images.rgb_jpeg(11, size=(160, 120)))
    done = subprocess.run([sys.executable, "-m", "tools.page_screenshot", "--bundle", str(bundles["cam"]), "--image",
                           str(image), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_png(out, width=1280)
    label = predicted_in_process(bundles["cam"], image.read_bytes())
    assert f"classified as {label!r} on the page" in done.stdout


def predicted_in_process(bundle_dir, data: bytes) -> str:  # type: ignore[no-untyped-def]
    from serve.bundle import Bundle

    bundle = Bundle.load(bundle_dir)
    pixels, _ = bundle.preprocess(data)
    return bundle.labels[int(bundle.predict(pixels[None])[0][0].argmax())]
