"""Layer-wise, memory-bounded calibration: a graph run on calibration data one segment at a time.

Running a whole model once per question (the input of every refitted layer, the activations
of every pruned channel) costs a full forward pass each time and keeps every tensor asked for,
for every batch, at once. A :class:`Walk` instead moves a cut through the graph in node order.
``advance(to)`` runs only the nodes between the current cut and ``to`` (one ONNX Runtime
session of that subgraph, built with the weights as they are *now*, so refits of earlier
layers are in), for all batches, and keeps only the tensors that cross the new cut: for a
transformer, the residual stream between blocks plus the few tensors every block reads (the
attention mask, rotary tables). Everything else is dropped as soon as the cut passes it.

Memory bound (per :class:`Walk`): the tensors crossing the cut, for all calibration batches,
``tokens x hidden x bytes`` for each (a decoder: the residual stream, plus whatever of the
block's own activations the caller asks to keep), plus the weights of the one segment being
run. With ``budget`` bytes set, kept tensors beyond it go to ``.npy`` files in a temporary
directory as each batch is run, and are read back through a memory map only while one batch
is in use (``Spilled``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

import numpy as np

from sparsec.ir.graph import Graph

#: ``SPARSEC_CALIBRATION_BYTES``: the default ``budget`` of every walk (bytes of kept tensors
#: held in memory; the rest is spilled to disk). Unset: no limit.
BUDGET_ENV = "SPARSEC_CALIBRATION_BYTES"


def default_budget() -> int | None:
    from sparsec.errors import BadOptionError

    value = os.environ.get(BUDGET_ENV)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise BadOptionError(f"{BUDGET_ENV} must be a number of bytes, not '{value}'") from None


class Walk:
    """``graph`` on ``batches`` (feeds by graph input name), run segment by segment (module
    docstring). ``position`` is the index of the first node not yet run; ``values(name)`` the
    per-batch values of a tensor that crosses the cut (or was asked to be kept)."""

    def __init__(self, graph: Graph, batches: list[dict[str, np.ndarray]],
                 budget: int | None = None, spill_dir: str | None = None):
        self.graph = graph
        self.batches = batches
        self.budget = default_budget() if budget is None else budget
        self.position = 0
        self.store: dict[str, list[np.ndarray]] = {}
        self._spill_root = spill_dir
        self._spill: str | None = None
        #: bytes of kept tensors in memory now, the most over the walk, and written to disk
        self.held_bytes = 0
        self.peak_bytes = 0
        self.spilled_bytes = 0
        self.segments = 0
        self._last_use: dict[str, int] = {}
        for i, node in enumerate(graph.nodes):
            for name in node.inputs:
                if name:
                    self._last_use[name] = i

    def index(self, name: str) -> int:
        """Position of the node called ``name``."""
        for i, node in enumerate(self.graph.nodes):
            if node.name == name:
                return i
        raise KeyError(name)

    def advance(self, to: int, keep=()) -> None:
        """Run nodes ``[position, to)`` on every batch; afterwards hold what nodes from ``to``
        on read, plus ``keep`` (tensors produced so far)."""
        if to < self.position:
            raise RuntimeError(f"a walk cannot go back (at node {self.position}, asked {to})")
        graph, keep = self.graph, set(keep)
        segment = graph.nodes[self.position:to]
        made = {o for n in segment for o in n.outputs if o}
        wanted = sorted(o for o in made if self._last_use.get(o, -1) >= to or o in keep)
        if wanted:
            sub = self._subgraph(segment, made, wanted)
            from sparsec import reference

            sess = reference.session(sub)
            results = {name: [] for name in wanted}
            for i, feeds in enumerate(self.batches):
                inputs = {n: (feeds[n] if n in graph.inputs else np.asarray(self.store[n][i]))
                          for n in sub.inputs}
                for name, value in zip(wanted, sess.run(wanted, inputs)):
                    results[name].append(value)
                if self.budget is not None:     # over budget: to disk batch by batch
                    self._spill_batch(results)
            del sess
            self.segments += 1
        else:
            results = {}
        self.store = {n: v for n, v in self.store.items()
                      if self._last_use.get(n, -1) >= to or n in keep}
        self.store.update(results)
        self.position = to
        self._bound()

    def values(self, name: str) -> list[np.ndarray]:
        if name in self.graph.inputs:
            return [feeds[name] for feeds in self.batches]
        return self.store[name]

    def close(self) -> None:
        self.store = {}
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None

    def __enter__(self) -> "Walk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _subgraph(self, segment, made: set[str], wanted: list[str]) -> Graph:
        graph = self.graph
        read = [i for n in segment for i in n.inputs if i and i not in made]
        inputs = sorted({i for i in read if i not in graph.initializers})
        missing = [i for i in inputs if i not in graph.inputs and i not in self.store]
        if missing:
            raise RuntimeError(f"nodes read {missing[0]}, produced later or dropped "
                               f"(graph not in topological order?)")
        weights = {i: graph.initializers[i] for i in read if i in graph.initializers}
        names = set(inputs) | set(wanted) | set(weights) | made
        return Graph(name=f"{graph.name}_segment", inputs=inputs, outputs=wanted,
                     nodes=list(segment), initializers=weights,
                     values={k: v for k, v in graph.values.items() if k in names},
                     opsets=graph.opsets, ir_version=graph.ir_version)

    def _bound(self) -> None:
        """Spill the largest in-memory tensors to disk until the rest fit ``budget``."""
        def in_memory(vals):
            return sum(v.nbytes for v in vals if not isinstance(v, Spilled))

        held = sum(in_memory(v) for v in self.store.values())
        if self.budget is not None and held > self.budget:
            if self._spill is None:
                self._spill = tempfile.mkdtemp(prefix="sparsec-calib-", dir=self._spill_root)
            for name in sorted(self.store, key=lambda n: -in_memory(self.store[n])):
                if held <= self.budget:
                    break
                size = in_memory(self.store[name])
                self.store[name] = [self._to_disk(v) for v in self.store[name]]
                held -= size
                self.spilled_bytes += size
        self.held_bytes = held
        self.peak_bytes = max(self.peak_bytes, held)

    def _spill_batch(self, results: dict[str, list[np.ndarray]]) -> None:
        """During ``advance``: the batch just run goes to disk when what is held, with it,
        is over ``budget`` (so a segment's outputs never all sit in memory at once; the
        budget is passed by at most one batch's outputs, for as long as they are written)."""
        held = sum(v.nbytes for vals in (*self.store.values(), *results.values())
                   for v in vals if not isinstance(v, Spilled))
        if held <= self.budget:
            return
        if self._spill is None:
            self._spill = tempfile.mkdtemp(prefix="sparsec-calib-", dir=self._spill_root)
        for vals in results.values():
            size = vals[-1].nbytes
            vals[-1] = self._to_disk(vals[-1])
            self.spilled_bytes += size

    def _to_disk(self, value: np.ndarray) -> "Spilled":
        return to_disk(value, self._spill)


class Spilled:
    """A tensor on disk (``to_disk``), read back only when it is used: ``np.asarray`` maps the
    file, and the map goes when that array does. A memory map kept open instead counts every
    page read through it in the process's resident memory until it is closed, so reading
    every spilled batch once (a causal LM's held-out logits: gigabytes) looked as if they were
    all in memory at the end. ``shape``, ``dtype``, ``ndim`` and ``nbytes`` need no read."""

    __slots__ = ("path", "shape", "dtype")

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        arr = np.load(self.path, mmap_mode="r")
        return arr if dtype is None or np.dtype(dtype) == arr.dtype else arr.astype(dtype)


def to_disk(value, directory: str) -> Spilled:
    """``value`` as a new ``.npy`` file in ``directory`` (``Spilled``)."""
    if isinstance(value, Spilled):
        return value
    fd, path = tempfile.mkstemp(suffix=".npy", dir=directory)
    with os.fdopen(fd, "wb") as f:
        np.save(f, value)
    return Spilled(path, value.shape, value.dtype)


def collect(graph: Graph, batches: list[dict[str, np.ndarray]], names: list[str],
            reduce: Callable[[str, int, np.ndarray], None], budget: int | None = None) -> None:
    """Call ``reduce(name, batch index, value)`` for every tensor of ``names`` on every batch,
    walking the graph (``Walk``): only the tensors crossing the cut and the one being reduced
    are held, not every named tensor for every batch at once."""
    producer = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs if o}
    by_end: dict[int, list[str]] = {}
    for name in sorted(set(names)):
        if name in graph.inputs:
            for i, feeds in enumerate(batches):
                reduce(name, i, feeds[name])
        else:
            by_end.setdefault(producer[name] + 1, []).append(name)
    with Walk(graph, batches, budget) as walk:
        for end in sorted(by_end):
            walk.advance(end, keep=by_end[end])
            for name in by_end[end]:
                for i, value in enumerate(walk.values(name)):
                    reduce(name, i, np.asarray(value))


