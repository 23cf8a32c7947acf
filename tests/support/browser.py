"""Checks of what the MLflow 3.x web UI (MLflow 3.17.2) shows, in a real headless Chromium driven by Playwright.

Every check navigates to a URL of the MLflow single-page app and asserts on the page's DOM text (what a
user sees), never on the REST API. Each raises ``AssertionError`` with a message saying what was expected
and what the page showed.

Usage (Playwright's sync API)::

    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = new_page(browser)
        check_runs_list(page, base_url, experiment_id, parents, children)
        screenshot(page, "runs.png")

URLs used (hash routes of MLflow 3.17.2's React router, ``mlflow/server/js/src/.../routes.ts``):

* runs table:      ``#/experiments/<id>/runs?workflowType=machine_learning``
* compare runs:    ``#/compare-runs?runs=["<run id>",...]&experiments=["<exp id>"]``
* registered model ``#/models/<name>``
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from playwright.sync_api import Browser, Locator, Page, Playwright, expect
from playwright.sync_api import Error as PlaywrightError

# Debian's `chromium` (installed by .ci/run), else Chrome or Chromium from PATH (GitHub's runners have
# google-chrome); $CHROMIUM names another. Nothing downloads a browser.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Without the background-networking flags Chromium keeps trying to reach Google's services, and on a
# closed network those connections are refused; --no-sandbox because CI runs as root.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
VIEWPORT = {"width": 1600, "height": 1000}
TIMEOUT_MS = 20_000  # the first page of a fresh browser loads a ~10 MB JS bundle; keep generous

# Run before every page script: keep the "MLflow Assistant" side panel (opened automatically on the first
# visit from localhost) closed, so it neither covers the page nor narrows the tables in screenshots.
_INIT_SCRIPT = """
try {
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
  // the modal "Detect Issues in Your Traces" hint of the GenAI overview (a user clicks "Got it")
  localStorage.setItem('mlflow.detectIssues.guidanceShown_v1', 'true');
} catch (e) {}
"""


# --------------------------------------------------------------------------------------------- browser


def chromium() -> str | None:
    """The browser to drive: $CHROMIUM, else the first of :data:`CHROMIUM_NAMES` on PATH; None when none is."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def missing_reason() -> str | None:
    """None when a browser test can run here, else one line saying how to install what is missing."""
    if chromium() is None:
        return "no Chromium to drive: apt-get install -y chromium (or set CHROMIUM to a Chrome binary)"
    return None


def launch_chromium(pw: Playwright, **kwargs) -> Browser:
    """Headless Chromium (:func:`chromium`) through Playwright; no Playwright-downloaded browser."""
    return pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, headless=True, **kwargs)


def new_page(
    browser: Browser,
    viewport: Mapping[str, int] = VIEWPORT,
    workflow: str | None = None,
    credentials: Mapping[str, str] | None = None,
) -> Page:
    """A page in a fresh context (no stored UI state), with MLflow's assistant panel kept closed.

    ``workflow="machine_learning"`` starts as a user who chose "Model training" in the UI's
    GenAI / Model training toggle (MLflow keeps that choice in localStorage); ``None`` is a first visit,
    for which MLflow 3.17 defaults to "GenAI". ``credentials`` (``username``, ``password``) answer a server's
    basic auth."""
    auth = dict(credentials) if credentials else None
    context = browser.new_context(viewport=dict(viewport), http_credentials=auth)
    context.add_init_script(_INIT_SCRIPT)
    if workflow is not None:
        value = json.dumps(json.dumps(workflow))
        context.add_init_script(
            "try { if (localStorage.getItem('mlflow.workflowType_v1') === null) "
            f"localStorage.setItem('mlflow.workflowType_v1', {value}); }} catch (e) {{}}"
        )
    context.set_default_timeout(TIMEOUT_MS)
    return context.new_page()


def _goto(page: Page, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded")


# ------------------------------------------------------------------------------------------------ URLs


def runs_url(base_url: str, experiment_id: str) -> str:
    """The experiment's classic (model training) runs table. ``workflowType=machine_learning`` switches the
    UI's global GenAI / Model training toggle for this page (without it, the table is the same but the side
    bar is the GenAI one, with the tab labelled "Training runs")."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def compare_url(base_url: str, run_ids: Sequence[str], experiment_ids: Sequence[str]) -> str:
    """MLflow's own ``getCompareRunPageRoute``: JSON arrays of ids in the query of the hash route."""
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")), safe="[],")
    exps = quote(json.dumps([str(e) for e in experiment_ids], separators=(",", ":")), safe="[],")
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={exps}"


def model_url(base_url: str, model_name: str) -> str:
    return f"{base_url.rstrip('/')}/#/models/{quote(model_name, safe='')}"


# ------------------------------------------------------------------------------------ experiment page


def experiment_url(base_url: str, experiment_id: str) -> str:
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}"


