"""The app in a real browser: Debian's Chromium driven by Playwright, everything on loopback."""

import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from steindiff.app.presets import PRESETS
from steindiff.app.settings import Settings

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
#: the app as the README shows it, written by the browser test and committed
SCREENSHOT = Path(__file__).parent.parent / "docs" / "images" / "app.png"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@pytest.fixture
def page():
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is required for the browser test: apt-get install -y chromium")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1700})
        yield context.new_page()
        browser.close()


def _watch(page):
    errors, outside = [], []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def check(request):
        parsed = urlparse(request.url)
        if parsed.scheme in ("http", "https", "ws", "wss") and parsed.hostname not in LOOPBACK:
            outside.append(request.url)

    page.on("request", check)
    return errors, outside


def _wait_for_images(page, count: int) -> None:
    """Until ``count`` images of the run (4x4 grids of digits, 336 px a side) have loaded and decoded."""
    page.wait_for_function(
        f"Array.from(document.images).filter(i => i.complete && i.naturalWidth >= 300).length >= {count}",
        timeout=60_000,
    )


def _scrub_to(page, key: str) -> None:
    """Move the step scrubber to its first ("Home") or last ("End") step as a user would, and let go."""
    labelled = page.get_by_label("step (moves every view)").locator("input[type=range]")
    slider = labelled if labelled.count() else page.locator("input[type=range]").last
    slider.focus()
    page.keyboard.press(key)
    slider.dispatch_event("pointerup")


def _choose(page, label: str, option: str) -> None:
    box = page.get_by_label(label, exact=True)
    box.click()
    page.get_by_role("option", name=option, exact=True).click()


