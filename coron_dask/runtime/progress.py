"""What a person watching a run sees: progress per calwebb_coron3 step and per product.

The steps name their own dask layers after jwst's steps (``AlignRefs-fit-<token>``, as
jwst's AlignRefsStep, ``OutlierDetection-median-…``, ``klip-subtract-…``, ``resample-…``,
``write-<product kind>-<extension>-…``); dask's operations keep their names (``getitem``,
``rechunk-merge``), and where dask fuses tasks it joins their names (``getitem-klip-
subtract-write-psfsub-sci``). The dashboard groups tasks by those names, up to the first
word that is not letters only (``dask.utils.key_split``): hence no underscore in them. For the bars,
``labels`` gives every task of a graph its step: the one its name says (of several, the
last other than a write), else the earliest among the tasks it feeds, else the latest
among its inputs. Only counting happens here: the graph computed is dask's own.
"""

import graphlib
import logging
import socket
import sys
import time
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from importlib.util import find_spec
from urllib.parse import urlsplit

from tqdm import tqdm

from coron_dask.core.names import word_of

log = logging.getLogger(__name__)

#: Words in a task's name and the step they belong to, in pipeline order. "write" is
#: followed by the product's kind (``Product.kind``, in letters only: ``core.names``).
STEPS = (
    (("read",), "read-calints"),
    (("OutlierDetection", "median"), "outlier_detection-median"),
    (("OutlierDetection", "flag"), "outlier_detection-flag"),
    (("AlignRefs", "fill"), "align_refs-fill"),
    (("AlignRefs", "fit"), "align_refs-fit"),
    (("AlignRefs", "shift"), "align_refs-shift"),
    (("klip", "means"), "klip-basis"),
    (("klip", "gram"), "klip-basis"),
    (("klip", "weights"), "klip-basis"),
    (("klip", "err"), "klip-basis"),
    (("inject",), "contrast-inject"),
    (("klip", "overlaps"), "klip-subtract"),
    (("klip", "subtract"), "klip-subtract"),
    (("resample",), "resample"),
    (("detection",), "detection"),
    (("write",), "write"),
)
ORDER = {label: rank for rank, (_, label) in enumerate(STEPS)}
#: The label of a task no step claims (a graph of dask's operations only).
OTHER = "other"
#: The kind of product whose writes are no product: files the run reads back and removes.
SCRATCH = "scratch"


def step_of(name: str) -> str | None:
    """The step a task's name belongs to (``AlignRefs-fit-<token>``, or a fused task's,
    such as ``AlignRefs-shift-sci-write-psfalign-sci-getitem``): of several, the last
    named other than a write (a task that shifts references and writes them is the
    shift); a write alone is ``write_<product kind>``; None for dask's own operations."""
    words = name.split("-")
    write = None
    for end in range(len(words), 0, -1):
        for fragment, label in reversed(STEPS):
            start = end - len(fragment)
            if start < 0 or tuple(words[start:end]) != fragment:
                continue
            if label != "write":
                return label
            if write is None:  # write-<kind>-<extension>
                write = f"write_{word_of(words[end]) if end < len(words) else 'products'}"
    return write


def written_kind(name: str) -> str | None:
    """The kind of product a task named ``name`` writes (``write-<kind>-…`` anywhere in
    it: fused into the task that makes the block, or alone), None if it writes none."""
    words = name.split("-")
    ends = [i + 1 for i, word in enumerate(words[:-1]) if word == "write"]
    return word_of(words[ends[-1]]) if ends else None


def rank(label: str) -> int:
    """Where a step comes in the pipeline (the writes last)."""
    return ORDER["write"] if label.startswith("write_") else ORDER.get(label, -1)


def name_of(key: Hashable) -> str:
    """The name in a dask key (``("klip-subtract-<token>", 0, 1)``: its first element)."""
    return str(key[0] if isinstance(key, tuple) else key)


def labels(dependencies: Mapping[Hashable, set]) -> dict:
    """The step of every task of a graph given as ``{key: the keys it depends on}`` (keys
    outside it are ignored): its own name's, else the earliest step among the tasks it
    feeds, else the latest among its inputs, else ``OTHER``."""
    inside = {key: {d for d in deps if d in dependencies} for key, deps in dependencies.items()}
    steps = {key: step_of(name_of(key)) for key in inside}
    order = list(graphlib.TopologicalSorter(inside).static_order())  # inputs first
    dependents: dict = {key: [] for key in inside}
    for key, deps in inside.items():
        for dep in deps:
            dependents[dep].append(key)
    for key in reversed(order):  # consumers first
        if steps[key] is None:
            fed = [steps[d] for d in dependents[key] if steps[d] is not None]
            steps[key] = min(fed, key=rank) if fed else None
    for key in order:  # then producers
        if steps[key] is None:
            made = [steps[d] for d in inside[key] if steps[d] is not None]
            steps[key] = max(made, key=rank) if made else OTHER
    return steps


