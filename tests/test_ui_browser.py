"""The MLflow UI, as a user sees it after ``hvdkit scale``: Debian's chromium, driven headless by
Playwright, on a real ``mlflow server`` started the way ``hvdkit ui`` starts it, reading the store a
real np=1,2 sweep wrote.

Needs /usr/bin/chromium (`.ci/chromium` installs it; CI runs that first). Skipped where it is missing,
except in CI (env CI set), where a missing browser fails. The browser is never downloaded
(no `playwright install`). `--tutorial-shots docs/img` also saves the screenshots that illustrate
docs/tutorial.md.

MLflow 3 opens in GenAI mode: the "Model training" switch shows training runs. The UI polls, so
no page ever reaches "networkidle": pages are loaded to "domcontentloaded" and then waited on by
what they must show.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow import MlflowClient

from hvdkit import ui
from hvdkit.tracking import keys

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 800}
TIMEOUT_MS = 60_000  # generous: CI machines are small and busy
# the runs table's expand/collapse button, and the "+" (collapsed) icon it shows before a click
EXPAND = 'button[data-component-id$="runnamecellrenderer.tsx_46"]'
COLLAPSED = EXPAND + ':has(path[d^="M7.25 7.25V4.5"])'

pytestmark = [pytest.mark.system, pytest.mark.horovod, pytest.mark.slow]


def _browser_missing() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (install it with .ci/chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "Playwright is missing (pip install -e '.[dev]')"
    return None


@dataclass
class Store:
    uri: str
    base_url: str
    experiment_id: str
    client: MlflowClient
    sweep: str = ""
    jobs: dict[int, str] = field(default_factory=dict)  # np -> job (parent) run id
    ranks: dict[tuple[int, int], str] = field(default_factory=dict)  # (np, rank) -> child run id
    parents: dict[str, str] = field(default_factory=dict)  # run id -> parent run id
    names: dict[str, str] = field(default_factory=dict)  # run id -> run name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((ui.HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(digits_sweep):
    why = _browser_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must run the browser test")
        pytest.skip(why)
    tmp, uri = digits_sweep["tmp"], digits_sweep["uri"]  # conftest: the sweep test_report reads too

    client = MlflowClient(tracking_uri=uri)
    exp_id = ui.experiment_id(uri, "hvdkit")
    assert exp_id is not None
    s = Store(uri, "", exp_id, client)
    for r in client.search_runs([exp_id]):
        rid, tags = r.info.run_id, r.data.tags
        s.names[rid] = r.info.run_name
        if keys.MLFLOW_PARENT_RUN_ID in tags:
            s.parents[rid] = tags[keys.MLFLOW_PARENT_RUN_ID]
        role = tags.get(keys.TAG_ROLE)
        if role == keys.ROLE_SWEEP:
            s.sweep = rid
        elif role == keys.ROLE_PARENT:
            s.jobs[int(tags[keys.TAG_WORLD_SIZE])] = rid
        elif role == keys.ROLE_RANK:
            s.ranks[(int(tags[keys.TAG_WORLD_SIZE]), int(tags[keys.TAG_RANK]))] = rid
    assert s.sweep and sorted(s.jobs) == [1, 2] and sorted(s.ranks) == [(1, 0), (2, 0), (2, 1)], s

    # the server `hvdkit ui` starts (same command, same environment), on a free port
    port = _free_port()
    s.base_url = f"http://{ui.HOST}:{port}"
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(ui.server_command(port), env=ui.server_env(uri), cwd=tmp, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ui.wait_until_up(f"{s.base_url}/health", proc, timeout=180)  # slow to import on a busy 2-core machine
        yield s
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(store):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    pg = browser.new_page(viewport=VIEWPORT)
    pg.set_default_timeout(TIMEOUT_MS)
    try:
        yield pg
    finally:
        pg.close()


@pytest.fixture
def shot(request, tmp_path):
    """Screenshots: always into tmp_path, and with --tutorial-shots DIR also into DIR."""
    extra = request.config.getoption("tutorial_shots")

    def take(page, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        page.screenshot(path=str(path))
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(extra) / path.name)
        return path

    return take


def _open(page, store: Store, hash_path: str) -> None:
    """Open a page of the UI in Model training mode, without the assistant panel over it."""
    page.goto(f"{store.base_url}/#/experiments/{store.experiment_id}{hash_path}", wait_until="domcontentloaded")
    toggle = page.get_by_text("Model training", exact=True)
    toggle.wait_for()
    if hash_path == "/runs":  # a run's own page shows the same either way; the switch would leave it
        toggle.click()
    close = page.get_by_role("button", name="Close")
    try:
        close.first.click(timeout=3000)  # the "MLflow Assistant" panel, open on a first visit
    except Exception:  # already closed
        pass


def _expand_all(page, store: Store) -> None:
    page.get_by_text(store.names[store.sweep], exact=True).first.wait_for()
    for _ in range(len(store.jobs) + 2):
        plus = page.locator(COLLAPSED)
        if plus.count() == 0:
            return
        plus.first.click()
        page.wait_for_timeout(400)
    assert page.locator(COLLAPSED).count() == 0, "runs still collapsed"


def _run_rows(page) -> list[tuple[str, float]]:
    """(run id, x of its name) for each row of the runs table, top to bottom."""
    rows = []
    links = page.locator('[role="row"] a[href*="/runs/"]')
    page.wait_for_timeout(500)
    for i in range(links.count()):
        link = links.nth(i)
        box = link.bounding_box()
        rows.append((box["y"], link.get_attribute("href").rstrip("/").rsplit("/", 1)[1], box["x"]))
    return [(rid, x) for _, rid, x in sorted(rows)]


def _drawn_traces(card) -> int:
    """Plotly traces with a non-empty line or marker path inside a chart card."""
    return card.locator(".scatterlayer .trace path[d]:not([d=''])").count()


def _chart(page, title: str):
    """The one chart card the chart search leaves, titled ``title``."""
    search = page.get_by_placeholder("Search metric charts")
    search.fill(title)
    heading = page.get_by_text(title, exact=True)
    heading.first.wait_for()
    # the card: the innermost element holding both the title and a plotly figure
    card = page.locator("div").filter(has=heading).filter(has=page.locator("svg.main-svg")).last
    card.locator(".scatterlayer .trace").first.wait_for()
    return card


# --- the parts hvdkit had before issue 15 --------------------------------------------------------


def test_runs_page_nests_sweep_jobs_and_ranks(page, store, shot):
    _open(page, store, "/runs")
    _expand_all(page, store)
    page.wait_for_timeout(500)
    shot(page, "ui-1-runs-nested")
    rows = _run_rows(page)
    ids = [rid for rid, _ in rows]
    assert sorted(ids) == sorted([store.sweep, *store.jobs.values(), *store.ranks.values()]), rows
    x = dict(rows)
    for child, parent in store.parents.items():
        # every run is listed below its parent and indented further: the tree is rendered, not flat
        assert ids.index(child) > ids.index(parent), (store.names[child], rows)
        assert x[child] > x[parent] + 5, (store.names[child], x[child], x[parent])
    assert ids[0] == store.sweep
    assert page.get_by_text("6 matching runs").is_visible()


def test_chart_view_draws_throughput_per_rank_and_scaling_efficiency(page, store, shot):
    _open(page, store, "/runs")
    page.locator('label:has(input[value="CHART"])').click()
    _expand_all(page, store)  # collapsed child runs are left out of the charts

    card = _chart(page, keys.SAMPLES_PER_SEC)
    legend = card.inner_text()
    # one line per run that logged it: the sweep (per N), both jobs and all three ranks
    for rid in [store.sweep, *store.jobs.values(), *store.ranks.values()]:
        assert f"{store.names[rid]} ({keys.SAMPLES_PER_SEC})" in legend, (store.names[rid], legend)
    assert _drawn_traces(card) >= 1 + len(store.jobs) + len(store.ranks), legend
    page.wait_for_timeout(500)
    shot(page, "ui-2-chart-samples-per-sec")

    card = _chart(page, keys.SCALING_EFFICIENCY)
    legend = card.inner_text()
    assert f"{store.names[store.sweep]} ({keys.SCALING_EFFICIENCY})" in legend, legend
    assert _drawn_traces(card) >= 1, legend
    page.wait_for_timeout(500)
    shot(page, "ui-3-chart-scaling-efficiency")


# --- what issue 15 adds: system metrics (helper A), the model (B), the report (C) ------------------


def test_rank_run_shows_system_metrics(page, store, shot):
    # the one child run per host that carries its host's system/ metrics
    runs = [r for r in store.client.search_runs([store.experiment_id])
            if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_RANK and r.info.run_id in store.ranks.values()
            and r.data.tags.get(keys.TAG_WORLD_SIZE) == "2"]
    holders = [r for r in runs if any(k.startswith(keys.SYSTEM_PREFIX) for k in r.data.metrics)]
    assert holders, f"no rank run of the np=2 job has {keys.SYSTEM_PREFIX} metrics in the store"
    run = holders[0]
    system = sorted(k for k in run.data.metrics if k.startswith(keys.SYSTEM_PREFIX))

    _open(page, store, f"/runs/{run.info.run_id}")
    page.get_by_role("tab", name="System metrics").click()
    # the tab titles each chart with the key less MLflow's system/ prefix, and counts them
    page.get_by_text(f"({len(system)})", exact=True).first.wait_for()
    title = keys.SYSTEM_PREFIX + "cpu_utilization_percentage"
    first = page.get_by_text(title.removeprefix(keys.SYSTEM_PREFIX), exact=True).first
    first.wait_for()
    card = page.locator("div").filter(has=first).filter(has=page.locator("svg.main-svg")).last
    card.locator(".scatterlayer .trace").first.wait_for()
    assert _drawn_traces(card) >= 1
    body = page.inner_text("body")
    # charts below the fold render when scrolled to: those in view carry the keys' short names
    shown = [k for k in system if k.removeprefix(keys.SYSTEM_PREFIX) in body.split("\n")]
    assert title in shown and len(shown) >= 2, (system, body[-2000:])
    page.wait_for_timeout(500)
    shot(page, "ui-4-rank-system-metrics")


def test_job_run_shows_its_logged_model(page, store, shot):
    job = store.jobs[2]
    _open(page, store, f"/runs/{job}")
    (model,) = [m for m in store.client.search_logged_models([store.experiment_id]) if m.source_run_id == job]
    section = page.get_by_text("Logged models (1)", exact=True).first
    section.wait_for()
    section.scroll_into_view_if_needed()  # below the metrics and params: in the screenshot's view
    # the model logged as name="model" is linked from the run's overview ...
    link = page.locator(f'a[href$="/models/{model.model_id}"]').filter(has_text="model")
    link.first.wait_for()
    page.wait_for_timeout(500)
    shot(page, "ui-5-job-logged-model")
    # ... and opens on its own page
    link.first.click()
    page.get_by_text("model", exact=True).first.wait_for()
    assert job in page.content() or store.names[job] in page.inner_text("body")


def test_sweep_report_artifact_opens(page, store, shot):
    arts = [a.path for a in store.client.list_artifacts(store.sweep, "report")]
    assert "report/report.html" in arts, arts
    _open(page, store, f"/runs/{store.sweep}/artifacts")
    page.get_by_text("report", exact=True).first.click()
    page.get_by_text("report.html", exact=True).first.click()
    # MLflow previews HTML artifacts in an iframe
    frame = page.frame_locator("iframe").first
    frame.get_by_text("Scaling report").first.wait_for()
    assert "Scaling report" in frame.locator("body").inner_text()
    page.wait_for_timeout(500)
    shot(page, "ui-6-sweep-report")
