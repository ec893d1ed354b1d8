"""Least-squares reconstruction of the consumers of pruned channels (lossy repair, no retraining).

After channels are removed, each weight op that *read* them (a Conv, Gemm or MatMul whose input
channels shrank) is refit so that, on calibration data, its output in the pruned model matches
its output in the original model, as in "Channel Pruning for Accelerating Very Deep Neural
Networks" (He et al., 2017):

    W', b' = argmin || [X_pruned, 1] [W'; b'] - Y_original ||^2 + ridge

``X_pruned`` is what the op actually receives in the pruned model (im2col patches for a conv),
``Y_original`` its output in the original model, restricted to the output channels it keeps.
Consumers are refit in topological order, each on activations of the model with the earlier
refits applied, so errors do not pile up. The intercept ``b'`` is the bias compensation of FLAP
(the removed channels' mean contribution), folded into the op's bias (a MatMul's is the
following Add of a bias vector, when there is one).

Only weight *values* change here; structure (which slices exist) is the applier's business.
"""

from __future__ import annotations

import numpy as np

from dataclasses import dataclass

from sparsec.analysis.depgraph import DependencyGraph
from sparsec.ir.graph import Graph, Node
from sparsec.passes.manager import PassContext, Progress, rows
from sparsec.passes.surgery import axis_keep

# Ridge, relative to the mean diagonal of A^T A. Calibration sets are small, so the refit must
# not chase them: on the digits models (64 calibration images, held-out test accuracy)
# 1e-3 beat 1e-8..1e-4 at every ratio and tied 1e-2 (CNN at 50 %: 95.0 % at 1e-8, 97.0 % here).
# The default where a layer's ridge cannot be chosen on a validation split (one sample).
RIDGE = 1e-3
#: ridges tried per layer on a validation split of the fit data (besides no refit at all)
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _im2col(x: np.ndarray, node: Node, kernel: tuple[int, int]) -> np.ndarray:
    """[B, C, H, W] -> [B*OH*OW, C*kh*kw] patches for an NCHW Conv's attributes."""
    kh, kw = kernel
    pt, pl, pb, pr = node.attr("pads", [0, 0, 0, 0])
    sh, sw = node.attr("strides", [1, 1])
    dh, dw = node.attr("dilations", [1, 1])
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    b, c, h, w = xp.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((b, oh, ow, c, kh, kw), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh,
                       j * dw: j * dw + sw * (ow - 1) + 1: sw]
            cols[..., i, j] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(b * oh * ow, c * kh * kw)


def _solve(n: "Normal", shift, intercept: bool, ridges, prior: np.ndarray) -> list[np.ndarray]:
    """Ridge least squares toward ``prior`` from the normal equations ``n`` (targets ``y +
    shift``), one solution theta [K(+1), N] per relative ridge: argmin ||A theta - Y||^2 +
    lam ||theta - prior||^2, lam relative to the mean diagonal of A^T A. The ridge pulls toward
    the layer's own pruned weights rather than toward zero: where the calibration data does not
    determine a direction (fewer rows than inputs, e.g. a few sentences for an FFN's 1536
    inputs) the refit keeps what the layer had instead of inventing a value. Each ridge is
    one linear solve of (A^T A + lam I) theta = A^T y + lam prior: for a Llama down projection
    (4225 inputs, 2048 outputs) 4 s where an eigendecomposition serving every ridge took 49 s
    (the same solutions to 2e-14, docs/benchmarks.md#llm-scale-full)."""
    g, b = n.gram(intercept), n.rhs(intercept, shift)
    scale = max(float(np.trace(g)) / g.shape[0], 1e-12)
    out = []
    for r in ridges:
        m = g.copy()
        m[np.diag_indices_from(m)] += r * scale
        out.append(np.linalg.solve(m, b + r * scale * prior))
    return out


def keep_if_better(original: Graph, plain: Graph, refit: Graph, ctx: PassContext
                   ) -> tuple[Graph, dict]:
    """A refit only where it helps: the refit graph if its outputs are at least as close to
    ``original``'s on the held-out batches as ``plain``'s (the same pruning without the refit),
    else ``plain``. A least-squares refit on a small calibration set can fit it and hurt every
    other input; this is the guard. Without held-out data it cannot be judged and is kept
    (``verified`` False)."""
    if not ctx.held_out:
        return refit, {"kept": True, "verified": False}
    want = ctx.holdout_outputs(original)
    cos = {name: ctx.compare_graph(want, graph).cosine
           for name, graph in (("without", plain), ("with", refit))}
    kept = cos["with"] >= cos["without"]
    return (refit if kept else plain), {
        "kept": kept, "verified": True, "holdout_cosine_without": cos["without"],
        "holdout_cosine_with": cos["with"]}


