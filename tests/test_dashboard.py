"""What a person watching a run sees: tasks named after the steps (in the graph, and on
the dashboard in a real browser), progress per step, the dashboard link."""

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from dask.utils import key_split

from coron_dask.io.staging import staged_products
from coron_dask.pipeline.build import build_products
from coron_dask.planning.block_plan import Workers
from coron_dask.runtime.progress import by_step, link, step_of, summary, written_kind

#: every task group a run may show: the steps, the writes and the products
STEP_GROUPS = {
    "read-calints",
    "outlier_detection-median",
    "outlier_detection-flag",
    "align_refs-fill",
    "align_refs-fit",
    "align_refs-shift",
    "klip-basis",
    "klip-subtract",
    "resample",
}
KINDS = {"crfints", "psfstack", "psfalign", "psfsub", "i2d"}
GROUPS = (
    STEP_GROUPS
    | {f"write_{kind}" for kind in (*KINDS, "scratch")}
    | {f"{kind}-product" for kind in KINDS}
    | {"calwebb_coron3"}
)
#: dask's own names the dashboard showed before the tasks were named after the steps
DASK_NAMES = ("getitem", "rechunk", "store-map", "finalize", "concatenate", "astype", "where")
SMALL_PLAN = Workers(1, 1, 2**31, 2**26)


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("align-fit-0123abcd", "align_refs-fit"),
        ("align-shift-sci-write-psfalign-sci-getitem", "align_refs-shift"),  # fused
        ("original-read-sci-read-sci", "read-calints"),
        ("klip-gram-klip-weights", "klip-basis"),
        ("concatenate-resample-drizzle-resample-sum", "resample"),
        ("astype-getitem-write-i2d-sci", "write_i2d"),
        ("outlier-flag-dq-write-crfints-dq", "outlier_detection-flag"),
        ("rechunk-merge", None),
        ("getitem", None),
    ],
)
def test_step_of_names(name, step):
    assert step_of(name) == step


def test_written_kind():
    assert written_kind("align-shift-sci-write-psfalign-sci-getitem") == "psfalign"
    assert written_kind("write-i2d-wht-4a8c") == "i2d"
    assert written_kind("align-fit-4a8c") is None


@pytest.mark.parametrize(("align_to", "blocks"), [("each", (1, 2)), ("first", (2, 4))])
def test_every_task_is_named_after_its_step(asn, tmp_path, align_to, blocks):
    """Each task of a run's graph belongs to a step, a product's writes or a product's
    end, none to dask's own operations; every step is there; and the renamed graph
    computes the same products (its keys are only renamed)."""
    built = build_products(
        asn,
        tmp_path / "named",
        workers=SMALL_PLAN,
        align_to=align_to,
        integrations=blocks[0],
        psfs=blocks[1],
    )
    with staged_products(built) as writes:
        run = by_step(writes)
        groups = {key_split(key) for key in run.__dask_graph__()}
    assert groups <= GROUPS, groups - GROUPS
    assert STEP_GROUPS <= groups
    assert not [g for g in groups if g.startswith(DASK_NAMES)]


def test_summary_orders_steps_and_counts_products():
    everything = {
        "write_psfsub": 4,
        "align_refs-fit": 10,
        "read-calints": 5,
        "psfsub-product": 1,
        "calwebb_coron3": 1,
    }
    remaining = {"write_psfsub": 4, "align_refs-fit": 3, "psfsub-product": 1}
    steps, products = summary(remaining, everything)
    assert steps == [("read calints", 5, 5), ("align_refs fit", 7, 10), ("write psfsub", 0, 4)]
    assert products == [("psfsub", 0, 1)]


def test_link_says_how_to_tunnel():
    text = link("http://127.0.0.1:8790/status")
    assert text.startswith("http://127.0.0.1:8790/status (from another machine: ssh -L ")
    assert "8790:127.0.0.1:8790" in text and "http://localhost:8790/status" in text