def check_experiment_default_view(page: Page, base_url: str, experiment_id: str) -> str:
    """Open the experiment as a link to it does (``#/experiments/<id>``) and return which view the UI
    shows: "genai-overview" (MLflow 3.17's default on a first visit, whatever the experiment's
    ``mlflow.experimentKind`` tag) or "runs" (after the user chose "Model training")."""
    _goto(page, experiment_url(base_url, experiment_id))
    overview = page.get_by_role("heading", name="Overview", exact=True)
    runs = page.locator(".ag-root")
    expect(overview.or_(runs).first, "the experiment page (GenAI overview or runs table)").to_be_visible(
        timeout=TIMEOUT_MS
    )
    return "genai-overview" if overview.is_visible() else "runs"


def open_training_runs_like_a_user(page: Page, base_url: str, experiment_id: str) -> None:
    """The clicks the user docs describe: open the experiment, click "Model training" in the
    "GenAI | Model training" switch at the top of the side bar; the runs table opens."""
    _goto(page, experiment_url(base_url, experiment_id))
    toggle = page.get_by_text("Model training", exact=True)
    expect(toggle, '"Model training" switch in the side bar').to_be_visible(timeout=TIMEOUT_MS)
    toggle.click()
    expect(page, "URL after clicking 'Model training'").to_have_url(
        re.compile(rf"#/experiments/{experiment_id}/runs\b"), timeout=TIMEOUT_MS
    )
    expect(page.locator(".ag-root"), "runs table after clicking 'Model training'").to_be_visible(timeout=TIMEOUT_MS)
    expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible(timeout=TIMEOUT_MS)


# ----------------------------------------------------------------------------------------------- runs

# One entry per run-name link in the AG Grid runs table: its row's run id (``row-id``), position
# (``row-index``), the link's text and its x offset (nested runs are indented).
_RUN_ROWS_JS = """
() => {
  const out = {};
  for (const a of document.querySelectorAll('.ag-root [role=row][row-id] [role=gridcell] a[href*="/runs/"]')) {
    const row = a.closest('[role=row]');
    const id = row.getAttribute('row-id');
    if (!a.href.endsWith('/runs/' + id)) continue;   // only the run's own name link
    out[id] = {id, index: Number(row.getAttribute('row-index')), name: a.innerText.trim(),
               x: a.getBoundingClientRect().left};
  }
  return Object.values(out).sort((p, q) => p.index - q.index);
}
"""


def _run_rows(page: Page) -> list[dict]:
    return page.evaluate(_RUN_ROWS_JS)


def _run_name_link(page: Page, run_id: str) -> Locator:
    return page.locator(f'.ag-root [role=row][row-id="{run_id}"] [role=gridcell] a[href$="/runs/{run_id}"]')


def _scroll_grid_to_row(page: Page, run_id: str, max_load_more: int = 10) -> None:
    """AG Grid renders only the rows near its viewport: scroll its body until ``run_id``'s row exists.
    MLflow loads runs 100 at a time; at the end of the table, click its "Load more" row button."""
    link = _run_name_link(page, run_id)
    viewport = page.locator(".ag-root .ag-body-viewport").first
    load_more = page.locator(".ag-root").get_by_role("button", name="Load more", exact=True)
    viewport.evaluate("el => el.scrollTop = 0")
    _next_frame(page)
    deadline = time.monotonic() + 2 * TIMEOUT_MS / 1000
    while link.count() == 0 and time.monotonic() < deadline:
        moved = viewport.evaluate(
            "el => { const t = el.scrollTop; el.scrollTop = t + el.clientHeight * 0.8; return el.scrollTop > t; }"
        )
        _next_frame(page)
        if moved:
            continue
        if max_load_more > 0 and load_more.count() and load_more.first.is_enabled():
            max_load_more -= 1
            before = len(_run_rows(page))
            load_more.first.click()
            _wait_rows(page, lambda r, before=before: len(r) != before or link.count() > 0)
            continue
        break