def _consumer_axis(node: Node) -> int:
    """Axis of the node's weight (input 1) that reads input channels."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 1 if int(node.attr("transB", 0)) else 0
    return 0  # MatMul [K, N]


def _output_axis(node: Node) -> int:
    return 1 - _consumer_axis(node) if node.op_type != "Conv" else 0


def refit_consumers(original: Graph, pruned: Graph, dg: DependencyGraph,
                    plan: dict[int, np.ndarray], ctx: PassContext,
                    ridge: float | None = None) -> tuple[Graph, dict]:
    """Refit every Conv/Gemm/MatMul of ``pruned`` whose input channels ``plan`` removed.
    ``ridge`` None: each layer's ridge is chosen on samples of the fit data it is not fit to
    (``RIDGES``, or no refit at all); its final refit then uses all of them."""
    keep_of = axis_keep(original, dg, plan)

    def fit(graph, node, users, d: "Design", seed):
        out_axis = _output_axis(node)
        n_out = original.shape(node.inputs[1])[out_axis]
        out_keep = keep_of.get((node.inputs[1], out_axis), np.arange(n_out))
        return _refit(graph, node, users, d.select(out_keep), seed=seed, ridge=ridge)

    graph, refit = refit_in_order(
        original, pruned, lambda n: (n.inputs[1], _consumer_axis(n)) in keep_of, fit, ctx)
    return graph, {"refit": refit}


class Normal:
    """The normal equations of a least-squares problem, summed over its rows batch by batch:
    for rows ``a`` [rows, K] and targets ``y`` [rows, N], ``[a 1]^T [a 1]``, ``[a 1]^T y``, the
    per-column sums of ``y`` and ``y^2``, and the row count. Memory is O((K + N)^2), whatever the
    number of rows; everything a refit needs (solutions for any ridge, intercept, constant
    target shift, and the squared error of any solution) is computed from them."""

    def __init__(self, k: int, n: int):
        self.ata = np.zeros((k + 1, k + 1))
        self.aty = np.zeros((k + 1, n))
        self.sy, self.yy = np.zeros(n), np.zeros(n)
        self.rows = 0

    def add(self, a: np.ndarray, y: np.ndarray) -> None:
        a1 = np.empty((a.shape[0], a.shape[1] + 1))
        a1[:, :-1], a1[:, -1] = a, 1.0
        y = np.asarray(y, dtype=np.float64)
        self.ata += a1.T @ a1
        self.aty += a1.T @ y
        self.sy += y.sum(axis=0)
        self.yy += np.einsum("ij,ij->j", y, y)
        self.rows += a.shape[0]

    def __iadd__(self, other: "Normal") -> "Normal":
        self.ata += other.ata
        self.aty += other.aty
        self.sy += other.sy
        self.yy += other.yy
        self.rows += other.rows
        return self

    def select(self, columns) -> "Normal":
        """The same rows with only the target columns ``columns`` (shares ``ata``)."""
        out = Normal.__new__(Normal)
        out.ata, out.rows = self.ata, self.rows
        out.aty, out.sy, out.yy = self.aty[:, columns], self.sy[columns], self.yy[columns]
        return out

    def copy(self) -> "Normal":
        out = Normal.__new__(Normal)
        out.ata, out.aty, out.rows = self.ata.copy(), self.aty.copy(), self.rows
        out.sy, out.yy = self.sy.copy(), self.yy.copy()
        return out

    def gram(self, intercept: bool) -> np.ndarray:
        """A^T A ([a 1] with ``intercept``)."""
        return self.ata if intercept else self.ata[:-1, :-1]

    def rhs(self, intercept: bool, shift=0.0) -> np.ndarray:
        """A^T (y + shift)."""
        shift = np.broadcast_to(np.asarray(shift, dtype=np.float64), self.sy.shape)
        b = self.aty + np.outer(self.ata[:, -1], shift)
        return b if intercept else b[:-1]

    def sq_target(self, shift=0.0) -> float:
        """Sum of (y + shift)^2."""
        shift = np.broadcast_to(np.asarray(shift, dtype=np.float64), self.sy.shape)
        return float(np.sum(self.yy + 2 * shift * self.sy + self.rows * shift ** 2))

    def sq_error(self, theta: np.ndarray, intercept: bool, shift=0.0) -> float:
        """Sum of (A theta - y - shift)^2 (never below 0: the expansion can round there)."""
        g, b = self.gram(intercept), self.rhs(intercept, shift)
        err = float(np.sum((g @ theta) * theta)) - 2 * float(np.sum(b * theta)) \
            + self.sq_target(shift)
        return max(err, 0.0)

    def mean_sq(self, theta, intercept: bool, shift=0.0) -> float:
        """Mean of (A theta - y - shift)^2 over rows and columns (theta None: of (y + shift)^2)."""
        size = max(self.rows * self.sy.size, 1)
        if theta is None:
            return self.sq_target(shift) / size
        return self.sq_error(theta, intercept, shift) / size


@dataclass
class Design:
    """One layer's least-squares problem (what it receives, im2col patches for a conv, and the
    output to match) as normal equations, split by calibration sample so that a validation
    split never cuts through a sequence or an image: every 4th sample that has rows validates
    (the last one when there are fewer than 4); ``val`` is None below two samples."""

    train: Normal
    val: Normal | None

    @property
    def full(self) -> Normal:
        """Both halves' rows."""
        if self.val is None:
            return self.train
        out = self.train.copy()
        out += self.val
        return out

    def select(self, columns: np.ndarray) -> "Design":
        return Design(self.train.select(columns),
                      None if self.val is None else self.val.select(columns))


