"""The pack as a user meets it: ComfyUI's real frontend in headless Chromium against the shared test server.

Driven with Playwright's Python package and the system's Chromium (Debian's ``chromium``; ``.ci/run`` installs it
with apt and never runs ``playwright install``, which downloads browsers). It checks that the page loads with no
console error from the pack, that node search for "Calibri" lists every node, that each example workflow loads
through the frontend exactly as the Templates menu loads it (fetched from ``/api/workflow_templates/calibri/``, then
``app.loadGraphData``) with no missing-node report, the widget values of its JSON, every node in view and drawn with
its text, that CalibriCombine shows only the widgets of its connected inputs, that each template has a thumbnail,
and that the plot template runs and its charts appear in the page. The window is 1366×768, the smallest common
laptop screen: a template readable there is readable on larger ones, which show more canvas at the same saved zoom.

Screenshots go to a temporary folder (``CALIBRI_SCREENSHOT_DIR`` to choose it) that is kept, and their paths are
printed, so CI can keep them as artifacts. Without Chromium the tests skip with a loud message; in CI (``CI=true``)
a missing Playwright package is an error, since ``.ci/run`` installs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import server_harness

from calibri_core.workflow_diagram import SIZE

pytestmark = [pytest.mark.server, pytest.mark.browser]

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
PLOT_WORKFLOW = "calibri-plot-calibration"
COMBINE_WORKFLOW = "calibri-qwen-image-guider"  # a CalibriCombine with calibration_1 and _2 connected
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
VIEWPORT = {"width": 1366, "height": 768}
# The frontend's own chrome covers the canvas's left edge (icon bar) and top (banner, tabs, workflow menu, Run).
CANVAS_LEFT, CANVAS_TOP = 70, 150
# 1.49 draws a minimap over the canvas's bottom-right corner (on by default in windows 1024 px wide and more).
OVERLAYS = ".minimap-main-container, .minimap-container"
TIMEOUT_MS = 120_000
PACK_MODULE = "calibri"
# The frontend asks the Comfy Registry about every custom node id it meets; offline (and under the page's CSP)
# that request is blocked and logged as an error naming our node ids. It says nothing about the pack.
REGISTRY_HOST = "api.comfy.org"


def _chromium() -> str | None:
    override = os.environ.get("CALIBRI_CHROMIUM")  # a path; one that does not exist means "no Chromium"
    if override:
        return override if os.path.isfile(override) else None
    return next((path for name in CHROMIUM_CANDIDATES if (path := shutil.which(name))), None)


def _terminal_lines(config, lines: list[str]) -> None:
    """Write past pytest's output capture, so the lines show in a passing -q run (CI logs)."""
    capture = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    with capture.global_and_fixture_disabled() if capture else _nothing():
        for line in lines:
            (reporter.write_line if reporter else print)(line)


@contextlib.contextmanager
def _nothing():
    yield


