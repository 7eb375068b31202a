"""The documentation site (mkdocs.yml, pages under docs/) cannot rot: it builds with
`mkdocs build --strict`, where a broken link, a broken #anchor or a page missing from nav is an
error (and a deliberately broken copy proves the strictness is real), and the built site works
offline: served on 127.0.0.1 and opened in Debian's headless Chromium (tests/browser.py), the
home page renders with its navigation, Material's search box finds a parameter by name on the
generated parameters page, every page's pictures load, and no request leaves 127.0.0.1 (no web
fonts, no CDN, no analytics). A screenshot of the home page is saved in the test's folder.
tests/test_docs.py checks what the pages say (commands, benchmark figures, the README)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.browser import chromium
from tools import chain_diagram
from tools.site_screenshot import build, serving

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(path.relative_to(ROOT / "docs").as_posix() for path in (ROOT / "docs").rglob("*.md"))
PNG = b"\x89PNG\r\n\x1a\n"


def url_of(page: str) -> str:
    """A page's path on the built site (directory URLs: training.md -> training/)."""
    stem = page.removesuffix(".md")
    return "" if stem == "index" else stem.removesuffix("/index") + "/"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once by `mkdocs build --strict` into a temporary folder."""
    folder = tmp_path_factory.mktemp("docs-site") / "site"
    built = build(folder)
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}{built.stderr}"
    return folder


@pytest.fixture(scope="module")
def served(site):
    with serving(site) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


def test_every_page_is_built_and_nothing_is_loaded_from_another_host(site):
    for page in PAGES:
        assert (site / url_of(page) / "index.html").is_file(), f"docs/{page} was not built"
    assert (site / "search" / "search_index.json").is_file(), "the search plugin wrote no index"
    # Links to other sites are fine (a reader follows them); what a page loads by itself is not:
    # scripts, pictures, style sheets and fonts, and no mermaid diagram (Material would fetch mermaid.js).
    loads = re.compile("|".join([
        r"""<(?:script|img|iframe|source)[^>]*\ssrc=["']?(?:https?:)?//""",
        r"""<link[^>]*\shref=["']?(?:https?:)?//""",
        r"""url\(["']?(?:https?:)?//""",
        r'class="mermaid"',
    ]))
    for path in [*site.rglob("*.html"), *site.rglob("*.css")]:
        found = loads.search(path.read_text())
        assert not found, f"{path.relative_to(site)} loads something from another host: {found.group()}..."


def tiny_site(folder: Path, link: str) -> Path:
    """A two-page copy of the real configuration (its validation, theme and extensions) whose
    home page holds ``link``; returns its mkdocs.yml."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config.update(docs_dir="docs", nav=[{"Home": "index.md"}, {"Other": "other.md"}])
    (folder / "docs").mkdir(parents=True)
    (folder / "docs" / "index.md").write_text(f"# Home\n\nSee {link}.\n")
    (folder / "docs" / "other.md").write_text("# Other\n\n## A heading\n\nText.\n")
    (folder / "mkdocs.yml").write_text(yaml.safe_dump(config))
    return folder / "mkdocs.yml"


def test_the_strict_build_really_fails_on_a_broken_link_or_anchor(tmp_path):
    good = build(tmp_path / "good-site", tiny_site(tmp_path / "good", "[a heading](other.md#a-heading)"))
    assert good.returncode == 0, good.stderr
    for link, named in [("[gone](missing.md)", "missing.md"), ("[no such heading](other.md#no-such-heading)",
                                                                  "no-such-heading")]:
        name = named.replace(".", "-")
        broken = build(tmp_path / f"{name}-site", tiny_site(tmp_path / name, link))
        assert broken.returncode != 0, f"a build with {link} passed --strict"
        assert named in broken.stdout + broken.stderr


def test_the_chain_picture_is_what_tools_chain_diagram_draws():
    assert (ROOT / "docs" / "chain.svg").read_text() == chain_diagram.render(), (
        "docs/chain.svg is stale: run `python -m tools.chain_diagram`")


def test_the_home_page_renders_with_its_navigation(browser, served, tmp_path):
    page = browser.page(width=1280, height=800)
    page.goto(served + "/")
    assert page.title().startswith("Image pipeline")
    assert page.inner_text("article h1").rstrip("¶") == "Image pipeline"  # ¶: the heading's permalink
    nav = page.inner_text("nav.md-nav--primary")
    for title in ("Getting started", "Your own data", "Download", "Training and tracking", "Comparing runs",
                  "The service and its page", "Scaling out", "Reproducibility", "Benchmarks", "Troubleshooting",
                  "Architecture", "Contributing", "Parameters", "Commands"):
        assert title in nav, f"the navigation lacks {title!r}"
    page.wait_for_function("Array.from(document.images).every(image => image.complete)")
    assert page.evaluate("document.querySelector('img[src$=\"chain.svg\"]').naturalWidth") > 0
    page.screenshot(path=str(tmp_path / "home.png"))
    assert (tmp_path / "home.png").read_bytes().startswith(PNG)
    assert browser.foreign_requests() == []


def test_search_finds_a_parameter_by_name_on_the_parameters_page(browser, served):
    page = browser.page(width=1280, height=800)
    page.goto(served + "/")
    box = page.locator("input.md-search__input")
    box.click()
    box.press_sequentially("min_steps")  # typed as a person would, key by key
    results = "li.md-search-result__item a.md-search-result__link"
    page.wait_for_selector(results)
    try:  # the results list fills in as the search worker answers
        page.wait_for_selector(f'{results}[href*="reference/parameters/"]', timeout=10_000)
    except PlaywrightTimeout:
        found = page.eval_on_selector_all(results, "links => links.map(link => link.href)")
        pytest.fail(f"searching min_steps did not list the parameters page, only: {found}")
    assert browser.foreign_requests() == []


def test_every_page_loads_its_pictures_and_nothing_from_another_host(browser, served):
    page = browser.page(width=1280, height=800)
    for name in PAGES:
        page.goto(f"{served}/{url_of(name)}")
        page.wait_for_function("Array.from(document.images).every(image => image.complete)")
        broken = page.evaluate("Array.from(document.images).filter(image => !image.naturalWidth).map(i => i.src)")
        assert broken == [], f"docs/{name}: pictures that did not load: {broken}"
    assert browser.foreign_requests() == []