def _next_frame(page: Page) -> None:
    """Let React/AG Grid render after a scroll (two animation frames, not a fixed sleep)."""
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def check_runs_list(
    page: Page,
    base_url: str,
    experiment_id: str,
    parents: Mapping[str, str],
    children: Mapping[str, Sequence[str]],
) -> None:
    """The experiment's runs table lists each parent run (``{name: run id}``) by name, and expanding a
    parent (the [+] button before its name) shows its stage runs ``children[name]`` nested under it:
    right below it in the table and indented.

    Child runs are collapsed under their parent when the page opens; they are matched by name.
    """
    _goto(page, runs_url(base_url, experiment_id))
    try:
        # the table is drawn before the runs arrive: wait for a first run row
        expect(page.locator(".ag-root [role=row][row-id]").first, "runs in the runs table").to_be_attached(
            timeout=TIMEOUT_MS
        )
        for name, run_id in parents.items():
            link = _run_name_link(page, run_id)
            if link.count() == 0:
                _scroll_grid_to_row(page, run_id)
            expect(link, f"parent run {name!r} ({run_id}) in the runs table").to_have_text(name, timeout=TIMEOUT_MS)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nrows shown: {_describe_rows(page)}") from None

    for name, run_id in parents.items():
        expected = list(children.get(name, ()))
        if not expected:
            continue
        _scroll_grid_to_row(page, run_id)
        if _nested_under(_run_rows(page), run_id):  # already expanded (state kept in localStorage)
            _check_nested(page, name, run_id, expected)
            continue
        # The expander is the only button in the parent's "Run Name" cell (it has no accessible name).
        cell = page.locator(f'.ag-root [role=row][row-id="{run_id}"] [role=gridcell]:has(a[href$="/runs/{run_id}"])')
        expander = cell.locator("button").first
        try:
            expect(expander, f"expand button of parent run {name!r}").to_be_visible(timeout=TIMEOUT_MS)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n(the UI shows an expander only for runs that have child runs)") from None
        expander.click()
        n, rid = len(expected), run_id
        _wait_rows(page, lambda rows, n=n, rid=rid: len(_nested_under(rows, rid)) >= n)
        _check_nested(page, name, run_id, expected)


def _check_nested(page: Page, name: str, run_id: str, expected: Sequence[str]) -> None:
    got = sorted(r["name"] for r in _nested_under(_run_rows(page), run_id))
    if got != sorted(expected):
        raise AssertionError(
            f"after expanding parent run {name!r}, the runs nested under it are {got}, "
            f"expected {sorted(expected)}\nrows shown: {_describe_rows(page)}"
        )


def _wait_rows(page: Page, ready, timeout_s: float = TIMEOUT_MS / 1000) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready(_run_rows(page)) and time.monotonic() < deadline:
        page.wait_for_timeout(100)  # poll; returns as soon as the rows are there


def _nested_under(rows: list[dict], parent_id: str) -> list[dict]:
    """Rows right below the parent's row that are indented further than it."""
    out = []
    index = next((i for i, r in enumerate(rows) if r["id"] == parent_id), None)
    if index is None:
        return out
    parent = rows[index]
    for row in rows[index + 1 :]:
        if row["x"] <= parent["x"] + 1:
            break
        out.append(row)
    return out


def _describe_rows(page: Page) -> str:
    try:
        rows = _run_rows(page)
    except PlaywrightError:
        return "?"
    if not rows:
        return "(none)"
    base = min(r["x"] for r in rows)
    return ", ".join(("  " * round((r["x"] - base) / 20)) + f"{r['name']}[{r['id'][:8]}]" for r in rows)


# -------------------------------------------------------------------------------------------- compare


def format_metric(value: float) -> str:
    """How MLflow's UI prints a metric (``Utils.formatMetric``), for messages."""
    if value == 0:
        return "0"
    a = abs(value)
    if a < 1e-3:
        return f"{value:.3e}"
    digits = 3 if a < 10 else 2 if a < 100 else 1
    r = math.floor(value * 10**digits + 0.5) / 10**digits
    return str(int(r)) if r == int(r) else repr(r)


def _metric_matches(shown: str, value: float) -> bool:
    """``shown`` (as the UI rounded it) is ``value``: 3 decimals below 10, 2 below 100, else 1."""
    try:
        got = float(shown.replace(",", ""))
    except ValueError:
        return False
    a = abs(value)
    if a < 1e-3:
        return math.isclose(got, value, rel_tol=1e-3, abs_tol=1e-12)
    tol = 0.5e-3 if a < 10 else 0.5e-2 if a < 100 else 0.5e-1
    return abs(got - value) <= tol + 1e-9


