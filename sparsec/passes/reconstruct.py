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

from sparsec import reference
from sparsec.analysis.depgraph import DependencyGraph
from sparsec.ir.graph import Graph, Node
from sparsec.passes.manager import PassContext, Progress, rows
from sparsec.passes.surgery import axis_keep

MAX_ROWS = 40_000          # rows of the least-squares system kept (seeded subsample)
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


def _solve(a: np.ndarray, y: np.ndarray, intercept: bool, seed: int, ridges,
           prior: np.ndarray) -> list[np.ndarray]:
    """Ridge least squares toward ``prior``, one solution theta [K(+1), N] per relative ridge:
    argmin ||A theta - Y||^2 + lam ||theta - prior||^2. The ridge pulls toward the layer's own
    pruned weights rather than toward zero: where the calibration data does not determine a
    direction (fewer rows than inputs, e.g. a few sentences for an FFN's 1536 inputs) the
    refit keeps what the layer had instead of inventing a value.

    One eigendecomposition serves every ridge, of the smaller of A^T A [K, K] and, with fewer
    rows than inputs, A A^T [rows, rows] (then theta = prior + A^T (A A^T + lam)^-1 (Y - A
    prior), the same solution)."""
    if a.shape[0] > MAX_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(a.shape[0], MAX_ROWS, replace=False))
        a, y = a[rows], y[rows]
    if intercept:
        a = np.hstack([a, np.ones((a.shape[0], 1))])
    scale = max(float(np.einsum("ij,ij->", a, a)) / a.shape[1], 1e-12)
    if a.shape[0] < a.shape[1]:
        e, u = np.linalg.eigh(a @ a.T)
        proj = u.T @ (y - a @ prior)
        return [prior + a.T @ (u @ (proj / (np.maximum(e, 0) + r * scale)[:, None]))
                for r in ridges]
    e, v = np.linalg.eigh(a.T @ a)
    aty, vp = v.T @ (a.T @ y), v.T @ prior
    return [v @ ((aty + r * scale * vp) / (np.maximum(e, 0) + r * scale)[:, None])
            for r in ridges]


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
    cos = {name: ctx.compare(want, reference.run_batches(graph, ctx.holdout)).cosine
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


@dataclass
class Design:
    """One layer's least-squares problem: ``a`` [rows, K] what it receives (im2col patches for
    a conv), ``y`` [rows, N] the output to match, ``sample`` [rows] the calibration sample each
    row comes from (so a validation split never cuts through a sequence or an image)."""

    a: np.ndarray
    y: np.ndarray
    sample: np.ndarray

    def select(self, columns: np.ndarray) -> "Design":
        return Design(self.a, self.y[:, columns], self.sample)

    def split(self, every: int = 4) -> tuple["Design", "Design"] | None:
        """(train, validation): every ``every``-th sample validates; None below two samples."""
        ids = np.unique(self.sample)
        if ids.size < 2:
            return None
        val = np.isin(self.sample, ids[every - 1::every] if ids.size >= every else ids[-1:])
        return (Design(self.a[~val], self.y[~val], self.sample[~val]),
                Design(self.a[val], self.y[val], self.sample[val]))


def design(node: Node, xs: list[np.ndarray], ys: list[np.ndarray], masks: list,
           kernel: tuple[int, ...] = ()) -> Design:
    """The least-squares rows of ``node`` from its input and output per batch, padded positions
    (``masks``) left out; an output of None gives no columns of ``y``."""
    parts, first = [], 0
    for x, y, m in zip(xs, ys, masks):
        b = x.shape[0]
        if node.op_type == "Conv":
            a = _im2col(x.astype(np.float64), node, kernel)
            t = y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1]) if y is not None else None
            ids = np.repeat(np.arange(first, first + b), a.shape[0] // b)
        else:
            a, t = rows(x, m), rows(y, m) if y is not None else None
            lead = np.arange(first, first + b).reshape((b,) + (1,) * (x.ndim - 1))
            ids = rows(np.broadcast_to(lead, x.shape[:-1] + (1,)), m)[:, 0]
        t = np.zeros((a.shape[0], 0)) if t is None else t
        parts.append((a.astype(np.float64), t.astype(np.float64), ids))
        first += b
    return Design(*(np.concatenate([p[i] for p in parts]) for i in range(3)))


def refit_in_order(original: Graph, changed: Graph, select, fit, ctx: PassContext,
                   outputs: bool = True) -> tuple[Graph, list[dict]]:
    """For every refittable Conv/Gemm/MatMul that ``select(node)`` picks, in graph order:
    ``fit(graph, node, users, design, seed)`` rewrites its weights from what it receives in
    ``changed`` with the earlier refits applied and its output in ``original`` (``Design``,
    on ``ctx.fit``; with ``outputs`` False the original outputs are not computed and
    ``design.y`` has no columns).

    Both models are walked layer by layer (``layerwise.Walk``): the changed one up to each
    layer, running only the nodes since the previous one, with the refits so far in; the
    original one up to and through the same layer. Only the tensors crossing the two cuts are
    held (beyond ``SPARSEC_CALIBRATION_BYTES`` on disk), so the whole calibration set costs one
    pass through each model and memory does not grow with depth. Each report entry says how
    many bytes of calibration tensors were in memory at that layer and how many were spilled
    so far."""
    from sparsec.layerwise import Walk

    uses = original.consumers()
    targets = [n for n in original.nodes if n.op_type in ("Conv", "Gemm", "MatMul")
               and len(n.inputs) > 1 and select(n) and _refittable(original, n, uses)]
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
            kernel = graph.initializers[node.inputs[1]].shape[2:]
            err = fit(graph, node, users, design(node, x, y, masks, kernel), i)
            report.append({"node": node.name, "weight": node.inputs[1], **err,
                           # calibration tensors the two walks hold in memory / put on disk
                           "held_bytes": now.held_bytes + before.held_bytes,
                           "spilled_bytes": now.spilled_bytes + before.spilled_bytes})
            progress.step()
    return graph, report


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
    bias_name = _bias_slot(graph, node, users, d.y.shape[1])
    intercept = bias_name is not None
    # a MatMul's intercept replaces the following Add's bias: match the output after it
    shift = graph.initializers[bias_name].astype(np.float64) \
        if node.op_type == "MatMul" and intercept else 0.0
    prior = _as_matrix(node, w).astype(np.float64)
    if intercept:
        bias = graph.initializers[bias_name].astype(np.float64).reshape(1, -1)
        prior = np.vstack([prior, np.broadcast_to(bias, (1, prior.shape[1]))])

    def predict(theta, a):
        return a @ theta[:-1] + theta[-1] if intercept else a @ theta

    chosen, scores = RIDGE if ridge is None else ridge, {}
    halves = d.split() if ridge is None else None
    if halves is not None:
        train, val = halves
        thetas = _solve(train.a, train.y + shift, intercept, seed, RIDGES, prior)
        ref = max(float(np.mean((val.y + shift) ** 2)), 1e-30)
        scores = {r: float(np.mean((predict(t, val.a) - val.y - shift) ** 2)) / ref
                  for r, t in zip((*RIDGES, None), (*thetas, prior))}
        chosen = min(scores, key=scores.get)
    target = d.y + shift
    theta = prior if chosen is None else _solve(d.a, target, intercept, seed, [chosen], prior)[0]
    graph.set_initializer(node.inputs[1], _from_matrix(node, theta[:-1] if intercept else theta, w))
    if intercept:
        graph.set_initializer(bias_name, theta[-1].astype(w.dtype))
    scale = max(float(np.sqrt(np.mean(target ** 2))), 1e-12)
    out = {"rel_rmse_before": float(np.sqrt(np.mean((predict(prior, d.a) - target) ** 2)) / scale),
           "rel_rmse_after": float(np.sqrt(np.mean((predict(theta, d.a) - target) ** 2)) / scale),
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