BROWSER_NAMES = """() => {
    // every name a Bokeh data source of the page holds: the progress bars' and the task
    // stream's labels are drawn on a canvas from these
    const names = new Set();
    for (const doc of window.Bokeh.documents) {
        for (const model of doc.all_models) {
            const data = model.data;
            if (!data) continue;
            const column = data instanceof Map ? data.get("name") : data["name"];
            if (column) for (const name of column) names.add(String(name));
        }
    }
    return [...names];
}"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is not installed: make test installs it (apt-get install chromium)"
    return path


def _names_on(page, url: str | None, wanted: set, timeout: float = 60) -> set:
    """The task names the dashboard page ``url`` (None: the one open) shows, once it shows
    all of ``wanted`` (the page polls the scheduler)."""
    if url is not None:
        page.goto(url)
        page.wait_for_function("() => window.Bokeh && window.Bokeh.documents.length > 0")
    deadline = time.monotonic() + timeout
    while True:
        # the task stream also draws moving a task's result: transfer-, disk-read-<task>,
        # and a worker spilling results to disk (when the machine is short of memory):
        # disk-write, an activity of distributed's, not a task
        names = {
            key_split(name).removeprefix("transfer-").removeprefix("disk-read-")
            for name in page.evaluate(BROWSER_NAMES)
        } - {"disk-write", "disk-read"}
        if wanted <= names or time.monotonic() > deadline:
            return names
        page.wait_for_timeout(250)


def test_dashboard_shows_the_steps_in_a_browser(asn, tmp_path):
    """Chromium, driven by Playwright, on the dashboard of a run: the progress page lists
        the run's steps (while the run waits for a worker, so it cannot have ended), then the
        task stream lists the steps that ran, and neither shows dask's own names. A screenshot
        of the task stream is saved, and one of the progress page part of the way through
    (``CORON_DASK_DASHBOARD_PNG`` names a folder to copy them to: docs/ keeps them)."""
    from distributed import Client, LocalCluster
    from playwright.sync_api import sync_playwright

    from coron_dask.runtime.cluster import execute

    built = build_products(asn, tmp_path / "out", workers=SMALL_PLAN, integrations=1, psfs=2)
    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster, set_as_default=False) as client,
        staged_products(built) as writes,
        sync_playwright() as playwright,
    ):
        base = f"http://127.0.0.1:{cluster.scheduler.http_server.port}"
        failure: list = []

        def run() -> None:
            try:
                execute(writes, client, progress=False)
            except BaseException as error:  # seen by the test below
                failure.append(error)

        runner = threading.Thread(target=run)
        runner.start()
        while not cluster.scheduler.tasks:  # the graph has reached the scheduler
            assert runner.is_alive(), failure
            time.sleep(0.05)
        browser = playwright.chromium.launch(
            executable_path=_chromium(),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        progress = _names_on(page, f"{base}/individual-progress", STEP_GROUPS)
        stream = browser.new_page(viewport={"width": 1600, "height": 1000})
        stream.goto(f"{base}/individual-task-stream")  # its record starts when it opens
        stream.wait_for_function("() => window.Bokeh && window.Bokeh.documents.length > 0")
        cluster.scale(1)  # now the run can go
        total = len(cluster.scheduler.tasks)
        while runner.is_alive():  # a picture of the progress part of the way through
            done = sum(t.state in ("memory", "released") for t in cluster.scheduler.tasks.values())
            if done > 0.4 * total:
                page.screenshot(path=str(tmp_path / "progress.png"))
                break
            time.sleep(0.05)
        runner.join(timeout=300)
        assert not runner.is_alive() and not failure, failure
        ran = _names_on(stream, None, STEP_GROUPS)
        screenshot = tmp_path / "task-stream.png"
        stream.screenshot(path=str(screenshot))
        browser.close()
    assert STEP_GROUPS <= progress, STEP_GROUPS - progress
    assert progress <= GROUPS, progress - GROUPS
    assert STEP_GROUPS <= ran, STEP_GROUPS - ran
    assert ran <= GROUPS, ran - GROUPS
    assert screenshot.stat().st_size > 10_000
    keep = os.environ.get("CORON_DASK_DASHBOARD_PNG")  # a folder for both pictures
    if keep:
        for picture in tmp_path.glob("*.png"):
            shutil.copy(picture, Path(keep) / f"dashboard-{picture.name}")