def _loud_skip(config, reason: str) -> None:
    banner = "#" * 100
    _terminal_lines(config, ["", banner, f"#### BROWSER TESTS SKIPPED: {reason}", banner])
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser_page(request):
    chromium = _chromium()
    if chromium is None:
        _loud_skip(request.config, "no Chromium on this machine (Debian: `apt-get install -y chromium`, as root; "
                                   ".ci/run does it). The frontend was NOT tested.")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("Playwright's Python package is missing in CI; .ci/run installs it (`pip install playwright`).")
        _loud_skip(request.config, "the `playwright` Python package is not installed (`pip install playwright`; "
                                   "never `playwright install`). The frontend was NOT tested.")
    server = server_harness.acquire()
    shots = Path(os.environ.get("CALIBRI_SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="calibri-browser-"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        session = BrowserSession(server, page, shots)
        try:
            session.open()
            yield session
        finally:
            session.report(request.config)
            browser.close()
            server_harness.release()


class BrowserSession:
    """The page, what its console said and which requests failed, and where its screenshots go."""

    def __init__(self, server, page, shots: Path):
        self.server, self.page, self.shots = server, page, shots
        self.console: list[tuple[str, str, str]] = []    # (type, text, url)
        self.responses: list[tuple[int, str]] = []        # (status, url) of every response
        self.failed: list[tuple[int, str]] = []           # (status, url) of those that failed
        self.screenshots: list[Path] = []
        page.on("console", lambda m: self.console.append((m.type, m.text, (m.location or {}).get("url", ""))))
        page.on("pageerror", lambda e: self.console.append(("pageerror", str(e), "")))
        page.on("response", self._response)

    def _response(self, response) -> None:
        self.responses.append((response.status, response.url))
        if response.status >= 400:
            self.failed.append((response.status, response.url))

    def open(self) -> None:
        # A new user's first run opens the Templates browser over the canvas; test_templates_menu opens it itself.
        self.server._request("/settings", {"Comfy.TutorialCompleted": True})
        self.page.goto(self.server.url, wait_until="load", timeout=TIMEOUT_MS)
        self.page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && "
                                    "Object.keys(window.LiteGraph?.registered_node_types || {}).length > 50",
                                    timeout=TIMEOUT_MS)
        # The same list the missing-node dialog is built from, as each version hands it to extensions.
        self.page.evaluate("""() => { window.__calibriMissing = [];
            window.app.registerExtension({name: 'calibri.browser-test',
                afterConfigureGraph(missing) { window.__calibriMissing.push(missing || []); }}); }""")
        self.page.wait_for_timeout(2000)  # let start-up dialogs (release notes, ...) appear before closing them
        self.close_dialogs()

    def close_dialogs(self) -> None:
        """Close any open dialog (the first-run Templates browser, release notes) that would cover the canvas."""
        dialogs = self.page.locator(".p-dialog:visible")
        for _ in range(10):
            if dialogs.count() == 0:
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(300)
            close = self.page.locator(".p-dialog:visible button[aria-label='Close'], "
                                      ".p-dialog:visible .p-dialog-close-button")
            if dialogs.count() and close.count():
                close.first.click()
                self.page.wait_for_timeout(300)
        assert dialogs.count() == 0, "a dialog stays open: " + dialogs.first.inner_text()[:500]

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        self.screenshots.append(path)
        return path

    def pack_errors(self) -> list[str]:
        lines = [f"console {kind}: {text} ({url})" for kind, text, url in self.console
                 if kind in ("error", "pageerror") and PACK_MODULE in f"{text} {url}".lower()
                 and REGISTRY_HOST not in text]
        return lines + [f"HTTP {status}: {url}" for status, url in self.failed if PACK_MODULE in url.lower()]

    def report(self, config) -> None:
        _terminal_lines(config, ["", "Calibri browser screenshots (CI artifacts):"]
                        + [f"  {p}" for p in self.screenshots])

    def load_template(self, name: str) -> dict:
        """Fetch ``name`` as the Templates menu does and load it with ``app.loadGraphData``; the graph after."""
        return self.page.evaluate("""async ([module, name, overlaySelector]) => {
            const app = window.app;
            const response = await fetch(`api/workflow_templates/${module}/${name}.json`);
            if (!response.ok) return {status: response.status};
            const json = await response.json();
            window.__calibriMissing = [];
            await app.loadGraphData(json, true, true, name);
            await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
            app.canvas.draw(true, true);
            const graph = app.graph.serialize();
            const ds = app.canvas.ds;
            const rect = app.canvas.canvas.getBoundingClientRect();
            const titleHeight = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
            const overlays = [...document.querySelectorAll(overlaySelector)].map(e => e.getBoundingClientRect())
                .filter(r => r.width > 0 && r.height > 0)
                .map(r => ({left: r.left, top: r.top, right: r.right, bottom: r.bottom}));
            return {
                scale: ds.scale,
                // Below this zoom both frontends draw nodes as plain boxes, without titles, widgets or labels.
                lowQuality: app.canvas.low_quality,
                overlays,
                status: response.status,
                missing: window.__calibriMissing.flat().map(m => typeof m === 'string' ? m : m.type),
                unregistered: app.graph._nodes.filter(n => !(n.type in window.LiteGraph.registered_node_types))
                                              .map(n => n.type),
                nodes: graph.nodes.map(n => ({id: n.id, type: n.type, widgets_values: n.widgets_values ?? null})),
                boxes: app.graph._nodes.map(n => ({id: n.id,
                    left: rect.left + (n.pos[0] + ds.offset[0]) * ds.scale,
                    top: rect.top + (n.pos[1] - titleHeight + ds.offset[1]) * ds.scale,
                    right: rect.left + (n.pos[0] + n.size[0] + ds.offset[0]) * ds.scale,
                    bottom: rect.top + (n.pos[1] + n.size[1] + ds.offset[1]) * ds.scale})),
            };
        }""", [PACK_MODULE, name, OVERLAYS])


def calibri_display_names(server) -> dict[str, str]:
    return {node_id: info["display_name"] for node_id, info in server.object_info.items()
            if info.get("python_module", "").endswith(f"custom_nodes.{PACK_MODULE}")
            or info.get("category", "").split("/")[0] == "Calibri"}


def test_page_loads_without_pack_errors(browser_page):
    session = browser_page
    registered = session.page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)")
    expected = calibri_display_names(session.server)
    assert len(expected) >= 9 and set(expected) <= set(registered), sorted(set(expected) - set(registered))
    session.shot("00-page-loaded")
    assert not session.pack_errors(), "\n".join(session.pack_errors())