def check_compare(
    page: Page,
    base_url: str,
    experiment_id: str,
    runs: Mapping[str, str],
    params: Mapping[str, Mapping[str, str]],
    metrics: Mapping[str, Mapping[str, float]],
) -> None:
    """The compare page of ``runs`` (``{run name: run id}``, in column order) shows, for each run:

    * ``params[param][run name]`` in the Parameters table row of ``param`` (the changed param, e.g.
      ``{"baselines.ridge.alpha": {"pipeline": "1.0", "ridge-2": "2.0"}}``), and
    * ``metrics[metric][run name]`` (as MLflow rounds it) in the Metrics row of ``metric``.

    Also checks that each changed param is still listed with "Show diff only" on.
    """
    names, ids = list(runs), list(runs.values())
    _goto(page, compare_url(base_url, ids, [experiment_id]))
    expect(page.get_by_text(re.compile(rf"Comparing {len(ids)} Runs"))).to_be_visible(timeout=TIMEOUT_MS)

    # Column order: the "Run ID:" row of "Run details" lists the runs left to right.
    run_id_row = page.locator("tr").filter(has=page.locator("th", has_text=re.compile(r"^Run ID:$")))
    expect(run_id_row.locator("a"), "Run ID row of the compare page").to_have_text(ids, timeout=TIMEOUT_MS)
    run_name_row = page.locator("tr").filter(has=page.locator("th", has_text=re.compile(r"^Run Name:$")))
    expect(run_name_row.locator("td"), "Run Name row of the compare page").to_have_text(names, timeout=TIMEOUT_MS)

    # The Parameters section is the closest block around its "Show diff only" switch that holds a table.
    switch = page.get_by_role("switch", name="Parameters - Show diff only")
    param_table = switch.locator("xpath=ancestor::div[.//table][1]//table")
    for param, values in params.items():
        row = param_table.locator("tr").filter(has=page.locator("th", has_text=re.compile(f"^{re.escape(param)}$")))
        expect(row, f"Parameters row {param!r} on the compare page").to_have_count(1, timeout=TIMEOUT_MS)
        want = [str(values[n]) for n in names]
        expect(row.locator("td"), f"values of param {param!r} for runs {names}").to_have_text(
            want,
            timeout=3000,  # the row is there: its values are too
        )

    for metric, values in metrics.items():
        shown = _metric_row_values(page, metric, len(ids))
        want = [values[n] for n in names]
        if shown is None:
            raise AssertionError(
                f"metric {metric!r} is not listed in the Metrics section of the compare page; "
                f"rows rendered at the end of the search: {_metric_names(page)}"
            )
        if len(shown) != len(want) or not all(_metric_matches(s, v) for s, v in zip(shown, want, strict=True)):
            raise AssertionError(
                f"metric {metric!r} on the compare page shows {shown} for runs {names}, expected "
                f"{[format_metric(v) for v in want]} (raw {want})"
            )

    # "Show diff only" keeps the changed params.
    switch.click()
    expect(switch).to_have_attribute("aria-checked", "true", timeout=TIMEOUT_MS)
    for param, values in params.items():
        if len(set(map(str, values.values()))) > 1:
            expect(
                param_table.locator("th", has_text=re.compile(f"^{re.escape(param)}$")),
                f"changed param {param!r} with 'Show diff only' on",
            ).to_be_visible(timeout=TIMEOUT_MS)
    switch.click()
    expect(switch).to_have_attribute("aria-checked", "false", timeout=TIMEOUT_MS)


def _metrics_section(page: Page) -> Locator:
    """The Metrics section of the compare page: two react-virtualized grids, metric names (links titled
    "Plot chart") and values (one column per run)."""
    switch = page.get_by_role("switch", name="Metrics - Show diff only")
    return switch.locator("xpath=ancestor::div[.//*[@role='grid']][1]")


def _metric_names(page: Page) -> list[str]:
    return _metrics_section(page).locator('a[title="Plot chart"]').all_inner_texts()