class Tally:
    """The tasks of each step in the graphs added, and how many of them have finished: what
    the bars show, kept alike by the local schedulers' callback and the cluster's scheduler
    plugin."""

    def __init__(self) -> None:
        self.steps: dict = {}
        self.totals: Counter = Counter()
        self.done: Counter = Counter()

    def add(self, dependencies: Mapping[Hashable, set]) -> None:
        """Count the tasks of a graph (``labels``' argument)."""
        new = labels(dependencies)
        self.steps.update(new)
        self.totals.update(new.values())

    def finished(self, key: Hashable) -> None:
        """A task of the graphs added has finished (others are not counted)."""
        if key in self.steps:
            self.done[self.steps[key]] += 1

    def summary(self) -> tuple[list, list]:
        """``summary`` of the counts so far."""
        return summary(self.done, self.totals)


def _group(label: str) -> str:
    """How a progress line names a step's tasks: "align_refs fit", "write psfsub"."""
    return label.replace("write_", "write ").replace("-", " ")


def summary(done: Mapping[str, int], totals: Mapping[str, int]) -> tuple[list, list]:
    """(step, tasks done, tasks) for each step of a run, in pipeline order, and (kind,
    blocks written, blocks) for each kind of product, from task counts per step."""
    ordered = sorted(totals, key=lambda label: (rank(label), label))
    counts = [(label, min(done.get(label, 0), totals[label]), totals[label]) for label in ordered]
    steps = [(_group(label), d, t) for label, d, t in counts if label != OTHER]
    products = [
        (label.removeprefix("write_"), d, t)
        for label, d, t in counts
        if label.startswith("write_") and label != f"write_{SCRATCH}"
    ]
    return steps, products


def blocks_written(keys: Iterable[Hashable]) -> dict[str, int]:
    """The blocks written of each kind of product (scratch files apart) by the tasks of
    ``keys``: each write task writes one block, alone or fused into the task that makes
    it. What ``--stats`` records per product."""
    kinds = Counter(written_kind(name_of(key)) for key in keys)
    return {kind: kinds[kind] for kind in sorted(kinds, key=str) if kind not in (None, SCRATCH)}


class Lines:
    """Where a run is, per step and per kind of product: on a terminal, a bar per step
    (tqdm's); in a batch log, a line every ``coron_dask.cluster.status-interval`` seconds
    and one at the end."""

    def __init__(self, interval: float) -> None:
        self.terminal = sys.stderr.isatty()
        self.interval = interval
        self.start = self.last = time.monotonic()
        self.bars: dict[str, tqdm] = {}

    def show(self, counts: tuple[list, list], finished: bool = False) -> None:
        """Show ``counts`` (``summary``'s), at most every so often unless ``finished``."""
        now = time.monotonic()
        every = 0.2 if self.terminal else self.interval
        if now - self.last < every and not finished:
            return
        self.last = now
        steps, products = counts
        if self.terminal:
            self._draw(steps, finished)
            return
        done = sum(d for _, d, _ in steps)
        total = max(sum(t for _, _, t in steps), 1)
        log.info(
            "progress: %.0f%% in %.0f s: %s; products %s",
            100 * done / total,
            now - self.start,
            ", ".join(f"{name} {d}/{t}" for name, d, t in steps),
            ", ".join(f"{kind} {d}/{t}" for kind, d, t in products),
        )

    def _draw(self, steps: list, finished: bool) -> None:
        width = max((len(name) for name, _, _ in steps), default=0)
        for name, done, total in steps:
            bar = self.bars.get(name)
            if bar is None:
                bar = tqdm(
                    desc=f"{name:<{width}}",
                    total=total,
                    position=len(self.bars),
                    file=sys.stderr,
                    unit="task",
                    dynamic_ncols=True,
                )
                self.bars[name] = bar
            bar.total, bar.n = total, done
            bar.refresh()
        if finished:
            self.close()

    def close(self) -> None:
        """End the bars (a terminal's): the cursor goes below them."""
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def in_jupyter() -> bool:
    """Whether this runs in a Jupyter kernel with ipywidgets, where the progress of a run
    is distributed's widget, one bar per task group."""
    kernel = sys.modules.get("ipykernel")
    return kernel is not None and find_spec("ipywidgets") is not None and _kernel_running()


def _kernel_running() -> bool:
    shell = sys.modules.get("IPython")
    ipython = getattr(shell, "get_ipython", lambda: None)()
    return ipython is not None and getattr(ipython, "kernel", None) is not None


def link(address: str) -> str:
    """The dashboard's address as a person reaches it: the link, and the ssh tunnel that
    brings it to a laptop (the dashboard of a run on a login or compute node listens on
    that machine: loopback by default)."""
    parts = urlsplit(address)
    host, port = parts.hostname or "127.0.0.1", parts.port or 8787
    path = parts.path or "/status"
    tunnel = f"ssh -L {port}:{host}:{port} {socket.gethostname()}"
    return f"{address} (from another machine: {tunnel}, then http://localhost:{port}{path})"
