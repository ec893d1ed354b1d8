"""The reference runtime: ONNX Runtime running a graph, plus input generation and comparisons.

Every numeric claim sparsec makes (a pass is exact, a pruned model costs X, a compiled library
matches) is a comparison against this module's ``run``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsec.ir.graph import Graph


#: initializers of at least this many bytes reach ONNX Runtime in place (``skeleton``)
IN_PLACE_BYTES = 1024
#: a session whose in-place weights total at least this many bytes gets them as inputs fed
#: with every run instead: ONNX Runtime copies every initializer it is given, in place or
#: not (measured: a session held one more copy of the model's weights, prepacking on or
#: off), which at a billion parameters is 4 GiB a session. Below it, constant weights let
#: ORT pre-pack and fuse them.
FEED_WEIGHTS_BYTES = 64 * 2**20


def skeleton(graph: Graph, with_value_info: bool = True):
    """``graph`` as an ONNX model whose initializers of ``IN_PLACE_BYTES`` or more are
    placeholders (external data at no location), plus those arrays: ``session`` hands them to
    ONNX Runtime in place (``add_external_initializers``, no copy) instead of through a
    serialized model, which held the weights four times over (the graph's arrays, the
    protobuf, its bytes, ONNX Runtime's copy)."""
    import dataclasses

    import onnx

    from sparsec.ir.onnx_io import elem_type, to_onnx

    big = {n: a for n, a in graph.initializers.items() if a.nbytes >= IN_PLACE_BYTES}
    small = {n: a for n, a in graph.initializers.items() if n not in big}
    proto = to_onnx(dataclasses.replace(graph, initializers=small),
                    with_value_info=with_value_info)
    for name, array in big.items():
        t = proto.graph.initializer.add()
        t.name, t.data_type = name, elem_type(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = onnx.TensorProto.EXTERNAL
        t.external_data.add(key="location", value="sparsec-in-memory")
    return proto, big


def session(model, threads: int = 0, external_dir=None, weights=None):
    """An ONNX Runtime CPU session for a Graph or an ONNX ModelProto (``external_dir``: where
    the files of its external data are; ``weights``: arrays for a ``skeleton``'s
    placeholders). A Graph's weights go in place (``skeleton``), or past
    ``FEED_WEIGHTS_BYTES`` as inputs fed with every run (the placeholders become inputs; the
    session returned hides them, see ``FedSession``); a ModelProto over protobuf's 2 GB is
    handed to ONNX Runtime as a file with external data."""
    import onnxruntime as ort

    from sparsec.frontends.external_data import saved_with_external_data, too_big

    if isinstance(model, Graph):
        proto, weights = skeleton(model)
    else:
        proto = model
    opts = ort.SessionOptions()
    if external_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(external_dir))
    opts.log_severity_level = 3
    # no spin-waiting between runs: passes run numpy (least squares) between them, and idle
    # ORT threads spinning on the same cores made a 350-wide eigh 8x slower
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    fed = {}
    if weights and sum(a.nbytes for a in weights.values()) >= FEED_WEIGHTS_BYTES:
        fed, weights = {n: np.ascontiguousarray(a) for n, a in weights.items()}, {}
        _placeholders_to_inputs(proto, fed)
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
              for a in (weights or {}).values()]
    if values:      # ORT reads these arrays where they are: they must outlive the session
        opts.add_external_initializers(list(weights), values)
    if too_big(proto):
        with saved_with_external_data(proto) as path:   # ORT has read it when this returns
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    else:
        sess = ort.InferenceSession(proto.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    sess.sparsec_weights = values
    return FedSession(sess, fed) if fed else sess


def _placeholders_to_inputs(proto, weights: dict[str, np.ndarray]) -> None:
    """The initializers of ``proto`` named in ``weights`` become graph inputs."""
    from onnx import helper

    from sparsec.ir.onnx_io import elem_type

    keep = [t for t in proto.graph.initializer if t.name not in weights]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    for name, array in weights.items():
        proto.graph.input.append(
            helper.make_tensor_value_info(name, elem_type(array.dtype), list(array.shape)))


class FedSession:
    """An ONNX Runtime session whose large weights are graph inputs (``session``): ``run``
    feeds them (ORT reads the arrays where they are, no copy), ``get_inputs`` leaves them
    out; everything else is the session's."""

    def __init__(self, sess, weights: dict[str, np.ndarray]):
        self._sess, self._weights = sess, weights

    def run(self, output_names, input_feed, run_options=None):
        return self._sess.run(output_names, {**input_feed, **self._weights}, run_options)

    def get_inputs(self):
        return [i for i in self._sess.get_inputs() if i.name not in self._weights]

    def __getattr__(self, name):
        return getattr(self._sess, name)


def run(model, inputs: dict[str, np.ndarray], threads: int = 0) -> list[np.ndarray]:
    """Outputs of ``model`` (Graph or ModelProto) on ``inputs``, in graph output order."""
    return session(model, threads).run(None, inputs)


def run_batches(model, batches: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Outputs for each batch of inputs, one session for all of them."""
    sess = session(model)
    return [sess.run(None, feeds) for feeds in batches]


def activations(graph: Graph, batches: list[dict[str, np.ndarray]], names: list[str]
                ) -> dict[str, list[np.ndarray]]:
    """Values of (intermediate) tensors ``names`` of ``graph``, one array per input batch."""
    return Probe(graph, names=names).values(batches, names)


class Probe:
    """One ONNX Runtime session of ``graph`` that can read intermediate tensors (``names``) and
    take other values for the weights named in ``free`` at every run, so trying many weight
    variants (a sensitivity scan, refits applied one after another) costs runs, not a
    serialization and a new session each. Unnamed weights stay constants ORT can pre-pack."""

    def __init__(self, graph: Graph, free=(), names=()):
        from onnx import helper

        from sparsec.ir.onnx_io import elem_type

        self.graph = graph
        self.free = sorted(set(free))
        proto, weights = skeleton(graph)
        present = {o.name for o in proto.graph.output}
        for name in names:
            if name not in present:
                v = graph.values[name]
                proto.graph.output.append(
                    helper.make_tensor_value_info(name, elem_type(v.dtype), list(v.shape)))
        if self.free:
            keep = [t for t in proto.graph.initializer if t.name not in set(self.free)]
            del proto.graph.initializer[:]
            proto.graph.initializer.extend(keep)
            weights = {n: a for n, a in weights.items() if n not in set(self.free)}
            for name in self.free:
                w = graph.initializers[name]
                proto.graph.input.append(
                    helper.make_tensor_value_info(name, elem_type(w.dtype), list(w.shape)))
        self.sess = session(proto, weights=weights)

    def values(self, batches: list[dict[str, np.ndarray]], names=None,
               weights: dict[str, np.ndarray] | None = None) -> dict[str, list[np.ndarray]]:
        """Tensors ``names`` (default: the graph outputs) per batch, with ``weights`` in place
        of the graph's own values for those free weights."""
        names = list(self.graph.outputs if names is None else names)
        fixed = {n: (weights or {}).get(n, self.graph.initializers[n]) for n in self.free}
        per_batch = [self.sess.run(names, {**feeds, **fixed}) for feeds in batches]
        return {name: [vals[i] for vals in per_batch] for i, name in enumerate(names)}

    def outputs(self, batches: list[dict[str, np.ndarray]],
                weights: dict[str, np.ndarray] | None = None) -> list[list[np.ndarray]]:
        """Like ``run_batches``: the graph outputs for each batch."""
        got = self.values(batches, None, weights)
        return [[got[n][i] for n in self.graph.outputs] for i in range(len(batches))]


def random_feeds(signature: list[dict], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for a signature ``[{"name", "shape", "dtype"}, ...]``: N(0, 1) floats;
    integers in [0, 2) and all-true booleans, which are valid token ids, type ids and attention
    masks for any vocabulary."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in signature:
        shape, dt = tuple(spec["shape"]), np.dtype(spec["dtype"])
        if dt.kind == "f":
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            feeds[spec["name"]] = np.ones(shape, dtype=dt)
        else:
            feeds[spec["name"]] = rng.integers(0, 2, size=shape).astype(dt)
    return feeds


def signature(graph: Graph, names: list[str]) -> list[dict]:
    """``[{"name", "shape", "dtype"}, ...]`` of the named tensors (inputs or outputs), with
    ``"range": [lo, hi]`` for an integer input that indexes a table (see ``index_ranges``)."""
    ranges = index_ranges(graph)
    return [{"name": n, "shape": list(graph.shape(n)), "dtype": graph.values[n].dtype,
             **({"range": list(ranges[n])} if n in ranges else {})} for n in names]


def index_ranges(graph: Graph) -> dict[str, tuple[int, int]]:
    """Graph inputs that a Gather reads as indices (token ids into an embedding table), with
    the values that are valid for every such Gather: ``[-s, s - 1]`` for a table of ``s``
    rows (ONNX counts negative indices from the end). ONNX Runtime refuses anything else; a
    compiled library must not read out of bounds, so ``run`` and the C API refuse it too."""
    inputs = set(graph.inputs)
    out: dict[str, tuple[int, int]] = {}
    for node in graph.nodes:
        if node.op_type != "Gather" or len(node.inputs) < 2 or node.inputs[1] not in inputs:
            continue
        shape = graph.shape(node.inputs[0])
        rows = int(shape[int(node.attr("axis", 0)) % len(shape)])
        lo, hi = out.get(node.inputs[1], (-rows, rows - 1))
        out[node.inputs[1]] = (max(lo, -rows), min(hi, rows - 1))
    return out


def shape_fits(shape, spec: dict) -> bool:
    """Whether ``shape`` is the signature's: equal, or for a dynamic package's signature
    (``dims``, ``sparsec.dynamic``), equal on the fixed axes and within range on the others."""
    dims = spec.get("dims") or [None] * len(spec["shape"])
    return len(shape) == len(spec["shape"]) and all(
        (lo <= n <= hi) if d else n == want
        for n, want, d in zip(shape, spec["shape"], dims) for lo, hi in [d[1:] if d else (0, 0)])


def shown_shape(spec: dict) -> str:
    """``[1, 128]``, or for dynamic axes ``[batch_size=1..32, 64]``."""
    dims = spec.get("dims") or [None] * len(spec["shape"])
    return "[" + ", ".join(f"{d[0]}={d[1]}..{d[2]}" if d else str(n)
                           for n, d in zip(spec["shape"], dims)) + "]"


def check_ranges(feeds: dict[str, np.ndarray], signature: list[dict]) -> None:
    """``BadOptionError`` (exit 6) naming the first value outside its input's ``range``."""
    from sparsec.errors import BadOptionError

    for spec in signature:
        if "range" not in spec or spec["name"] not in feeds:
            continue
        lo, hi = spec["range"]
        values = np.asarray(feeds[spec["name"]])
        bad = np.flatnonzero((values < lo) | (values > hi))
        if bad.size:
            at = np.unravel_index(bad[0], values.shape)
            raise BadOptionError(
                f"input '{spec['name']}' holds {values[at]} at {list(map(int, at))}, outside "
                f"[{lo}, {hi}], the rows of the table it indexes ({bad.size} such value"
                f"{'s' if bad.size > 1 else ''}; a token id past the vocabulary?)")


def cast_input(name: str, value, spec: dict) -> np.ndarray:
    """``value`` as the input ``spec`` wants it, or ``BadOptionError`` (exit 6) where that would
    change a value: strings, objects and complex numbers are refused; a float given for an
    integer or boolean input must hold whole numbers in range (7.5 is refused, not truncated);
    float inputs must not hold NaN (ONNX Runtime propagates NaN where compiled code need not:
    ReLU and Clip keep it, other ops are not held to that; the two could disagree). The shape
    must match exactly."""
    from sparsec.errors import BadOptionError

    if hasattr(value, "detach"):                                  # a torch tensor
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    want = np.dtype(spec["dtype"])
    if arr.dtype.kind not in "biuf":
        raise BadOptionError(f"input '{name}' is an array of {arr.dtype}, the model takes "
                             f"{want.name}")
    if not shape_fits(arr.shape, spec):
        raise BadOptionError(f"input '{name}' has shape {list(arr.shape)}, the model expects "
                             f"{shown_shape(spec)}")
    if want.kind == "f":
        out = arr.astype(want, copy=False)
        lost = out.astype(arr.dtype) != arr if arr.dtype.kind in "iu" else None
        if lost is not None and lost.any():
            bad = int(np.flatnonzero(lost)[0])
            raise BadOptionError(f"input '{name}' takes {want.name}, and holds "
                                 f"{arr.flat[bad]} (not exact in {want.name})")
        if np.isnan(out).any():
            at = np.unravel_index(int(np.flatnonzero(np.isnan(out))[0]), out.shape)
            raise BadOptionError(f"input '{name}' holds NaN at {list(map(int, at))}: refused "
                                 f"(ONNX Runtime and compiled kernels treat NaN differently)")
        return out
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))[0]
            raise BadOptionError(f"input '{name}' takes {want.name}, and holds "
                                 f"{arr.flat[bad]} (not a whole number)")
    if want.kind == "b":
        if arr.dtype.kind != "b" and np.any((arr != 0) & (arr != 1)):
            raise BadOptionError(f"input '{name}' takes booleans, and holds values other "
                                 f"than 0 and 1")
        return arr.astype(want, copy=False)
    info = np.iinfo(want)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise BadOptionError(f"input '{name}' holds values outside the range of {want.name}")
    return arr.astype(want, copy=False)


def check_inputs(feeds: dict, signature: list[dict]) -> dict[str, np.ndarray]:
    """Feeds for a model's ``signature``, checked strictly: every input given and no other
    (an extra name is an error, not ignored), values cast only where nothing changes
    (``cast_input``), index inputs within their tables (``check_ranges``)."""
    from sparsec.errors import BadOptionError

    names = [spec["name"] for spec in signature]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise BadOptionError(f"no array '{missing[0]}' among the inputs (has: "
                             f"{', '.join(map(str, feeds)) or '-'})")
    extra = sorted(set(feeds) - set(names))
    if extra:
        raise BadOptionError(f"unknown input(s) {', '.join(extra)} (the model takes "
                             f"{', '.join(names)})")
    if any(spec.get("dims") for spec in signature):   # a dynamic package: sizes in range
        from sparsec.dynamic import sizes_of

        sizes_of(feeds, signature)
    checked = {spec["name"]: cast_input(spec["name"], feeds[spec["name"]], spec)
               for spec in signature}
    check_ranges(checked, signature)
    return checked


def random_inputs(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input (see ``random_feeds``)."""
    return random_feeds(signature(graph, graph.inputs), seed)


@dataclass
class Fidelity:
    """How close outputs are to a reference: worst over all outputs."""

    max_abs_err: float
    max_rel_err: float
    cosine: float

    def as_dict(self) -> dict:
        return {"max_abs_err": self.max_abs_err, "max_rel_err": self.max_rel_err,
                "cosine": self.cosine}


def compare(reference: list[np.ndarray], actual: list[np.ndarray]) -> Fidelity:
    """Max absolute / relative error and the lowest cosine similarity over paired outputs.

    NaN and infinities match only where the reference has the same value at the same place;
    anywhere else they are a mismatch of infinite error and cosine 0 (a plain ``max`` would
    skip a NaN: ``max(0.0, nan)`` is 0.0)."""
    abs_err, rel_err, cos = 0.0, 0.0, 1.0
    for ref, out in zip(reference, actual):
        r = np.asarray(ref, dtype=np.float64).ravel()
        o = np.asarray(out, dtype=np.float64).ravel()
        if r.shape != o.shape:
            return Fidelity(float("inf"), float("inf"), 0.0)
        finite_r, finite_o = np.isfinite(r), np.isfinite(o)
        if not np.array_equal(finite_r, finite_o) or not np.array_equal(
                r[~finite_r], o[~finite_o], equal_nan=True):
            return Fidelity(float("inf"), float("inf"), 0.0)
        r, o = r[finite_r], o[finite_o]
        if r.size == 0:
            continue
        diff = np.abs(r - o)
        abs_err = max(abs_err, float(diff.max()))
        rel_err = max(rel_err, float(diff.max() / max(np.abs(r).max(), 1e-12)))
        denom = np.linalg.norm(r) * np.linalg.norm(o)
        cos = min(cos, float(r @ o / denom) if denom > 0 else float(np.array_equal(r, o)))
    return Fidelity(abs_err, rel_err, cos)