def _metric_row_values(page: Page, metric: str, n_runs: int) -> list[str] | None:
    """The values shown in the Metrics row ``metric``, left to right; None if no such row.

    The grid shows at most ~6 rows (300 px) and renders only those: scroll it until the row exists."""
    section = _metrics_section(page)
    grids = section.get_by_role("grid")
    expect(grids, "the two grids (names, values) of the Metrics section").to_have_count(2, timeout=TIMEOUT_MS)
    names_grid, values_grid = grids.nth(0).element_handle(), grids.nth(1).element_handle()
    link = grids.nth(0).locator('a[title="Plot chart"]').filter(has_text=re.compile(f"^{re.escape(metric)}$"))
    # Scroll both grids together (MLflow syncs the names grid to the values grid only one scroll event late).
    scroll = """([names, values, step]) => {
        const t = step ? values.scrollTop + values.clientHeight * 0.8 : 0;
        const before = values.scrollTop;
        values.scrollTop = t; names.scrollTop = values.scrollTop;
        return !step || values.scrollTop > before;
    }"""
    page.evaluate(scroll, [names_grid, values_grid, False])
    _next_frame(page)
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while link.count() == 0:
        moved = page.evaluate(scroll, [names_grid, values_grid, True])
        _next_frame(page)
        if not moved or time.monotonic() > deadline:
            return None
    # Cells of one row share their inline `top` in both grids (react-virtualized, rowHeight 45). The values
    # grid may render its cells a frame after the names grid: poll until the row has one cell per run.
    deadline = time.monotonic() + 5
    while True:
        cells = link.evaluate(
            """(a, valuesGrid) => {
                 const top = a.parentElement.style.top;
                 return [...valuesGrid.querySelectorAll('[role=rowgroup] > div')]
                   .filter(c => c.style.top === top)
                   .sort((p, q) => parseFloat(p.style.left) - parseFloat(q.style.left))
                   .map(c => c.innerText.trim());
               }""",
            values_grid,
        )
        if len(cells) >= n_runs or time.monotonic() > deadline:
            return cells
        _next_frame(page)


# ------------------------------------------------------------------------------------------ registry


def check_model_aliases(page: Page, base_url: str, model_name: str, aliases: Mapping[str, str | int]) -> None:
    """The registered model page lists each ``{alias: version}`` as an "@ alias" tag in the Aliases cell of
    that version's row (and on no other version's row)."""
    _goto(page, model_url(base_url, model_name))
    expect(page.get_by_text(model_name, exact=True).first, f"registered model {model_name!r}").to_be_visible(
        timeout=TIMEOUT_MS
    )
    version_rows = page.get_by_role("row").filter(has=page.locator('a[href*="/versions/"]'))
    expect(version_rows.first, f"version rows of registered model {model_name!r}").to_be_visible(timeout=TIMEOUT_MS)
    for alias, version in aliases.items():
        row = page.get_by_role("row").filter(has=page.locator(f'a[href$="/versions/{version}"]'))
        expect(row, f"row of version {version} of {model_name!r}").to_have_count(1, timeout=TIMEOUT_MS)
        tag = row.locator(f'[title="{alias}"]')
        try:
            expect(tag, f"alias tag '@ {alias}' on version {version}").to_be_visible(timeout=TIMEOUT_MS)
            expect(tag).to_have_text(re.compile(rf"@\s*{re.escape(alias)}$"), timeout=TIMEOUT_MS)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nversion rows shown: {version_rows.all_inner_texts()}") from None
        elsewhere = version_rows.filter(has_not=page.locator(f'a[href$="/versions/{version}"]')).locator(
            f'[title="{alias}"]'
        )
        expect(elsewhere, f"alias {alias!r} on a version other than {version}").to_have_count(0, timeout=TIMEOUT_MS)


# --------------------------------------------------------------------------------------- screenshots


_SCROLL_HEIGHT_JS = """
() => {
  // MLflow's layout is a fixed-height app whose content scrolls inside inner elements, so Playwright's
  // full_page alone only captures the viewport: measure the tallest inner scroll content instead.
  let extra = 0;
  for (const el of document.querySelectorAll('body *')) {
    const s = getComputedStyle(el);
    if ((s.overflowY === 'auto' || s.overflowY === 'scroll') && el.scrollHeight > el.clientHeight + 1
        && el.clientHeight > 200 && !el.closest('.ag-root')) {
      extra = Math.max(extra, el.scrollHeight - el.clientHeight);
    }
  }
  return Math.max(document.documentElement.scrollHeight, window.innerHeight) + extra;
}
"""


def screenshot(page: Page, path: str | Path, max_height: int = 6000) -> Path:
    """A full-page PNG of the current view: the viewport is grown to the height of the page's scrolled
    content (MLflow scrolls inside inner panes), then restored."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size or dict(VIEWPORT)
    page.evaluate("() => document.activeElement && document.activeElement.blur && document.activeElement.blur()")
    height = min(max_height, int(page.evaluate(_SCROLL_HEIGHT_JS)))
    if height > size["height"]:
        page.set_viewport_size({"width": size["width"], "height": height})
        _next_frame(page)
    try:
        page.screenshot(path=str(path), full_page=True, animations="disabled")
    finally:
        page.set_viewport_size(size)
    return path
