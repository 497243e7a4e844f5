"""What a person watching a run sees: tasks named after the steps (in the graph dask
optimises, and on the dashboard in a real browser), progress per step, the dashboard link."""

import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

import dask
import pytest
from dask.core import get_deps
from dask.utils import key_split

from coron_dask import run_coron3
from coron_dask.core.names import layer_word, word_of
from coron_dask.io.staging import staged_products
from coron_dask.pipeline.build import build_products
from coron_dask.pipeline.run import with_detection
from coron_dask.planning.block_plan import Workers
from coron_dask.runtime.progress import labels, link, step_of, summary, written_kind

#: the steps of a run, as the bars and --stats count them
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
    "detection",
}
KINDS = {"crfints", "psfstack", "psfalign", "psfsub", "i2d", "snr", "candidates"}
#: the words of dask's own operations (and "table", the rows of a product's table)
DASK_WORDS = {
    "getitem",
    "rechunk",
    "merge",
    "split",
    "store",
    "map",
    "finalize",
    "hlgfinalizecompute",
    "concatenate",
    "astype",
    "where",
    "array",
    "arange",
    "reshape",
    "original",
    "encode",
    "xarray",
    "table",
    "broadcast",
    "to",
    "broadcast_to",
    "zeros_like",
    "stack",
    "transpose",
    "asarray",
    "sum",
    "partial",
}


def is_step_or_dask(group: str) -> bool:
    """Whether a task group names a step (of several fused: ``step_of``'s) or is made of
    dask's own operations only."""
    words = group.split("-")
    if words[0] == "table":  # a product's table: its rows (the extension after)
        words = words[:1]
    return step_of(group) is not None or set(words) <= DASK_WORDS


SMALL_PLAN = Workers(1, 1, 2**31, 2**26)


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("AlignRefs-fit-0123abcd", "align_refs-fit"),
        ("AlignRefs-shift-sci-write-psfalign-sci-getitem", "align_refs-shift"),  # fused
        ("original-read-sci-read-sci", "read-calints"),
        ("klip-gram-klip-weights", "klip-basis"),
        ("concatenate-resample-drizzle-resample-sum", "resample"),
        ("astype-getitem-write-iTwod-sci", "write_i2d"),
        # dask's key_split, joining the names of fused tasks, keeps the i2d's spelling
        ("astype-getitem-write-iTwod-sci-finalize-hlgfinalizecompute", "write_i2d"),
        ("getitem-OutlierDetection-flag-dq-write-crfints-dq", "outlier_detection-flag"),
        ("rechunk-merge", None),
        ("getitem", None),
    ],
)
def test_step_of_names(name, step):
    assert step_of(name) == step


def test_written_kind():
    assert written_kind("AlignRefs-shift-sci-write-psfalign-sci-getitem") == "psfalign"
    assert written_kind("write-iTwod-wht-4a8c") == "i2d"
    assert written_kind("AlignRefs-fit-4a8c") is None


def test_layer_words_survive_key_split():
    """A product kind with a digit is spelled in letters only in a layer's name, so dask's
    key_split (the dashboard's groups, the names of fused tasks) keeps it, and it reads
    back as the kind."""
    for kind in ("i2d", "psfsub", "snr", "candidates", "x10y"):
        word = layer_word(kind)
        assert key_split(f"write-{word}-sci-0123abcd") == f"write-{word}-sci"
        assert word_of(word) == kind


def test_stats_name_the_writes_of_every_product(asn, observation_dir, tmp_path):
    """--stats of a run with an i2d: the blocks written of each kind of product, the i2d's
    among them (not "finalize", what dask's key_split made of its name with a digit), as
    many as its extensions have blocks."""
    built = build_products(asn, tmp_path / "built", psfmask=observation_dir / "psfmask.fits")
    run_coron3(
        asn,
        tmp_path / "out",
        psfmask=observation_dir / "psfmask.fits",
        scheduler="synchronous",
        progress=False,
        stats=tmp_path / "stats.json",
    )
    written = json.loads((tmp_path / "stats.json").read_text())["blocks_written"]
    i2d = next(item for item in built if item.kind == "i2d")
    assert written["i2d"] == sum(math.prod(e.data.numblocks) for e in i2d.extensions)
    assert set(written) == {"crfints", "psfstack", "psfalign", "psfsub", "i2d", "snr", "candidates"}