def test_node_search_lists_every_node(browser_page):
    session, page = browser_page, browser_page.page
    page.evaluate("() => window.app.graph.clear()")
    box = page.locator("#graph-canvas").bounding_box()
    page.mouse.dblclick(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)  # empty canvas
    # 1.32's search box (PrimeVue AutoComplete) and 1.49's v2 box (an input with role=combobox)
    search = page.locator(".comfy-vue-node-search-box input, input[role='combobox']").first
    try:
        search.wait_for(state="visible", timeout=10_000)
    except Exception:  # the same box through its command, where a version binds the double click elsewhere
        page.evaluate("() => window.app.extensionManager.command.execute('Workspace.SearchBox.Toggle')")
        search.wait_for(state="visible", timeout=10_000)
    search.fill("Calibri")
    page.wait_for_timeout(1500)  # the result list is filtered as one types
    options = page.locator("[role='option']")
    listed = [options.nth(k).inner_text() for k in range(options.count())]
    session.shot("01-node-search-calibri")
    page.keyboard.press("Escape")
    text = "\n".join(listed)
    missing = [name for name in calibri_display_names(session.server).values() if name not in text]
    assert listed and not missing, f"not in the search results: {missing}; results: {listed}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_through_the_frontend(browser_page, path):
    session = browser_page
    data = json.loads(path.read_text(encoding="utf-8"))
    graph = session.load_template(path.stem)
    session.shot(f"10-{path.stem}")
    assert graph["status"] == 200, graph
    assert not graph["missing"] and not graph["unregistered"], (graph["missing"], graph["unregistered"])
    loaded = {n["id"]: n for n in graph["nodes"]}
    assert sorted(loaded) == sorted(n["id"] for n in data["nodes"])
    for node in data["nodes"]:
        got = loaded[node["id"]]
        assert got["type"] == node["type"]
        # (a node without widgets is saved with [] by one frontend and without the key by another)
        assert (got["widgets_values"] or []) == (node.get("widgets_values") or []), \
            f"{path.name} node {node['id']} ({node['type']})"
    # The saved view is the one the frontend opens, and it draws node text (titles, widgets, labels).
    assert graph["scale"] == pytest.approx(data["extra"]["ds"]["scale"]), graph["scale"]
    assert graph["lowQuality"] is False, f"{path.name}: opens at zoom {graph['scale']}, where no node text is drawn"
    # The saved view shows every node: nothing behind the side bar, the tab bar or the minimap, nothing off the page.
    def covered(b):
        return any(b["left"] < o["right"] and o["left"] < b["right"] and b["top"] < o["bottom"]
                   and o["top"] < b["bottom"] for o in graph["overlays"])
    hidden = [b["id"] for b in graph["boxes"] if b["left"] < CANVAS_LEFT or b["top"] < CANVAS_TOP
              or b["right"] > VIEWPORT["width"] or b["bottom"] > VIEWPORT["height"] or covered(b)]
    assert not hidden, f"{path.name}: nodes {hidden} are not fully in view on open at " \
                       f"{VIEWPORT['width']}x{VIEWPORT['height']}: {graph['boxes']}, overlays {graph['overlays']}"
    assert not session.pack_errors(), "\n".join(session.pack_errors())