@pytest.mark.slow
def test_preset_run_scrub_and_url_state_in_chromium(server, page):
    errors, outside = _watch(page)
    page.set_viewport_size({"width": 1400, "height": 800})  # a laptop's window, shorter than the form
    page.goto(server + "?model=mlp-ring&seed=3")
    page.wait_for_selector("text=Lesson presets")
    run_button = page.get_by_role("button", name="Run", exact=True).bounding_box()
    assert run_button["y"] >= 0 and run_button["y"] + run_button["height"] <= 800, run_button  # Run in sight
    _clear_of_the_run_button(page)
    page.set_viewport_size({"width": 1400, "height": 1700})
    sync_api.expect(page.get_by_label("model", exact=True)).to_have_value("mlp-ring")  # state from the URL
    sync_api.expect(page.get_by_label("seed", exact=True)).to_have_value("3")
    batch = page.get_by_label(Settings.controls()["batch"].label, exact=True)
    sync_api.expect(batch).to_have_value("2000")  # the link named a 2-D model and no batch
    _choose(page, "model", "mnist")
    sync_api.expect(batch).to_have_value("16")  # the 2-D default became the image one
    batch.fill("12")
    batch.press("Tab")
    _choose(page, "model", "gmm-ring")
    sync_api.expect(page.get_by_label("model", exact=True)).to_have_value("gmm-ring")
    sync_api.expect(batch).to_have_value("12")  # a batch the user set stays
    _choose(page, "Lesson presets", "Stein rescues 3-step Heun (literal rule, mnist)")
    sync_api.expect(page.get_by_label("solver", exact=True)).to_have_value("heun")  # the preset has landed
    sync_api.expect(page.get_by_label("model", exact=True)).to_have_value("mnist")
    rule_label = Settings.controls()["rule"].label
    sync_api.expect(page.get_by_label(rule_label, exact=True)).to_have_value("stein")
    page.get_by_role("button", name="Run", exact=True).click()
    try:
        page.wait_for_selector("td:text-is('stein')", timeout=120_000)
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 1", timeout=60_000)
        _wait_for_images(page, 2)  # x_k of both runs, in the first tab
    finally:  # the page as the run left it, or as far as it got
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app-after-run.png"), full_page=True)
    views = page.evaluate(
        """() => Array.from(document.querySelectorAll('.run-image')).filter(v => v.offsetParent).map(view => ({
            label: view.querySelector('[data-testid=block-label]').getBoundingClientRect().bottom,
            image: view.querySelector('img').getBoundingClientRect().top,
            share: view.querySelectorAll('button[aria-label=Share]').length,
        }))"""
    )
    assert len(views) == 2, views  # x_k of both runs; the slider and the predicted x0 in their tabs
    assert all(view["image"] >= view["label"] for view in views), views  # no label covers a sample
    assert all(view["share"] == 0 for view in views), views  # nothing offers to post off the machine
    assert all(f"{k}={v}" in page.url for k, v in {"solver": "heun", "model": "mnist", "seed": 0, "batch": 16}.items())
    label = page.locator("text=/step \\d+ of 3/").first
    assert "step 3 of 3" in label.inner_text()
    SCREENSHOT.parent.mkdir(exist_ok=True)  # the README's picture: the page as a first run leaves it
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SCREENSHOT))
    page.set_viewport_size({"width": 1400, "height": 1700})
    _scrub_to(page, "Home")
    page.wait_for_selector("text=step 0 of 3", timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
    assert errors == [], errors
    assert outside == [], outside


def _clear_of_the_run_button(page) -> None:
    """No label or input of the page shares any area with the Run button."""
    boxes = page.evaluate(
        """() => {
            const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
            const run = document.querySelector('#run');
            const controls = [...document.querySelectorAll('label, input, select, textarea, [data-testid=block-info]')]
                .filter(e => e.offsetParent && !run.contains(e) && e.getBoundingClientRect().width > 0);
            return {run: box(run), controls: controls.map(e => [e.outerHTML.slice(0, 80), box(e)])};
        }"""
    )
    covered = [html for html, box in boxes["controls"] if not _disjoint(box, boxes["run"])]
    assert covered == [], covered


def _clip_paths_resolve(page) -> None:
    """Every clip-path on the page points at an element of this page, at its current URL."""
    refs = page.evaluate(
        """() => [...document.querySelectorAll('[clip-path]')].map(e => e.getAttribute('clip-path'))
            .filter(v => v.startsWith('url('))
            .map(v => { const m = v.match(/url\\(['"]?([^#'")]*)#([^'")]+)/);
                        return [m[1], m[2], m[1] === '' || m[1] === window.location.href.split('#')[0],
                                document.getElementById(m[2]) !== null]; })"""
    )
    assert refs and all(here and found for _, _, here, found in refs), [r for r in refs if not (r[2] and r[3])]


def _disjoint(a: list[float], b: list[float]) -> bool:
    """Whether two boxes (left, top, right, bottom) share no area."""
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def _assert_readable(page) -> None:
    """The summary table's columns all show (on a narrow page, scrolled to its end); each figure's titles lie
    whole below its label, none over another."""
    fit = page.evaluate(
        """() => ({
            table: (() => {
                const table = document.querySelector('#summary table');
                table.scrollLeft = table.scrollWidth;
                const column = document.querySelector('#summary').getBoundingClientRect();
                const last = table.querySelector('th:last-child').getBoundingClientRect();
                return [column.left, last.left, last.right, column.right];
            })(),
            plots: Array.from(document.querySelectorAll('.run-plot')).filter(view => view.offsetParent).map(view => ({
                label: view.querySelector('[data-testid=block-label]').getBoundingClientRect().bottom,
                width: [view.getBoundingClientRect().left, view.getBoundingClientRect().right],
                titles: Array.from(view.querySelectorAll('.annotation-text, .gtitle')).map(title => {
                    const box = title.getBoundingClientRect();
                    return [box.left, box.top, box.right, box.bottom];
                }),
            })),
        })"""
    )
    left, last_left, last_right, right = fit["table"]
    assert left <= last_left and last_right <= right + 1, fit  # the summary's last column can be seen
    assert len(fit["plots"]) == 2 and all(len(plot["titles"]) >= 3 for plot in fit["plots"]), fit
    for plot in fit["plots"]:  # the particles and the diagnostics: each title whole and readable
        assert min(box[1] for box in plot["titles"]) >= plot["label"], plot
        assert all(plot["width"][0] <= box[0] and box[2] <= plot["width"][1] for box in plot["titles"]), plot
        titles = plot["titles"]
        assert all(_disjoint(a, b) for i, a in enumerate(titles) for b in titles[i + 1 :]), plot


@pytest.fixture(scope="module")
def warm_server():
    """The app as `python app.py` serves it: the form's run made before serving, shown when a page opens."""
    from conftest import free_port

    import app
    from steindiff.experiment import ModelCatalog

    demo = app.make_app(ModelCatalog(), warm_up=True)
    yield app.launch(demo, port=free_port(), block=False)
    demo.close()


@pytest.mark.slow
@pytest.mark.parametrize(("width", "height"), [(1366, 768), (1920, 1080)])
def test_the_first_screen_shows_a_run_and_a_run_brings_the_diagnostics_into_reach(warm_server, page, width, height):
    errors, outside = _watch(page)
    page.set_viewport_size({"width": width, "height": height})
    page.goto(warm_server)
    # before any click: the warm-up's run, its table, its grids and its diagnostics
    page.wait_for_selector("td:text-is('stein')", timeout=30_000)
    page.wait_for_function("document.querySelectorAll('#diagnostics .main-svg').length >= 1", timeout=30_000)
    _wait_for_images(page, 2)
    _clear_of_the_run_button(page)
    page.get_by_label("seed", exact=True).fill("1")
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_selector("text=seed 1", timeout=120_000)
    page.wait_for_function("document.querySelectorAll('#diagnostics .main-svg').length >= 1", timeout=30_000)
    top = page.evaluate("() => document.querySelector('#diagnostics').getBoundingClientRect().top + window.scrollY")
    assert top <= 1150, top  # the diagnostics in reach, not below every image view
    _clear_of_the_run_button(page)
    assert errors == [], errors
    assert outside == [], outside


@pytest.mark.slow
def test_each_preset_runs_in_the_page_and_its_picture_goes_to_the_lesson(warm_server, page):
    """Choose each preset as a user would, read its claim, run it, and keep the page as docs/lesson.md shows it."""
    errors, outside = _watch(page)
    page.set_viewport_size({"width": 1366, "height": 1100})
    page.goto(warm_server)
    page.wait_for_selector("td:text-is('stein')", timeout=30_000)
    for name, preset in PRESETS.items():
        _choose(page, "Lesson presets", name)
        sync_api.expect(page.locator("#claim")).to_contain_text(preset.claim[:40])
        page.get_by_role("button", name="Run", exact=True).click()
        page.wait_for_selector(".progress-text", timeout=10_000)  # under way
        page.wait_for_function("!document.querySelector('.progress-text')", timeout=180_000)  # and done
        sync_api.expect(page.locator("#summary")).to_contain_text(f"NFE {preset.settings['nfe']} (")
        page.wait_for_timeout(500)  # the figures' last redraw
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(SCREENSHOT.parent / f"preset-{_slug(name)}.png"), full_page=True)
    assert errors == [], errors
    assert outside == [], outside