@pytest.mark.parametrize(("align_to", "blocks"), [("each", (1, 2)), ("first", (2, 4))])
def test_every_task_is_named_after_its_step(asn, tmp_path, align_to, blocks):
    """In the graph dask optimises, each task group names a step or is dask's own
    operations; every step is there, and ``labels`` gives every task a step, the writes
    of every kind of product their own."""
    built = build_products(
        asn,
        tmp_path / "named",
        workers=SMALL_PLAN,
        align_to=align_to,
        integrations=blocks[0],
        psfs=blocks[1],
    )
    with staged_products(with_detection(built)) as writes:
        graph = {}
        for collection in dask.optimize(*writes):
            graph.update(dict(collection.__dask_graph__()))
    groups = {key_split(key) for key in graph}
    assert all(is_step_or_dask(group) for group in groups), [
        group for group in groups if not is_step_or_dask(group)
    ]
    steps = set(labels(get_deps(graph)[0]).values())
    assert STEP_GROUPS <= steps, STEP_GROUPS - steps
    assert steps <= STEP_GROUPS | {f"write_{kind}" for kind in (*KINDS, "scratch")}
    assert {f"write_{kind}" for kind in KINDS} <= steps


def test_labels_give_dask_operations_the_step_they_feed():
    graph = {
        ("read-sci-1", 0): set(),
        ("getitem-2", 0): {("read-sci-1", 0)},
        ("AlignRefs-fit-3", 0): {("getitem-2", 0)},
        ("rechunk-merge-4", 0): {("AlignRefs-fit-3", 0)},
        "finalize-5": {("rechunk-merge-4", 0)},
    }
    assert labels(graph) == {
        ("read-sci-1", 0): "read-calints",
        ("getitem-2", 0): "align_refs-fit",
        ("AlignRefs-fit-3", 0): "align_refs-fit",
        ("rechunk-merge-4", 0): "align_refs-fit",
        "finalize-5": "align_refs-fit",
    }


def test_summary_orders_steps_and_counts_products():
    totals = {"write_psfsub": 4, "align_refs-fit": 10, "read-calints": 5, "write_scratch": 2}
    done = {"align_refs-fit": 7, "read-calints": 5}
    steps, products = summary(done, totals)
    assert steps == [
        ("read calints", 5, 5),
        ("align_refs fit", 7, 10),
        ("write psfsub", 0, 4),
        ("write scratch", 0, 2),
    ]
    assert products == [("psfsub", 0, 4)]


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
    """The task names the dashboard page ``url`` (None: the one open) shows, once they
    name all the steps ``wanted`` (the page polls the scheduler)."""
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
        if wanted <= {step_of(name) for name in names} or time.monotonic() > deadline:
            return names
        page.wait_for_timeout(250)


def test_dashboard_shows_the_steps_in_a_browser(asn, tmp_path):
    """Chromium, driven by Playwright, on the dashboard of a run: the progress page (while
        the run waits for a worker, so it cannot have ended), then the task stream, show task
        groups named after the steps or dask's own operations, and every step ran. A screenshot
        of the task stream is saved, and one of the progress page part of the way through
    (``CORON_DASK_DASHBOARD_PNG`` names a folder to copy them to: docs/ keeps them)."""
    from distributed import Client, LocalCluster
    from playwright.sync_api import sync_playwright

    from coron_dask.runtime.execute import execute

    built = build_products(asn, tmp_path / "out", workers=SMALL_PLAN, integrations=1, psfs=2)
    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster, set_as_default=False) as client,
        staged_products(with_detection(built)) as writes,
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
        progress = _names_on(page, f"{base}/individual-progress", STEP_GROUPS, timeout=10)
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
    # every group either page shows is a step or dask's own; the progress page draws 24
    # bars at most (distributed's), so the steps are asked of the task stream: all ran
    for shown in (progress, ran):
        assert all(is_step_or_dask(group) for group in shown), [
            group for group in shown if not is_step_or_dask(group)
        ]
    assert {step_of(group) for group in progress} - {None}, progress
    named = {step_of(group) for group in ran}
    assert STEP_GROUPS <= named, STEP_GROUPS - named
    assert screenshot.stat().st_size > 10_000
    keep = os.environ.get("CORON_DASK_DASHBOARD_PNG")  # a folder for both pictures
    if keep:
        for picture in tmp_path.glob("*.png"):
            shutil.copy(picture, Path(keep) / f"dashboard-{picture.name}")