class DesignBuilder:
    """Builds a ``Design`` one calibration batch at a time (``add``), holding only normal
    equations: samples 1 and 2 are kept apart until a 4th sample with rows shows that they
    train (with fewer, the last one validates)."""

    EVERY = 4

    def __init__(self, node: Node, kernel: tuple[int, ...] = ()):
        self.node, self.kernel = node, kernel
        self.parts: dict = {}          # "train", "val", or a sample rank 1..2 -> Normal
        self.seen = 0                  # samples with rows so far

    def add(self, x: np.ndarray, y: np.ndarray | None, mask) -> None:
        node = self.node
        b = x.shape[0]
        if node.op_type == "Conv":
            a = _im2col(x.astype(np.float64), node, self.kernel)
            t = y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1]) if y is not None else None
            ids = np.repeat(np.arange(b), a.shape[0] // b)
        else:
            a, t = rows(x, mask), rows(y, mask) if y is not None else None
            lead = np.arange(b).reshape((b,) + (1,) * (x.ndim - 1))
            ids = rows(np.broadcast_to(lead, x.shape[:-1] + (1,)), mask)[:, 0]
        t = np.zeros((a.shape[0], 0)) if t is None else t
        a = a.astype(np.float64)
        roles: dict = {}                 # role -> the batch's samples in it
        for sample in np.unique(ids):
            roles.setdefault(self._role(self.seen), []).append(sample)
            self.seen += 1
        if self.seen >= self.EVERY:      # enough samples: the ones held apart train
            for k in range(1, self.EVERY - 1):
                roles.setdefault("train", []).extend(roles.pop(k, []))
                if k in self.parts:
                    self._merge("train", self.parts.pop(k))
        for role, samples in roles.items():
            if not samples:
                continue
            sel = np.isin(ids, samples)
            part = self.parts.get(role)
            if part is None:
                part = self.parts[role] = Normal(a.shape[1], t.shape[1])
            part.add(a if sel.all() else a[sel], t if sel.all() else t[sel])

    def _role(self, rank: int):
        every = self.EVERY
        if rank == 0:
            return "train"
        if rank < every - 1:
            return rank
        return "val" if rank % every == every - 1 else "train"

    def _merge(self, role, part: Normal) -> None:
        if role in self.parts:
            self.parts[role] += part
        else:
            self.parts[role] = part

    def build(self) -> Design:
        parts = dict(self.parts)
        if self.seen < self.EVERY and self.seen >= 2:   # few samples: the last one validates
            parts["val"] = parts.pop(self.seen - 1)
        for k in range(1, self.EVERY - 1):
            if k in parts:
                parts["train"] += parts.pop(k)
        if "train" not in parts:       # no rows at all
            return Design(Normal(0, 0), None)
        return Design(parts["train"], parts.get("val"))


def refit_in_order(original: Graph, changed: Graph, select, fit, ctx: PassContext,
                   outputs: bool = True) -> tuple[Graph, list[dict]]:
    """For every refittable Conv/Gemm/MatMul that ``select(node)`` picks, in graph order:
    ``fit(graph, node, users, design, seed)`` rewrites its weights from what it receives in
    ``changed`` with the earlier refits applied and its output in ``original`` (``Design``:
    normal equations summed batch by batch over ``ctx.fit``, so a layer's fit holds
    O((K + N)^2) numbers whatever the number of calibration tokens; with ``outputs`` False the
    original outputs are not computed and the design has no target columns).

    Both models are walked layer by layer (``layerwise.Walk``): the changed one up to each
    layer, running only the nodes since the previous one, with the refits so far in; the
    original one up to and through the same layer. Only the tensors crossing the two cuts are
    held (beyond ``SPARSEC_CALIBRATION_BYTES`` on disk), so the whole calibration set costs one
    pass through each model and memory does not grow with depth. Each report entry says how
    many bytes of calibration tensors were in memory at that layer and how many were spilled
    so far."""
    from sparsec.layerwise import Walk

    targets = refit_targets(original, select)
    if not targets:
        return changed, []
    graph = changed.copy(arrays=False)     # refits replace arrays, never write them
    nodes = {n.name: n for n in graph.nodes}
    users = graph.consumers()
    for target in targets:       # bias slots first: the walk needs the final structure
        node = nodes[target.name]
        _bias_slot(graph, node, users, _as_matrix(node, graph.initializers[node.inputs[1]]).shape[1])
    users = graph.consumers()
    at_now = {n.name: i for i, n in enumerate(graph.nodes)}
    at_before = {n.name: i for i, n in enumerate(original.nodes)}
    masks = ctx.masks(ctx.fit)
    report = []
    progress = Progress(ctx.log, "reconstruct", len(targets), "layers refit")
    with Walk(graph, ctx.fit) as now, Walk(original, ctx.fit) as before:
        for i, target in enumerate(targets):
            node = nodes[target.name]
            now.advance(at_now[node.name])
            x = now.values(node.inputs[0])
            if outputs:
                before.advance(at_before[target.name] + 1, keep=[target.outputs[0]])
                y = before.values(target.outputs[0])
            else:
                y = [None] * len(x)
            build = DesignBuilder(node, graph.initializers[node.inputs[1]].shape[2:])
            for xb, yb, m in zip(x, y, masks):     # normal equations, one batch at a time
                build.add(np.asarray(xb), None if yb is None else np.asarray(yb), m)
            err = fit(graph, node, users, build.build(), i)
            report.append({"node": node.name, "weight": node.inputs[1], **err,
                           # calibration tensors the two walks hold in memory / put on disk
                           "held_bytes": now.held_bytes + before.held_bytes,
                           "spilled_bytes": now.spilled_bytes + before.spilled_bytes})
            progress.step()
    return graph, report


def refit_targets(graph: Graph, select) -> list[Node]:
    """The Conv/Gemm/MatMul nodes ``refit_in_order`` refits: those ``select(node)`` picks whose
    shapes and weights it handles, in graph order."""
    uses = graph.consumers()
    return [n for n in graph.nodes if n.op_type in ("Conv", "Gemm", "MatMul")
            and len(n.inputs) > 1 and select(n) and _refittable(graph, n, uses)]


def _refittable(graph: Graph, n: Node, uses: dict[str, list[Node]]) -> bool:
    """Shapes and attributes the refit handles; weights and biases tied to another op are left
    alone (refitting them for one user would change the other)."""
    if n.inputs[1] not in graph.initializers:
        return False
    if any(len(uses.get(p, [])) > 1 for p in n.inputs[1:] if p):
        return False
    if n.op_type == "Conv":
        return (int(n.attr("group", 1)) == 1 and len(graph.shape(n.inputs[0])) == 4
                and n.attr("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))
    if n.op_type == "Gemm":
        return (not int(n.attr("transA", 0)) and float(n.attr("alpha", 1.0)) == 1.0
                and float(n.attr("beta", 1.0)) == 1.0)
    return graph.initializers[n.inputs[1]].ndim == 2


def _refit(graph: Graph, node: Node, users: dict[str, list[Node]], d: Design, seed: int,
           ridge: float | None) -> dict:
    """Solve for the node's new weights (and intercept) and write them into ``graph``. With
    ``ridge`` None it is chosen among ``RIDGES`` (or no refit) on a validation split of ``d``."""
    w = graph.initializers[node.inputs[1]]
    bias_name = _bias_slot(graph, node, users, d.train.sy.size)
    intercept = bias_name is not None
    # a MatMul's intercept replaces the following Add's bias: match the output after it
    shift = graph.initializers[bias_name].astype(np.float64) \
        if node.op_type == "MatMul" and intercept else 0.0
    prior = _as_matrix(node, w).astype(np.float64)
    if intercept:
        bias = graph.initializers[bias_name].astype(np.float64).reshape(1, -1)
        prior = np.vstack([prior, np.broadcast_to(bias, (1, prior.shape[1]))])

    chosen, scores = RIDGE if ridge is None else ridge, {}
    if ridge is None and d.val is not None:
        thetas = _solve(d.train, shift, intercept, RIDGES, prior)
        ref = max(d.val.mean_sq(None, intercept, shift), 1e-30)
        scores = {r: d.val.mean_sq(t, intercept, shift) / ref
                  for r, t in zip((*RIDGES, None), (*thetas, prior))}
        chosen = min(scores, key=scores.get)
    full = d.full
    theta = prior if chosen is None else _solve(full, shift, intercept, [chosen], prior)[0]
    graph.set_initializer(node.inputs[1], _from_matrix(node, theta[:-1] if intercept else theta, w))
    if intercept:
        graph.set_initializer(bias_name, theta[-1].astype(w.dtype))
    scale = max(float(np.sqrt(full.mean_sq(None, intercept, shift))), 1e-12)
    out = {"rel_rmse_before": float(np.sqrt(full.mean_sq(prior, intercept, shift))) / scale,
           "rel_rmse_after": float(np.sqrt(full.mean_sq(theta, intercept, shift))) / scale,
           "ridge": "none" if chosen is None else chosen}
    if scores:
        out["validation_rel_mse"] = {("none" if r is None else f"{r:g}"): v
                                     for r, v in scores.items()}
    return out


def _as_matrix(node: Node, w: np.ndarray) -> np.ndarray:
    """The node's weight as the [K, N] matrix that multiplies ``a`` (im2col rows for a conv)."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T
    if node.op_type == "Gemm" and int(node.attr("transB", 0)):
        return w.T
    return w


def _from_matrix(node: Node, mat: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Inverse of ``_as_matrix``: [K, N] back into the weight's own layout and dtype."""
    if node.op_type == "Conv":
        return mat.T.reshape(like.shape).astype(like.dtype)
    if node.op_type == "Gemm" and int(node.attr("transB", 0)):
        return mat.T.astype(like.dtype)
    return mat.astype(like.dtype)


def _bias_slot(graph: Graph, node: Node, users: dict[str, list[Node]], n_out: int) -> str | None:
    """Name of the bias vector the intercept goes into (created for a Conv/Gemm without one);
    ``None`` when there is no per-output-channel bias to fold it into."""
    if node.op_type in ("Conv", "Gemm"):
        if len(node.inputs) > 2 and node.inputs[2]:
            b = node.inputs[2]
            ok = b in graph.initializers and graph.initializers[b].shape == (n_out,)
            return b if ok else None
        name = f"{node.inputs[1]}__bias"
        graph.set_initializer(name, np.zeros(n_out, dtype=graph.initializers[node.inputs[1]].dtype))
        node.inputs[2:] = [name]
        return name
    # MatMul: fold into a following Add of a bias vector, if it is the only user
    after = users.get(node.outputs[0], [])
    if len(after) == 1 and after[0].op_type == "Add":
        other = [i for i in after[0].inputs if i != node.outputs[0]]
        if (len(other) == 1 and other[0] in graph.initializers
                and graph.initializers[other[0]].shape == (n_out,)):
            return other[0]
    return None
