"""What a person watching a run sees: every task named after the calwebb_coron3 step it
belongs to, and progress per step and per product.

The graph's own names come from where each array was made (``align-fit-…``) and from
dask's internals (``getitem``, ``rechunk-merge``, names joined when dask fuses tasks).
``by_step`` renames every task of the optimised graph, just before it is computed, to
``<step>-<token>``: the dashboard's task stream, progress and task-group pages, the
Jupyter widget and the terminal then list outlier_detection, align_refs' fill, fit and
shift, klip, resample and the writes of each product in pipeline order. A task of dask's
own takes the step of the tasks it feeds (a slice of the filled frames fed to the fit is
the fit's), or else of its inputs, and keeps its operation after the token:
``align_refs-fit-<token>-getitem``. The dashboard groups it with its step (dask names a
group by the words before the token), and ``operation`` tells it from the step's own
tasks (``--stats`` counts those). Only names change: the tasks, and so the products, are
those dask would have run.
"""

import logging
import sys
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

#: Words in a task's name (as dask names its group) and the step they belong to, in
#: pipeline order. "write" is followed by the product's kind (``Product.kind``).
STEPS = (
    (("read",), "read-calints"),
    (("outlier", "median"), "outlier_detection-median"),
    (("outlier", "flag"), "outlier_detection-flag"),
    (("fill",), "align_refs-fill"),
    (("align", "fit"), "align_refs-fit"),
    (("align", "shift"), "align_refs-shift"),
    (("klip", "means"), "klip-basis"),
    (("klip", "gram"), "klip-basis"),
    (("klip", "weights"), "klip-basis"),
    (("klip", "err"), "klip-basis"),
    (("inject",), "contrast-inject"),
    (("klip", "overlaps"), "klip-subtract"),
    (("klip", "subtract"), "klip-subtract"),
    (("resample",), "resample"),
    (("write",), "write"),
)
ORDER = {label: rank for rank, (_, label) in enumerate(STEPS)}
#: The task that ends a run: it depends on every write.
FINISH = "calwebb_coron3"
#: The tasks that end when a kind of product is written: ``<kind>-product``.
PRODUCT = "product"


def step_of(name: str) -> str | None:
    """The step a dask name belongs to (``align-fit-<token>``, or a fused task's, such as
    ``align-shift-sci-write-psfalign-sci-getitem``): of several, the last named other than
    a write (a task that shifts references and writes them is the shift); a write alone is
    ``write_<product kind>``; None for dask's own operations."""
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
                write = f"write_{words[end] if end < len(words) else 'products'}"
    return write


def operation(key: object) -> str | None:
    """The dask operation a task renamed by ``by_step`` is (``getitem`` for
    ``align_refs-fit-<token>-getitem``), None for a task of the step's own."""
    words = _name(key).split("-")
    token = next((i for i, w in enumerate(words) if len(w) == 32 and _hex(w)), None)
    if token is None:
        return None
    return "-".join(words[token + 1 :]) or None


def _hex(word: str) -> bool:
    return all(c in "0123456789abcdef" for c in word)


def written_kind(name: str) -> str | None:
    """The kind of product a task named ``name`` writes (``write-<kind>-…`` anywhere in
    it: fused into the task that makes the block, or alone), None if it writes none."""
    words = name.split("-")
    ends = [i + 1 for i, word in enumerate(words[:-1]) if word == "write"]
    return words[ends[-1]] if ends else None


def rank(label: str) -> int:
    """Where a step comes in the pipeline (writes, then products, last)."""
    if label.endswith(PRODUCT):
        return len(STEPS)
    return ORDER["write"] if label.startswith("write_") else ORDER.get(label, -1)


def _name(key: object) -> str:
    return str(key[0] if isinstance(key, tuple) else key)


def _labels(graph: dict, dependencies: dict) -> dict:
    """The step of every key of ``graph``: its own name's, else the earliest step among
    the tasks it feeds, else the latest among its inputs, else "other"."""
    from dask.core import reverse_dict, toposort

    labels = {key: step_of(_name(key)) for key in graph}
    order = toposort(graph, dependencies=dependencies)
    dependents = reverse_dict(dependencies)
    for key in reversed(order):  # consumers first
        if labels[key] is None:
            fed = [labels[d] for d in dependents[key] if labels[d] is not None]
            labels[key] = min(fed, key=rank) if fed else None
    for key in order:  # then producers
        if labels[key] is None:
            made = [labels[d] for d in dependencies[key] if labels[d] is not None]
            labels[key] = max(made, key=rank) if made else "other"
    return labels


def _finish(*_results: object) -> None:
    """A task that ends when its inputs are done: a product written, or the whole run."""


