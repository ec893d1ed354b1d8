"""Weight sparsification (lossy): zero the least important weights in a pattern kernels can use.

Every MatMul / Gemm / Conv weight is read as a matrix [output channels, input channels, taps]
(``reorder.weight_matrices`` gives the axes). Importance is ``magnitude`` |W| or ``wanda``
|W| * ||X_in|| (Wanda, Sun et al.: the norm of the input channel over the calibration data),
and the pattern is one of

* ``unstructured``  each output row keeps its top (1 - s) share (Wanda's per-output
  comparison group);
* ``RxC``           blocks of R output x C input channels (all taps) go whole, lowest summed
  importance first, s of the layer's blocks (edge blocks may be partial);
* ``N:M``           in every run of M consecutive input channels (per output channel and tap)
  the top N stay: sparsity 1 - N/M whatever s says (2:4 is what sparse tensor cores take);
  weights with one input channel per output (depthwise convs) are left dense by the block and
  N:M patterns, and no layer loses all of its weights;
* ``N:MgG``         grouped N:M (as in STen): G consecutive output channels share one N:M
  pattern, chosen on their summed importance. With G = 16 every 16-wide panel of the BSR
  kernel keeps exactly K N/M rows, so nothing is padded.

``allocation="lamp"`` (Lee et al., layer-adaptive magnitude pruning) replaces the same s in every
layer by one global threshold on LAMP scores: a unit's squared importance divided by the sum of
those of the units at least as important in its layer. Layers then keep what they need and the
total is still s (counted in weights). It applies to unstructured and block patterns.

``sparsegpt`` (Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot") chooses the mask and updates the weights that stay together, layer by layer
in graph order on what each layer receives in the sparse model so far (``sparsegpt``): with
H = 2 X^T X / rows + lambda I (lambda = 1 % of mean(diag H)) from the calibration inputs X and
the upper Cholesky factor U of H^-1, the columns (input channels) are visited in blocks of 128;
in each block the mask is chosen on w^2 / U[c, c]^2 (unstructured: the lowest s share of the
block's weights, so rows may differ; N:M: per row and run of M columns, chosen when the run
starts, after the updates of the columns before it), and every zeroed (or kept) column's error
is spread over the columns after it by the optimal brain surgeon update, within the block at
once and to the rest of the layer in one matrix product per block. It takes unstructured and
N:M patterns; weights it cannot refit (tied, grouped convs) get magnitude masks. The weights are
its own reconstruction: ``reconstruct`` does not refit them again.

``reconstruct`` then refits the weights that remain, layer by layer in graph order, as
SparseGPT does with its second-order update but solved directly: each output channel's kept
weights (and the bias) are the ridge least-squares fit, on calibration data, of the original
layer's output from what the layer receives in the sparse model so far (``reconstruct.py``
does the same for channel pruning's consumers). Zeros stay zeros.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import numpy as np

from sparsec import layerwise
from sparsec.ir.graph import Graph, Node
from sparsec.passes.manager import PassContext, rows
from sparsec.passes.reconstruct import (RIDGE, Design, Normal, _as_matrix, _bias_slot,
                                        _from_matrix, keep_if_better, refit_in_order,
                                        refit_targets)
from sparsec.passes.reorder import weight_matrices

CRITERIA = ("magnitude", "wanda", "sparsegpt")
#: SparseGPT's column block (lazy batched updates) and its damping, relative to mean(diag H)
SPARSEGPT_BLOCK = 128
SPARSEGPT_DAMP = 0.01
#: rows per pass of SparseGPT's column loop: a 2048 x 128 block (2 MB) stays in cache (on a
#: 32000 x 1024 layer, one thread: 256 rows 6.3 s, 1024 3.3, 4096 3.0, all at once 3.9)
SPARSEGPT_ROWS = 2048
ALLOCATIONS = ("uniform", "lamp")


def parse_pattern(text: str) -> tuple[str, tuple[int, int] | None]:
    """"unstructured" | "RxC" (block) | "N:M[gG]" -> (kind, numbers); ValueError otherwise."""
    if text == "unstructured":
        return "unstructured", None
    if m := re.fullmatch(r"(\d+)x(\d+)", text):
        r, c = int(m[1]), int(m[2])
        if r >= 1 and c >= 1:
            return "block", (r, c)
    if m := re.fullmatch(r"(\d+):(\d+)(?:g(\d+))?", text):
        n, k, g = int(m[1]), int(m[2]), int(m[3] or 1)
        if 1 <= n < k and g >= 1:
            return "nm", (n, k, g)
    raise ValueError(f"unknown sparsity pattern '{text}' (use unstructured, RxC such as 4x4, "
                     f"N:M such as 2:4, or grouped N:M such as 2:4g16)")


def _view(w: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    m = np.moveaxis(w, axes, (0, 1))
    return m.reshape(m.shape[0], m.shape[1], -1)


def _unview(m: np.ndarray, like: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    moved = np.moveaxis(like, axes, (0, 1))
    return np.moveaxis(m.reshape(moved.shape), (0, 1), axes)


def _block_sums(s: np.ndarray, r: int, c: int) -> np.ndarray:
    """[out, in, taps] -> summed over r x c x taps blocks: [ceil(out/r), ceil(in/c)]."""
    o, i = s.shape[:2]
    s = np.pad(s.sum(axis=2), ((0, -o % r), (0, -i % c)))
    return s.reshape(s.shape[0] // r, r, s.shape[1] // c, c).sum(axis=(1, 3))


def _expand(block_mask: np.ndarray, r: int, c: int, shape) -> np.ndarray:
    full = np.kron(block_mask, np.ones((r, c), dtype=bool))[: shape[0], : shape[1]]
    return np.broadcast_to(full[:, :, None], shape)


def _lamp(units: np.ndarray) -> np.ndarray:
    """LAMP score of every unit (flat): s_u^2 / sum of s_v^2 over v at least as important."""
    sq = units.ravel().astype(np.float64) ** 2
    order = np.argsort(sq, kind="stable")
    tail = np.cumsum(sq[order][::-1])[::-1]
    out = np.empty_like(sq)
    out[order] = sq[order] / np.maximum(tail, 1e-300)
    return out.reshape(units.shape)


@dataclass
class Sparsify:
    """Zero weights in ``pattern`` until ``sparsity`` of them are zero (module docstring)."""

    sparsity: float
    pattern: str = "unstructured"
    criterion: str = "magnitude"
    allocation: str = "uniform"
    ignore: list[str] = field(default_factory=list)
    reconstruct: bool = False
    name: str = "sparsify"
    exact: bool = False

    def run(self, graph: Graph, ctx: PassContext | None = None) -> tuple[Graph, dict]:
        kind, nums = parse_pattern(self.pattern)
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown sparsity criterion '{self.criterion}'")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation '{self.allocation}'")
        weights = {w: axes for w, axes in weight_matrices(graph).items()
                   if not any(fnmatchcase(w, p) for p in self.ignore)}
        score = self._scorer(graph, weights, ctx)
        names = list(weights)

        def dims(w):        # (output, input) channels of the weight's matrix view
            shape = graph.initializers[w].shape
            return shape[weights[w][0]], shape[weights[w][1]]

        masks, skipped = {}, []
        if kind != "unstructured":
            # one input channel per output (depthwise convs, a conv on a 1-channel image): no
            # kernel skips anything there, and a block would zero whole filters
            skipped = sorted(w for w in names if dims(w)[1] == 1)
            names = [w for w in names if w not in skipped]
        if kind == "nm":
            n, m, group = nums
            skipped += [w for w in names if dims(w)[1] % m or dims(w)[0] % group]
            names = [w for w in names if w not in skipped]
        solved: set[str] = set()
        if self.criterion == "sparsegpt":
            if kind == "block" or self.allocation == "lamp":
                raise ValueError("sparsegpt chooses unstructured and N:M masks, not blocks or "
                                 "lamp")
            if ctx is None:
                raise ValueError("sparsegpt needs calibration data")
            # SparseGPT chooses these masks itself: no magnitude mask and no masked copy (at
            # LLM scale a second copy of every weight, never read)
            chosen = set(names)
            solved = {t.inputs[1] for t in refit_targets(graph, lambda t: t.inputs[1] in chosen)}
            names = [w for w in names if w not in solved]
        # one weight's scores at a time (float64 for every weight of a billion-parameter
        # model at once would be 8 bytes a weight), except LAMP, which ranks them all together
        if kind == "nm":
            for w in names:
                s = score(w)
                # grouped: G consecutive output channels share one pattern (summed scores)
                pooled = s.reshape(s.shape[0] // group, group, s.shape[1] // m, m,
                                   s.shape[2]).sum(axis=1)
                rank = np.argsort(np.argsort(-pooled, axis=2, kind="stable"), axis=2)
                keep = np.repeat(rank < n, group, axis=0)
                masks[w] = keep.reshape(s.shape)
        elif self.allocation == "lamp":
            masks = self._lamp_masks({w: score(w) for w in names}, kind, nums)
        else:
            for w in names:
                masks[w] = self._uniform_mask(score(w), kind, nums, self.sparsity)
        out = graph.copy(arrays=False)      # masked weights are new arrays
        layers = {}
        for w, mask in masks.items():
            arr = graph.initializers[w]
            kept = _unview(mask, arr, weights[w])
            out.set_initializer(w, np.where(kept, arr, np.zeros((), arr.dtype)).astype(arr.dtype))
            layers[w] = round(1.0 - float(mask.mean()), 4)
        refit, guard = [], None
        if self.criterion == "sparsegpt":
            out, refit = sparsegpt(graph, out, solved, ctx, kind, nums, self.sparsity)
            layers = {w: round(float((out.initializers[w] == 0).mean()), 4)
                      for w in weights if w in masks or w in solved}
        elif self.reconstruct:
            if ctx is None:
                raise ValueError("reconstruction needs calibration data")
            fitted, refit = refit_sparse(graph, out, set(masks), ctx)
            out, guard = keep_if_better(graph, out, fitted, ctx)
        covered = [*masks, *solved]
        total = sum(graph.initializers[w].size for w in covered)
        zeros = sum(int((out.initializers[w] == 0).sum()) for w in covered)
        return out, {"refit": refit, "reconstruction": guard, "pattern": self.pattern,
                     "criterion": self.criterion,
                     "allocation": self.allocation if kind != "nm" else "fixed by N:M",
                     "target": self.sparsity if kind != "nm" else 1 - nums[0] / nums[1],
                     "achieved": round(zeros / max(total, 1), 4), "layers": layers,
                     "skipped": skipped}

    def _scorer(self, graph: Graph, weights, ctx):
        """``score(weight name)``: its importance as [out, in, taps] float64, computed when
        asked (Wanda's input norms are gathered first, in one walk over the calibration data)."""
        norms: dict[str, np.ndarray] = {}
        if self.criterion == "wanda":
            if ctx is None:
                raise ValueError("wanda sparsification needs calibration data")
            readers = {}
            for n in graph.nodes:
                if len(n.inputs) > 1 and n.inputs[1] in weights:
                    x = n.inputs[0]
                    axis = len(graph.shape(x)) - 1 if n.op_type == "MatMul" else 1
                    readers[n.inputs[1]] = (x, axis)
            masks = ctx.masks(ctx.fit)
            sq: dict[tuple[str, int], object] = {r: 0 for r in readers.values()}

            def add(x, i, value):     # one batch at a time (layerwise.collect)
                for key in [r for r in sq if r[0] == x]:
                    sq[key] = sq[key] + (rows(value, masks[i], key[1]).astype(np.float64)
                                         ** 2).sum(axis=0)

            layerwise.collect(graph, ctx.fit, sorted({x for x, _ in readers.values()}), add)
            norms = {w: np.sqrt(sq[reader]) for w, reader in readers.items()}

        def score(w: str) -> np.ndarray:
            s = np.abs(_view(graph.initializers[w], weights[w])).astype(np.float64)
            norm = norms.get(w)
            if norm is not None and norm.size == s.shape[1]:   # grouped convs: magnitude
                s = s * norm[None, :, None]
            return s

        return score

    @staticmethod
    def _uniform_mask(s: np.ndarray, kind: str, nums, sparsity: float) -> np.ndarray:
        if kind == "unstructured":
            flat = s.reshape(s.shape[0], -1)
            n_drop = min(int(round(sparsity * flat.shape[1])), flat.shape[1] - 1)
            rank = np.argsort(np.argsort(flat, axis=1, kind="stable"), axis=1)
            return (rank >= n_drop).reshape(s.shape)
        r, c = nums
        b = _block_sums(s, r, c)
        n_drop = min(int(round(sparsity * b.size)), b.size - 1)   # never the whole layer
        rank = np.argsort(np.argsort(b.ravel(), kind="stable"), kind="stable")
        return _expand((rank >= n_drop).reshape(b.shape), r, c, s.shape)

    def _lamp_masks(self, scores, kind: str, nums) -> dict[str, np.ndarray]:
        units, lamp, sizes = {}, [], []
        for w, s in scores.items():
            u = s if kind == "unstructured" else np.sqrt(_block_sums(s ** 2, *nums))
            per = np.ones(u.shape) if kind == "unstructured" else _block_sums(
                np.ones(s.shape), *nums)
            units[w] = u
            lamp.append(_lamp(u).ravel())
            sizes.append(per.ravel())
        allv, alls = np.concatenate(lamp), np.concatenate(sizes)
        order = np.argsort(allv, kind="stable")
        budget = self.sparsity * alls.sum()
        n_drop = int(np.searchsorted(np.cumsum(alls[order]), budget, side="right"))
        drop = np.zeros(allv.size, dtype=bool)
        drop[order[:n_drop]] = True
        masks, at = {}, 0
        for w, u in units.items():
            keep = ~drop[at: at + u.size].reshape(u.shape)
            at += u.size
            masks[w] = keep if kind == "unstructured" else _expand(keep, *nums, scores[w].shape)
        return masks


def refit_sparse(original: Graph, sparse: Graph, weights: set[str], ctx: PassContext,
                 ridge: float = RIDGE) -> tuple[Graph, list[dict]]:
    """Refit the kept weights of every sparsified layer (module docstring), in graph order."""
    def fit(graph, node, users, d: Design, seed):
        return _refit_masked(graph, node, users, d.full, ridge)

    return refit_in_order(original, sparse, lambda n: n.inputs[1] in weights, fit, ctx)


def _refit_masked(graph: Graph, node: Node, users, n: Normal, ridge: float) -> dict:
    """``n``: the layer's least-squares problem as normal equations (``Design.full``)."""
    w = graph.initializers[node.inputs[1]]
    mat = _as_matrix(node, w).astype(np.float64)            # [K, N]: a @ mat
    bias_name = _bias_slot(graph, node, users, mat.shape[1])
    intercept = bias_name is not None
    shift = graph.initializers[bias_name].astype(np.float64) \
        if node.op_type == "MatMul" and intercept else 0.0
    bias = graph.initializers[bias_name].astype(np.float64) if bias_name else None
    gram, rhs = n.gram(intercept), n.rhs(intercept, shift)
    lam = ridge * max(float(np.mean(np.diag(gram))), 1e-12)
    new_mat, new_bias = np.zeros_like(mat), np.zeros(mat.shape[1])
    extra = [mat.shape[0]] if intercept else []
    for j in range(mat.shape[1]):
        idx = np.concatenate([np.flatnonzero(mat[:, j]), extra]).astype(np.int64)
        if idx.size == 0:
            continue
        theta = np.linalg.solve(gram[np.ix_(idx, idx)] + lam * np.eye(idx.size), rhs[idx, j])
        if intercept:
            new_bias[j] = theta[-1]
            theta = theta[:-1]
        new_mat[idx[: theta.size], j] = theta
    graph.set_initializer(node.inputs[1], _from_matrix(node, new_mat, w))
    if intercept:
        graph.set_initializer(bias_name, new_bias.astype(w.dtype))
    before = np.vstack([mat, bias[None]]) if intercept else mat
    after = np.vstack([new_mat, new_bias[None]]) if intercept else new_mat
    scale = max(float(np.sqrt(n.mean_sq(None, intercept, shift))), 1e-12)
    return {"rel_rmse_before": float(np.sqrt(n.mean_sq(before, intercept, shift))) / scale,
            "rel_rmse_after": float(np.sqrt(n.mean_sq(after, intercept, shift))) / scale}


def sparsegpt(original: Graph, sparse: Graph, weights: set[str], ctx: PassContext, kind: str,
              nums, sparsity: float) -> tuple[Graph, list[dict]]:
    """SparseGPT on every refittable layer of ``weights`` (module docstring), in graph order,
    each on its inputs in ``sparse`` with the layers before it done; the others keep the masks
    ``sparse`` has. The report gives each layer's relative output error ||X(W' - W)|| / ||XW||
    on the calibration rows."""
    def fit(graph, node, users, d: Design, seed):
        w = original.initializers[node.inputs[1]]
        mat = _as_matrix(node, w).astype(np.float64)            # [K, N]: a @ mat
        taps = int(np.prod(w.shape[2:])) if node.op_type == "Conv" else 1
        full = d.full
        h = full.gram(False) * (2.0 / max(full.rows, 1))
        if taps == 1:       # no reordering: no copies (an LM head's matrix is 250 MB and more)
            new = sparsegpt_layer(mat.T, h, kind, nums, sparsity)[0].T
        else:
            # im2col columns run channel-major; N:M runs over consecutive input channels per tap
            order = np.arange(mat.shape[0]).reshape(-1, taps).T.ravel()
            rows_w, _ = sparsegpt_layer(mat[order].T, h[np.ix_(order, order)], kind, nums,
                                        sparsity)
            new = np.empty_like(mat)
            new[order] = rows_w.T
        graph.set_initializer(node.inputs[1], _from_matrix(node, new, w))
        # the report in float32 products (a figure, not a fit: on a 1024 x 32000 LM head the
        # two took about 7 s in float64 with their temporaries, 1.4 s so; one thread)
        h32, mat32 = h.astype(np.float32), mat.astype(np.float32)
        delta = new.astype(np.float32) - mat32
        ref = max(float(np.vdot(h32 @ mat32, mat32)), 1e-30)       # ||X W||^2 (times 2/rows)
        return {"rel_err": float(np.sqrt(max(float(np.vdot(h32 @ delta, delta)), 0.0) / ref))}

    return refit_in_order(original, sparse, lambda n: n.inputs[1] in weights, fit, ctx,
                          outputs=False)


def sparsegpt_layer(w: np.ndarray, h: np.ndarray, kind: str, nums, sparsity: float,
                    block: int = SPARSEGPT_BLOCK, damp: float = SPARSEGPT_DAMP
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One layer's SparseGPT: ``w`` [rows, columns] (a row is one output, the columns are what
    it reads), ``h`` [columns, columns] the Hessian 2 X^T X of its inputs. Returns (the pruned
    and updated weights, the kept mask). ``kind`` "unstructured" (``sparsity`` of each block's
    weights go) or "nm" (``nums`` = N, M, G: N of every M consecutive columns stay, G
    consecutive rows sharing the choice)."""
    w = np.array(w, dtype=np.float64)
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) == 0                         # inputs never active: nothing to weigh
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    u = inverse_upper_factor(h)                    # rows give the OBS updates column by column
    n_rows, n_cols = w.shape
    n, m, group = nums if kind == "nm" else (0, 1, 1)
    block = max(block // m, 1) * m                 # N:M runs never straddle two blocks
    chunk = max(SPARSEGPT_ROWS // group, 1) * group
    keep = np.ones(w.shape, dtype=bool)
    for start in range(0, n_cols, block):
        stop = min(start + block, n_cols)
        u1 = u[start:stop, start:stop]
        ut = np.ascontiguousarray(u1.T)            # ut[j, :j]: what column j takes from each
        diag = np.diag(u1)
        err = np.zeros((n_rows, stop - start), order="F")
        keep1 = keep[:, start:stop]
        if kind == "unstructured":
            score = (w[:, start:stop] / diag) ** 2
            n_drop = int(round(sparsity * score.size))
            if n_drop:      # the n_drop lowest, in no order (a full sort cost 60 ms a block)
                keep1[np.unravel_index(np.argpartition(score, n_drop - 1, axis=None)[:n_drop],
                                       score.shape)] = False
        # rows are independent once the block's mask is known (N:M: groups stay whole), so
        # they go in chunks whose block of weights stays in cache through the column loop
        for r0 in range(0, n_rows, chunk):
            rs = slice(r0, min(r0 + chunk, n_rows))
            # column-major: a column, and the error columns before it, are contiguous
            w1, k1, e1 = np.asfortranarray(w[rs, start:stop]), keep1[rs], err[rs]
            for j in range(stop - start):
                # column j as the updates of the columns before it left it (left-looking: one
                # matrix-vector product, not a rank-one update of every column after it)
                if kind == "nm" and j % m == 0:
                    run = w1[:, j: j + m] - e1[:, :j] @ ut[j: j + m, :j].T
                    pooled = ((run / diag[j: j + m]) ** 2).reshape(-1, group, m).sum(axis=1)
                    rank = np.argsort(np.argsort(-pooled, axis=1, kind="stable"), axis=1)
                    k1[:, j: j + m] = np.repeat(rank < n, group, axis=0)
                col = w1[:, j] - e1[:, :j] @ ut[j, :j]
                e1[:, j] = np.where(k1[:, j], 0.0, col) / diag[j]
                w1[:, j] = np.where(k1[:, j], col, 0.0)
            w[rs, start:stop] = w1
        w[:, stop:] -= err @ u[start:stop, stop:]
    return w, keep


def inverse_upper_factor(h: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of ``h``^-1 (``h`` = U^-1 U^-T), without forming ``h``^-1:
    with J the reversal, J h J = L L^T gives h^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is
    upper. One Cholesky and one triangular inverse: on a 5632-wide Hessian 5 s against 14 s
    for inverting and factoring (one thread)."""
    return _lower_inverse(np.linalg.cholesky(h[::-1, ::-1]))[::-1, ::-1]


def _lower_inverse(low: np.ndarray) -> np.ndarray:
    """The inverse of the lower-triangular ``low``, by halves: [[A, 0], [B, C]]^-1 =
    [[A^-1, 0], [-C^-1 B A^-1, C^-1]] (matrix products, where numpy has no triangular
    inverse)."""
    size = low.shape[0]
    if size <= 256:
        return np.tril(np.linalg.inv(low))      # LU leaves rounding above the diagonal
    k = size // 2
    a, c = _lower_inverse(low[:k, :k]), _lower_inverse(low[k:, k:])
    out = np.zeros_like(low)
    out[:k, :k], out[k:, k:] = a, c
    out[k:, :k] = -(c @ (low[k:, :k] @ a))
    return out