def test_combine_shows_only_the_widgets_of_connected_inputs(browser_page):
    """web/calibri_combine.js hides weight_k / prompt_k while calibration_k is unconnected, shows them once it is
    connected, and never changes what the workflow saves."""
    session = browser_page
    data = json.loads((REPO / "example_workflows" / f"{COMBINE_WORKFLOW}.json").read_text(encoding="utf-8"))
    saved = next(n["widgets_values"] for n in data["nodes"] if n["type"] == "CalibriCombine")
    assert session.load_template(COMBINE_WORKFLOW)["status"] == 200
    state = session.page.evaluate("""() => {
        const node = window.app.graph._nodes.find(n => n.type === 'CalibriCombine');
        const shown = () => node.widgets.filter(w => !w.hidden).map(w => w.name);
        const before = shown();
        const member = node.getInputNode(node.findInputSlot('calibration_1'));
        member.connect(0, node, node.findInputSlot('calibration_3'));
        const connected = shown();
        node.disconnectInput(node.findInputSlot('calibration_3'));
        return {before, connected, after: shown(), values: node.serialize().widgets_values};
    }""")
    assert state["before"] == state["after"] == ["weight_1", "prompt_1", "weight_2", "prompt_2"], state
    assert state["connected"] == ["weight_1", "prompt_1", "weight_2", "prompt_2", "weight_3", "prompt_3"], state
    assert state["values"] == saved, state
    assert not session.pack_errors(), "\n".join(session.pack_errors())


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_template_thumbnail_is_served(browser_page, path):
    size = browser_page.page.evaluate("""async ([module, name]) => {
        const response = await fetch(`api/workflow_templates/${module}/${name}.jpg`);
        if (!response.ok) return {status: response.status};
        const bitmap = await createImageBitmap(await response.blob());
        return {status: response.status, width: bitmap.width, height: bitmap.height};
    }""", [PACK_MODULE, path.stem])
    assert size["status"] == 200 and size["width"] >= 256 and size["height"] >= 128, size


def test_plot_template_runs_and_shows_its_charts(browser_page):
    session, page = browser_page, browser_page.page
    graph = session.load_template(PLOT_WORKFLOW)
    assert graph["status"] == 200 and not graph["missing"]
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    # Each CalibriPlot node shows its charts itself (an output node with a preview), one image per member.
    page.wait_for_function("""() => {
        const plots = window.app.graph._nodes.filter(n => n.type === 'CalibriPlot');
        return plots.length > 0 && plots.every(n => n.imgs && n.imgs.length > 0 &&
                                                    n.imgs.every(img => img.complete && img.naturalWidth > 0));
    }""", timeout=TIMEOUT_MS)
    page.evaluate("() => window.app.canvas.draw(true, true)")
    page.wait_for_timeout(500)
    session.shot("20-plot-template-ran")
    shown = page.evaluate("""() => window.app.graph._nodes.filter(n => n.type === 'CalibriPlot').map(n => ({
        id: n.id, images: n.imgs.length, width: n.imgs[0].naturalWidth, height: n.imgs[0].naturalHeight,
        src: n.imgs[0].src}))""")
    assert all(s["width"] >= 256 and s["height"] >= 256 and "/view?" in s["src"] for s in shown), shown
    views = [url for status, url in session.failed if "/view?" in url]
    assert not views, views
    assert not session.pack_errors(), "\n".join(session.pack_errors())


def test_templates_browser_shows_every_card_with_its_thumbnail(browser_page):
    """Templates → calibri: one card per workflow, each with its thumbnail loaded (not a blank tile)."""
    session, page = browser_page, browser_page.page
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    # The pack's own category under Extensions / Custom Nodes (1.32's search filter leaves its cards' lazy
    # images unloaded; the category view loads them in both versions)
    category = page.locator("[role='dialog']").get_by_text(PACK_MODULE, exact=True).first
    category.wait_for(state="visible", timeout=30_000)
    category.click()
    # 1.32 puts the thumbnail URL in <img src>; 1.49 fetches it and shows a blob: URL. Both fetch the same file.
    thumbnails = [f"/api/workflow_templates/{PACK_MODULE}/{p.stem}.jpg" for p in WORKFLOWS]
    try:
        page.wait_for_function("""([count]) => {
            const images = [...document.querySelectorAll("[role='dialog'] img")];
            return images.length === count && images.every(img => img.complete && img.naturalWidth > 0);
        }""", arg=[len(WORKFLOWS)], timeout=30_000)
        page.wait_for_timeout(500)
    finally:
        session.shot("30-templates-browser-calibri")
    sizes = page.evaluate("""() => [...document.querySelectorAll("[role='dialog'] img")].map(img =>
        [img.naturalWidth, img.naturalHeight])""")
    assert sizes == [list(SIZE)] * len(WORKFLOWS), sizes
    fetched = {urlsplit(url).path for status, url in session.responses if status == 200}
    assert set(thumbnails) <= fetched, sorted(set(thumbnails) - fetched)
    # 1.32 may also show its Missing Models dialog (left by an earlier template's loaders): read the templates one
    text = page.locator("[role='dialog']").filter(has_text=PACK_MODULE).first.inner_text()
    assert all(p.stem in text for p in WORKFLOWS), text
    page.reload(wait_until="load")  # the dialog keeps focus; a reload is the version-independent way out