def by_step(collections: Sequence[object]) -> object:
    """One ``Delayed`` computing ``collections`` (the writes of a run, each named
    ``write-<product kind>-<extension>``) as dask would, its tasks renamed
    ``<step>-<token>`` (see the module's docstring), and a task per product, named
    ``<kind>-product``, that ends when every block of it is written (the products'
    progress). Compute it with ``optimize_graph=False``: its graph is optimised already."""
    from dask._task_spec import Task, TaskRef, convert_legacy_graph
    from dask.base import collections_to_expr, tokenize
    from dask.core import flatten
    from dask.delayed import Delayed
    from dask.utils import key_split

    collections = list(collections)
    expr = collections_to_expr(collections, optimize_graph=True).optimize()
    graph = convert_legacy_graph(dict(expr.__dask_graph__()))
    outputs = list(flatten(expr.__dask_keys__()))
    dependencies = {key: node.dependencies for key, node in graph.items()}
    labels = _labels(graph, dependencies)
    names: dict = {}

    def renamed(key: object) -> object:
        name = key[0] if isinstance(key, tuple) else key
        new = names.get((labels[key], name))
        if new is None:
            new = f"{labels[key]}-{tokenize(name)}"
            if step_of(name) is None:  # dask's own: its operation after the token
                new += f"-{key_split(name)}"
            names[labels[key], name] = new
        return (new, *key[1:]) if isinstance(key, tuple) else new

    new_keys = {key: renamed(key) for key in graph}
    named = {
        new_keys[key]: node.substitute(
            {d: new_keys[d] for d in dependencies[key]}, key=new_keys[key]
        )
        for key, node in graph.items()
    }
    products: dict[str, list] = {}  # every task writing a kind of product
    for key in graph:
        kind = written_kind(_name(key))
        if kind not in (None, "scratch"):  # scratch files are not products
            products.setdefault(kind, []).append(new_keys[key])
    ends = []
    for kind, keys in products.items():
        ends.append(f"{kind}-{PRODUCT}-{tokenize(keys)}")
        named[ends[-1]] = Task(ends[-1], _finish, *(TaskRef(k) for k in keys))
    finish = f"{FINISH}-{tokenize(ends)}"
    named[finish] = Task(
        finish, _finish, *(TaskRef(new_keys[k]) for k in outputs), *map(TaskRef, ends)
    )
    return Delayed(finish, named)


def _group(label: str) -> str:
    """How a progress line names a step's tasks: "align_refs fit", "write psfsub"."""
    return label.replace("write_", "write ").replace("-", " ")


def summary(remaining: dict, everything: dict) -> tuple[list, list]:
    """(step, tasks done, tasks) for each step of a run, in pipeline order, and (kind,
    products written, products) for each kind of product, from the task counts of dask's
    progress (by task group)."""
    counts: dict[str, list[int]] = {}
    for group, total in everything.items():
        label = step_of(group) or group
        entry = counts.setdefault(label, [0, 0])
        entry[0] += total - remaining.get(group, 0)
        entry[1] += total
    ordered = sorted(counts, key=lambda label: (rank(label), label))
    steps = [
        (_group(label), *counts[label])
        for label in ordered
        if rank(label) < len(STEPS) and label != FINISH
    ]
    products = [
        (label.removesuffix(f"-{PRODUCT}"), *counts[label])
        for label in ordered
        if label.endswith(f"-{PRODUCT}")
    ]
    return steps, products


class Lines:
    """Where a run is, per step and per kind of product: on a terminal, a bar per step
    redrawn in place; in a batch log, a line every ``coron_dask.cluster.status-interval``
    seconds and one at the end."""

    def __init__(self, interval: float) -> None:
        self.terminal = sys.stderr.isatty()
        self.interval = interval
        self.start = self.last = time.monotonic()
        self.drawn = 0  # lines on the terminal to redraw

    def show(self, counts: tuple[list, list], finished: bool = False) -> None:
        """Show ``counts`` (``summary``'s), at most every so often unless ``finished``."""
        now = time.monotonic()
        every = 0.2 if self.terminal else self.interval
        if now - self.last < every and not finished:
            return
        self.last = now
        steps, products = counts
        done = sum(d for _, d, _ in steps)
        total = max(sum(t for _, _, t in steps), 1)
        elapsed = now - self.start
        written = ", ".join(f"{kind} {d}/{t}" for kind, d, t in products)
        if self.terminal:
            width = max((len(name) for name, _, _ in steps), default=0)
            lines = [
                f"{name:<{width}} [{'#' * (30 * d // max(t, 1)):<30}] {d:>6}/{t}"
                for name, d, t in steps
            ]
            lines.append(f"{100 * done / total:5.1f} % in {elapsed:.1f} s; products {written}")
            up = f"\x1b[{self.drawn}F" if self.drawn else ""
            sys.stderr.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
            sys.stderr.flush()
            self.drawn = len(lines)
        else:
            parts = ", ".join(f"{name} {d}/{t}" for name, d, t in steps)
            log.info(
                "progress: %.0f%% in %.0f s: %s; products %s",
                100 * done / total,
                elapsed,
                parts,
                written,
            )


def watch(futures: list, lines: Lines) -> None:
    """Show per step, on ``lines``, how far the tasks of ``futures`` have gone, until they
    end (blocks)."""
    from distributed.diagnostics.progressbar import MultiProgressBar
    from distributed.utils import LoopRunner

    class Bars(MultiProgressBar):
        def __init__(self, keys: list) -> None:
            super().__init__(keys, interval="200ms", complete=True)
            LoopRunner(loop=None).run_sync(self.listen)

        def _draw_bar(self, remaining: dict, all: dict, **_: object) -> None:
            lines.show(summary(remaining, all))

        def _draw_stop(self, remaining: dict, all: dict, **_: object) -> None:
            lines.show(summary(remaining, all), finished=True)

    Bars(futures)


def in_jupyter() -> bool:
    """Whether this runs in a Jupyter kernel with ipywidgets, where the progress of a run
    is distributed's widget, one bar per step."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    from distributed.utils import is_kernel

    return is_kernel()


def widget(futures: list) -> None:
    """Show distributed's progress widget for ``futures`` in the notebook: a bar per step
    (its task groups are the steps)."""
    from distributed import progress
    from IPython.display import display

    display(progress(futures, notebook=True, multi=True, complete=True))


def link(address: str) -> str:
    """The dashboard's address as a person reaches it: the link, and the ssh tunnel that
    brings it to a laptop (the dashboard of a run on a login or compute node listens on
    that machine: loopback by default)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    host, port = parts.hostname or "127.0.0.1", parts.port or 8787
    path = parts.path or "/status"
    tunnel = f"ssh -L {port}:{host}:{port} {socket.gethostname()}"
    return f"{address} (from another machine: {tunnel}, then http://localhost:{port}{path})"