def pairs(graph: Graph, batches: list[dict[str, np.ndarray]], wanted: list[tuple[str, str]],
          reduce: Callable[[int, int, np.ndarray, np.ndarray], None],
          budget: int | None = None) -> int:
    """Call ``reduce(k, batch index, value of a, value of b)`` for every pair ``(a, b)`` of
    ``wanted`` (k its index) on every batch, walking the graph once: a tensor is held only
    until the last pair it belongs to has been reduced (the residual stream between two
    consecutive layers: two tensors at a time, not every layer's for every batch). Returns
    the most bytes of walked tensors held in memory at once."""
    producer = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs if o}

    def at(name: str) -> int:
        return -1 if name in graph.inputs else producer[name]

    names = {n for pair in wanted for n in pair}
    done_at = [max(at(a), at(b)) for a, b in wanted]        # where both values exist
    needed_until = {n: max(d for (a, b), d in zip(wanted, done_at) if n in (a, b))
                    for n in names}
    with Walk(graph, batches, budget) as walk:
        for step in sorted(set(done_at)):
            if step >= 0:
                walk.advance(step + 1, keep=[n for n in names
                                             if 0 <= at(n) <= step <= needed_until[n]])
            for k, (a, b) in enumerate(wanted):
                if done_at[k] == step:
                    for i, (va, vb) in enumerate(zip(walk.values(a), walk.values(b))):
                        reduce(k, i, np.asarray(va), np.asarray(vb))
    return walk.peak_bytes