def _slug(name: str) -> str:
    """A preset's name as a file name: lower case, words joined by hyphens."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


@pytest.mark.slow
def test_a_link_with_a_step_opens_its_run_there_and_the_url_follows_the_scrubber(server, page):
    errors, outside = _watch(page)
    page.set_viewport_size({"width": 1100, "height": 1700})  # a small laptop's window
    page.goto(server + "?model=gmm-ring&solver=ddim&nfe=4&batch=64&seed=5&lipschitz=false&step=2")
    sync_api.expect(page.get_by_label("solver", exact=True)).to_have_value("ddim")
    assert page.locator("#download").bounding_box()["height"] < 150  # empty, it does not push the page down
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_selector("text=step 2 of 4", timeout=60_000)  # the link's step, not the run's last
    # both figures drawn with their panels' titles: the particles' two, the diagnostics' six
    page.wait_for_function("document.querySelectorAll('.run-plot .annotation-text').length >= 8", timeout=60_000)
    _assert_readable(page)  # 1100 px: beside a 300 px form the outputs would be too narrow, so they go below it
    page.set_viewport_size({"width": 900, "height": 1700})  # narrower still: the figures redraw at the new width
    page.wait_for_function(
        "[...document.querySelectorAll('.run-plot .main-svg')].every(s => s.getBoundingClientRect().width < 880)",
        timeout=10_000,
    )
    _assert_readable(page)
    page.set_viewport_size({"width": 390, "height": 1700})  # a phone: the table scrolls, the titles shrink
    page.wait_for_function(
        "[...document.querySelectorAll('.run-plot .main-svg')].every(s => s.getBoundingClientRect().width < 380)",
        timeout=10_000,
    )
    _assert_readable(page)
    page.wait_for_function("window.location.search.includes('step=2')", timeout=10_000)
    assert "seed=5" in page.url and "model=gmm-ring" in page.url
    _scrub_to(page, "End")
    page.wait_for_selector("text=step 4 of 4", timeout=60_000)
    page.wait_for_function("window.location.search.includes('step=4')", timeout=10_000)
    _clip_paths_resolve(page)
    # the URL changes under figures already drawn (as the app's own URL state does), and plotly redraws them
    page.evaluate("() => history.replaceState(null, '', window.location.search + '&shared=1')")
    _clip_paths_resolve(page)
    page.set_viewport_size({"width": 1000, "height": 1700})
    page.wait_for_function(
        "[...document.querySelectorAll('.run-plot .main-svg')].every(s => s.getBoundingClientRect().width < 980)",
        timeout=10_000,
    )
    _clip_paths_resolve(page)  # the trajectories still clip to their panels
    page.get_by_label("seed", exact=True).fill("6")
    page.get_by_role("button", name="Run", exact=True).click()  # the link's step is spent: a run opens at its last
    # the run's settings go into the URL as it starts, the shown step when every view has landed
    page.wait_for_function("['seed=6', 'step='].every(s => window.location.search.includes(s))", timeout=60_000)
    assert "step=4" in page.url
    sync_api.expect(page.locator("text=/step \\d+ of 4/").first).to_contain_text("step 4 of 4")
    _clip_paths_resolve(page)
    assert errors == [], errors
    assert outside == [], outside
