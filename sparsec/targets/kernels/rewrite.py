"""Relax pass: replace heavy ops with calls to our pre-scheduled kernels.

Runs on the module ``from_onnx`` produces, before legalization. For every ``R.matmul`` and
``R.nn.conv2d`` the registry's cost rule picks a strategy (see ``kernels/__init__.py``). A chosen
kernel becomes ``R.call_tir(kernel, [x, packed_weight(, bias)])`` where the weight was packed in
numpy and baked in as a constant. A following ``add(., constant per-channel bias)``, an ``add``
of a same-shape tensor (a skip connection), then ``nn.relu`` and/or ONNX Clip's ``maximum`` /
``minimum`` with constant bounds (ReLU6), or ``nn.gelu``, or SiLU (``x * sigmoid(x)``, CPU),
each optional and each the only user of the previous value, are folded into the kernel's write-back (the epilogue), and their
bindings become aliases of the kernel output.

Kernels are marked ``tirx.is_scheduled`` and ``op_pattern = kOpaque``, so FuseOps/FuseTIR leave
them whole and the fallback scheduler skips them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from sparsec import progress
from sparsec.progress import Progress
from sparsec.targets import kernels
from sparsec.targets.kernels import (amx, batch_matmul, block_c16, bsr, conv2d, dense,
                                     depthwise, dw_pointwise, grouped_conv, mma, mma_sp,
                                     pointwise, pointwise_dw, softmax, sparse_cuda)
from sparsec.targets.kernels.common import (Activation, bf16_allowed, current_precision,
                                            target_cores)
from sparsec.targets.knobs import build as build_kernel
from sparsec.targets.knobs import (block_kernel_plan, build_tuned, expansion_plan, knobs_for,
                                  measured_choice)

if TYPE_CHECKING:
    import numpy as np
    from tvm import ir, relax, tirx

SUPPORTED_DTYPES = ("float32",)


@dataclass
class Plan:
    """What to emit for one heavy-op binding."""

    strategy: str
    emit: Callable[..., "relax.Expr"]  # (bb, args, bias, act, residual) -> expr
    bias: "np.ndarray | None" = None
    residual: Any = None  # a same-shape tensor added before the activation (skip connection)
    residual_shape: tuple | None = None  # the kernel output's shape, when the add saw a reshape
    act: Activation | None = None  # output activation (clip bounds, GELU)
    shape: dict = field(default_factory=dict)  # the kernel's shape arguments (tuning key)
    info: dict = field(default_factory=dict)
    inputs: list | None = None  # the operands the kernel reads, when not the op's own
    operands: dict = field(default_factory=dict)  # geometry and weights, for kernel fusion
    epilogue: bool = True  # whether following bias / residual / activation ops may fold in
    #: a per-input-channel gate ([1, C, 1, 1]) the kernel's packed weights are multiplied by
    #: at run time, in place of the op's input being multiplied by it (:func:`_fold_gates`)
    input_scale: Any = None


def _static_shape(expr: "relax.Expr") -> tuple[int, ...] | None:
    from tvm import relax, tirx

    ty = getattr(expr, "ty", None)  # TVM 0.27: Relax types replaced struct_info
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    shape = getattr(ty.shape, "values", None)
    if shape is None or not all(isinstance(d, tirx.IntImm) for d in shape):
        return None
    return tuple(int(d.value) for d in shape)


def _dims(expr: "relax.Expr") -> tuple | None:
    """``_static_shape``, with a symbolic dim (a dynamic model's) as its printed expression:
    enough to compare two shapes (a static shape gives the same tuple as ``_static_shape``)."""
    from tvm import tirx

    shape = _shape_exprs(expr)
    if shape is None:
        return None
    return tuple(int(d.value) if isinstance(d, tirx.IntImm) else str(d) for d in shape)


def _dtype(expr: "relax.Expr") -> str:
    return str(expr.ty.dtype)


class _Analysis:
    """Bindings and use counts of one Relax function, and constant folding of weight views."""

    def __init__(self, func: "relax.Function") -> None:
        from tvm import relax

        self.bindings: dict[Any, Any] = {}
        self.order: list[Any] = []
        self.uses: dict[Any, int] = {}
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    self.bindings[b.var] = b.value
                    self.order.append(b.var)
                for v in relax.analysis.free_vars(b.value if isinstance(
                        b, relax.VarBinding) else b.var):
                    self.uses[v] = self.uses.get(v, 0) + 1
        for v in relax.analysis.free_vars(func.body.body):
            self.uses[v] = self.uses.get(v, 0) + 1
        self.users: dict[Any, list[Any]] = {}
        for var, value in self.bindings.items():
            for v in relax.analysis.free_vars(value):
                self.users.setdefault(v, []).append(var)
        #: what a matcher would tell the user about the op being planned (a faster kernel
        #: an option would allow): goes to its decision as ``hint``
        self.hint: str | None = None

    def const(self, expr: "relax.Expr") -> "np.ndarray | None":
        """The value of ``expr`` when it is a constant or a transpose/reshape of one."""
        import tvm
        from tvm import relax

        while isinstance(expr, relax.Var) and expr in self.bindings:
            expr = self.bindings[expr]
        if isinstance(expr, tvm.ir.expr.GenericConst):
            return expr.value.numpy()
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm_op_type()):
            name = expr.op.name
            if name == "relax.permute_dims":
                base = self.const(expr.args[0])
                if base is None:
                    return None
                axes = expr.attrs.axes
                return base.transpose(None if axes is None else [int(a) for a in axes])
            if name == "relax.reshape":
                base = self.const(expr.args[0])
                shape = _static_shape(expr)
                return None if base is None or shape is None else base.reshape(shape)
            if name in ("relax.isnan", "relax.where"):  # ONNX Clip's NaN-bound guard
                import numpy as np

                vals = [self.const(arg) for arg in expr.args]
                if any(v is None for v in vals):
                    return None
                return np.isnan(*vals) if name == "relax.isnan" else np.where(*vals)
        return None

    def single_user(self, var: Any) -> tuple[Any, Any] | None:
        """(binding var, call) of the only use of ``var``, if it has exactly one."""
        if self.uses.get(var, 0) != 1 or len(self.users.get(var, [])) != 1:
            return None
        user = self.users[var][0]
        return user, self.bindings[user]


def tvm_op_type():
    import tvm

    return tvm.ir.Op


# --------------------------------------------------------------------------- matching


@dataclass
class _Linear:
    """``X[..., K] @ W[K, N]`` with W constant, run as the 2-D ``[M, K] @ [K, N]``."""

    w: "np.ndarray"
    xs: tuple[int, ...]
    out: tuple[int, ...]
    m: int
    dtype: str

    @property
    def k(self) -> int:
        return int(self.w.shape[0])

    @property
    def n(self) -> int:
        return int(self.w.shape[1])

    def emit(self, bb: "relax.BlockBuilder", func: "tirx.PrimFunc", name: str, args: list,
             weights: list, bias, residual) -> "relax.Expr":
        """The call of the kernel ``func`` (``(X, *weights [, B] [, R], Y)``), with X and the
        residual flattened to M rows and Y reshaped back."""
        from tvm import relax

        flat = len(self.xs) == 2
        gv = bb.add_func(func, name)
        x2 = args[0] if flat else bb.emit(relax.op.reshape(args[0], (self.m, self.k)))
        call_args = [x2, *weights] + ([relax.const(bias)] if bias is not None else [])
        if residual is not None:
            call_args.append(residual if flat else bb.emit(
                relax.op.reshape(residual, (self.m, self.n))))
        y = relax.call_tir(gv, call_args, relax.TensorType((self.m, self.n), self.dtype))
        return y if flat else relax.op.reshape(bb.emit(y), self.out)


def _linear(a: _Analysis, call: "relax.Call") -> _Linear | None:
    """The matmul as a ``_Linear`` when W is a 2-D constant, X is not (a constant-only
    product is FoldConstant's job), the shapes are static and the dtype supported."""
    x, w_expr = call.args
    w = a.const(w_expr)
    xs, out = _static_shape(x), _static_shape(call)
    if (w is None or w.ndim != 2 or xs is None or out is None or len(xs) < 2
            or a.const(x) is not None):
        return None
    if _dtype(x) not in SUPPORTED_DTYPES or str(w.dtype) != _dtype(x) or _dtype(call) != _dtype(x):
        return None
    m = 1
    for d in xs[:-1]:
        m *= d
    return _Linear(w, xs, out, m, _dtype(x))


def _shape_exprs(expr: "relax.Expr") -> tuple | None:
    """The shape of ``expr``, symbolic dims as PrimExprs (None when the rank is unknown)."""
    from tvm import relax

    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    return tuple(getattr(ty.shape, "values", None) or ()) or None


def _match_dynamic_dense(a: _Analysis, call: "relax.Call") -> list[tuple[Plan, dict]] | None:
    """``X[..., K] @ W[K, N]`` with W constant, K static and the rows (the leading dims of
    X: batch x seq) symbolic: ``dense_packed`` with a run-time row count
    (``dense.build_dynamic``), W packed here. Only in a model compiled with dynamic shapes."""
    from tvm import relax, tirx

    x, w_expr = call.args
    w = a.const(w_expr)
    xs, out = _shape_exprs(x), _shape_exprs(call)
    if (w is None or w.ndim != 2 or xs is None or out is None or len(xs) < 2
            or a.const(x) is not None or not isinstance(xs[-1], tirx.IntImm)
            or int(xs[-1]) != w.shape[0]):
        return None
    if _dtype(x) not in SUPPORTED_DTYPES or str(w.dtype) != _dtype(x) or _dtype(call) != _dtype(x):
        return None
    k, n, dtype = int(w.shape[0]), int(w.shape[1]), _dtype(x)
    m = xs[0]
    for d in xs[1:-1]:
        m = m * d

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        func = dense.build_dynamic(k, n, dtype, bias=bias is not None, act=act,
                                   residual=residual is not None)
        gv = bb.add_func(func, dense.NAME)
        x2 = args[0] if len(xs) == 2 else bb.emit(relax.op.reshape(args[0], (m, k)))
        call_args = [x2, relax.const(dense.pack_weight(w))] + (
            [relax.const(bias)] if bias is not None else [])
        if residual is not None:
            call_args.append(residual if len(xs) == 2 else bb.emit(
                relax.op.reshape(residual, (m, n))))
        y = relax.call_tir(gv, call_args, relax.TensorType((m, n), dtype))
        return y if len(xs) == 2 else relax.op.reshape(bb.emit(y), out)

    info = {"op": "matmul", "shape": {"M": _shown(m), "K": k, "N": n}, "rows": "run time"}
    # the cost rule compares per-row work (M is not known here)
    return [(Plan(dense.NAME, emit, info=info, shape={"m": _shown(m), "k": k, "n": n,
                                                      "dtype": dtype}), {"macs": k * n})]


def _shown(dim) -> int | str:
    """A dim for the compile report: its value, or a symbolic one's expression."""
    import re

    from tvm import tirx

    if isinstance(dim, tirx.IntImm):
        return int(dim.value)
    return re.sub(r"T\.int64\((\d+)\)", r"\1", str(dim))


def _match_dense(a: _Analysis, call: "relax.Call") -> list[tuple[Plan, dict]] | None:
    x, w_expr = call.args
    if a.const(w_expr) is None and a.const(x) is None:
        return _match_batch_matmul(a, call)
    lin = _linear(a, call)
    if lin is None:
        return _match_dynamic_dense(a, call)
    w, m, k, n, dtype = lin.w, lin.m, lin.k, lin.n, lin.dtype

    def emitter(strategy: str):
        def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
                 ) -> "relax.Expr":
            from tvm import relax

            flags = {"bias": bias is not None, "act": act, "residual": residual is not None}
            if strategy == bsr.NAME:
                idx, data = bsr.pack_weight(w)
                weights = [relax.const(idx), relax.const(data)]
            elif strategy in (amx.NAME, amx.SPARSE_NAME):
                knobs = knobs_for(strategy, shapes[strategy]) or {}
                tiles = amx.plan(m, k, n, knobs.get("mt"), knobs.get("nt"))
                if strategy == amx.NAME:
                    weights = [relax.const(amx.pack_weight(w, tiles))]
                else:   # the bytes rule packed it for the default tiles already
                    sw = compressed.get(tiles) or amx.pack_sparse(w, tiles)
                    weights = [relax.const(a) for a in (sw.values, sw.masks, sw.offsets)]
            else:
                weights = [relax.const(dense.pack_weight(w, dense.lanes_for(m)))]
            func = build_tuned(strategy, shapes[strategy], **flags)
            return lin.emit(bb, func, strategy, args, weights, bias, residual)
        return emit

    info = {"op": "matmul", "shape": {"M": m, "K": k, "N": n}}
    compressed: dict = {}      # sparse_amx_bf16's weight per tile plan
    rows = bsr.padded_rows(w)
    shapes = {dense.NAME: {"m": m, "k": k, "n": n, "dtype": dtype},
              bsr.NAME: {"m": m, "k": k, "n": n, "rows": rows, "dtype": dtype}}
    plans = [(Plan(dense.NAME, emitter(dense.NAME), info=info, shape=shapes[dense.NAME]),
              {"macs": m * k * n})]
    if rows < k:            # some 16-wide panel rows are all zero: the sparse kernel skips them
        sparse_info = {**info, "rows_kept": rows}
        work = m * rows * (-(-n // bsr.LANES)) * bsr.LANES
        plans.append((Plan(bsr.NAME, emitter(bsr.NAME), info=sparse_info,
                           shape=shapes[bsr.NAME]), {"macs": work}))
    if amx.available():     # bf16 tiles: K and N padded to whole tiles
        tiles = amx.plan(m, k, n)
        shapes[amx.NAME] = dict(shapes[dense.NAME])
        amx_info = {**info, **amx.report(tiles)}
        amx_macs = tiles.mp * tiles.kp * tiles.np_
        plans.append((Plan(amx.NAME, emitter(amx.NAME), info=amx_info,
                           shape=shapes[amx.NAME]), {"macs": amx_macs}))
        if tiles.mt == 1 and tiles.rows == m:   # one row tile: bound by reading W
            sw = compressed[tiles] = amx.pack_sparse(w, tiles)
            dense_bytes = amx.dense_bytes(tiles)
            if sw.nbytes * 4 <= dense_bytes * 3:   # the bytes rule, as nm_sparse_cuda's
                shapes[amx.SPARSE_NAME] = {**shapes[dense.NAME], "nnz": sw.nnz}
                sparse_info = {**amx_info, "format": "bitmap (SparAMX)",
                               "weight_bytes": {"dense_bf16": dense_bytes,
                                                "compressed": sw.nbytes},
                               "bytes_per_weight": round(sw.nbytes / (k * n), 3)}
                # memory-bound: the work the rule compares is in proportion to bytes read
                plans.append((Plan(amx.SPARSE_NAME, emitter(amx.SPARSE_NAME),
                                   info=sparse_info, shape=shapes[amx.SPARSE_NAME]),
                              {"macs": amx_macs * sw.nbytes // dense_bytes}))
    return plans


def _transposed_operand(a: _Analysis, y: Any) -> Any:
    """``t`` when ``y`` is ``permute_dims(t)`` swapping only the last two axes (attention's
    K^T), else None."""
    from tvm import relax

    value = a.bindings.get(y)
    if not (isinstance(value, relax.Call) and getattr(value.op, "name", "")
            == "relax.permute_dims" and value.attrs.axes is not None):
        return None
    rank = len(value.attrs.axes)
    if [int(i) for i in value.attrs.axes] != list(range(rank - 2)) + [rank - 1, rank - 2]:
        return None
    return value.args[0]


def _match_batch_matmul(a: _Analysis, call: "relax.Call") -> list[tuple[Plan, dict]] | None:
    """``batch_matmul`` for a matmul of two run-time tensors ``[..., M, K] @ [..., K, N]`` with
    the same leading (batch) dims, e.g. attention's Q @ K^T and P @ V. When the second operand
    is a transpose of its last two axes (K^T), the kernel reads the untransposed tensor and
    packs each panel itself, and the transpose kernel is gone."""
    x, y = call.args
    xs, ys, out = _static_shape(x), _static_shape(y), _static_shape(call)
    if xs is None or ys is None or out is None:
        return _match_dynamic_batch_matmul(a, call)
    if len(xs) != len(ys) or len(xs) < 2:
        return None
    if xs[:-2] != ys[:-2] or xs[-1] != ys[-2] or out != xs[:-1] + ys[-1:]:
        return None
    dtype = _dtype(x)
    if dtype not in SUPPORTED_DTYPES or _dtype(y) != dtype or _dtype(call) != dtype:
        return None
    (m, k), n = xs[-2:], ys[-1]
    batch = 1
    for d in xs[:-2]:
        batch *= d
    kshape = {"batch": batch, "m": m, "k": k, "n": n, "dtype": dtype}
    yt = _transposed_operand(a, y)
    if yt is not None:
        kshape["b_transposed"] = True

    def emitter(strategy: str):
        def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
                 ) -> "relax.Expr":
            return _emit_batch_matmul(bb, strategy, kshape, args, bias, act, residual, xs,
                                      out, yt is not None)
        return emit

    info = {"op": "matmul", "shape": {"batch": batch, "M": m, "K": k, "N": n}}
    if yt is not None:
        info["b_transposed"] = True
    inputs = None if yt is None else [x, yt]
    padded_n = -(-n // batch_matmul.panel_lanes(n)) * batch_matmul.panel_lanes(n)
    plans = [(Plan(batch_matmul.NAME, emitter(batch_matmul.NAME), info=info, shape=kshape,
                   inputs=inputs), {"macs": batch * m * k * padded_n})]
    if amx.available():     # both operands staged in bf16 per call: any N
        tiles = amx.plan(m, k, n)
        amx_info = {**info, **amx.report(tiles)}
        plans.append((Plan(amx.BATCH_NAME, emitter(amx.BATCH_NAME), info=amx_info,
                           shape=kshape, inputs=inputs),
                      {"macs": batch * tiles.mp * tiles.kp * tiles.np_}))
    return plans


def _match_dynamic_batch_matmul(a: _Analysis, call: "relax.Call"
                                ) -> list[tuple[Plan, dict]] | None:
    """``_match_batch_matmul`` in a model with dynamic shapes: ``batch_matmul`` with the
    symbolic dims (batch x heads, the sequence in M, K or N) run-time extents of the kernel
    (``batch_matmul.build_dynamic``)."""
    from tvm import relax, tirx

    x, y = call.args
    xs, ys, out = _dims(x), _dims(y), _dims(call)
    if xs is None or ys is None or out is None or len(xs) != len(ys) or len(xs) < 3:
        return None
    if xs[:-2] != ys[:-2] or xs[-1] != ys[-2] or out != xs[:-1] + ys[-1:]:
        return None
    dtype = _dtype(x)
    if dtype not in SUPPORTED_DTYPES or _dtype(y) != dtype or _dtype(call) != dtype:
        return None
    exprs, yexprs = _shape_exprs(x), _shape_exprs(y)
    batch = exprs[0]
    for d in exprs[1:-2]:
        batch = batch * d
    m, k, n = exprs[-2], exprs[-1], yexprs[-1]

    def static(v):
        return int(v.value) if isinstance(v, tirx.IntImm) else None

    yt = _transposed_operand(a, y)

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        func = batch_matmul.build_dynamic(
            static(batch), static(m), static(k), static(n), dtype, bias=bias is not None,
            act=act, residual=residual is not None, b_transposed=yt is not None)
        gv = bb.add_func(func, batch_matmul.NAME)

        def as3d(v, shape):
            return v if len(xs) == 3 else bb.emit(relax.op.reshape(v, (batch,) + shape))

        call_args = [as3d(args[0], (m, k)),
                     as3d(args[1], (n, k) if yt is not None else (k, n))]
        if bias is not None:
            call_args.append(relax.const(bias))
        if residual is not None:
            call_args.append(as3d(residual, (m, n)))
        y3 = relax.call_tir(gv, call_args, relax.TensorType((batch, m, n), dtype))
        return y3 if len(xs) == 3 else relax.op.reshape(bb.emit(y3), _shape_exprs(call))

    info = {"op": "matmul", "shape": {d: _shown(v) for d, v in (
        ("batch", batch), ("M", m), ("K", k), ("N", n))}, "rows": "run time"}
    if yt is not None:
        info["b_transposed"] = True
    known = [v for v in (static(m), static(k), static(n)) if v is not None]
    return [(Plan(batch_matmul.NAME, emit, info=info, inputs=None if yt is None else [x, yt],
                  shape={"dynamic": True, **{d: _shown(v) for d, v in
                                             (("batch", batch), ("m", m), ("k", k),
                                              ("n", n))}}),
             {"macs": max(known, default=1) * 64})]


def _emit_batch_matmul(bb: "relax.BlockBuilder", strategy: str, kshape: dict, args: list,
                       bias, act: Activation | None, residual, xs: tuple, out: tuple,
                       transposed: bool) -> "relax.Expr":
    """The call of a batch-matmul kernel (``strategy``) on 3-D views of its operands."""
    func = build_tuned(strategy, kshape, bias=bias is not None, act=act,
                              residual=residual is not None)
    return _call_batched(bb, bb.add_func(func, strategy), kshape, args, bias, residual, xs,
                         out, transposed)


def _call_batched(bb: "relax.BlockBuilder", gv, kshape: dict, args: list, bias, residual,
                  xs: tuple, out: tuple, transposed: bool) -> "relax.Expr":
    """The call of a batched matmul kernel ``gv`` (``(X[B,M,K], Y[B,K,N] or [B,N,K]
    [, bias] [, R[B,M,N]]) -> [B,M,N]``) on 3-D views of the op's operands."""
    from tvm import relax

    batch, m, k, n, dtype = (kshape[d] for d in ("batch", "m", "k", "n", "dtype"))

    def as3d(v, shape):
        return v if len(xs) == 3 else bb.emit(relax.op.reshape(v, (batch,) + shape))

    call_args = [as3d(args[0], (m, k)), as3d(args[1], (n, k) if transposed else (k, n))]
    if bias is not None:
        call_args.append(relax.const(bias))
    if residual is not None:
        call_args.append(as3d(residual, (m, n)))
    y3 = relax.call_tir(gv, call_args, relax.TensorType((batch, m, n), dtype))
    return y3 if len(xs) == 3 else relax.op.reshape(bb.emit(y3), out)


def _match_conv(a: _Analysis, call: "relax.Call") -> tuple[Plan, dict] | None:
    if _static_shape(call.args[0]) is None or _static_shape(call) is None:
        return _match_dynamic_conv(a, call)
    found = _static_conv(a, call)
    if found is None:
        return None
    shape, groups, w, xs, out = found
    if depthwise.matches(shape, groups):
        return [_depthwise(shape, w, _dtype(call), xs, out)]
    if grouped_conv.matches(shape, groups):
        return [_grouped(shape, groups, w, _dtype(call), xs, out)]
    if groups != 1:
        return None
    return _conv_plans(shape, w, _dtype(call), xs, out)


def _pads(attrs) -> tuple[int, int, int, int]:
    """A conv's or pool's padding as (top, left, bottom, right) (Relax may give two values)."""
    pad = [int(p) for p in attrs.padding]
    return tuple(pad * 2 if len(pad) == 2 else pad)


def _static_conv(a: _Analysis, call: "relax.Call") -> tuple | None:
    """``(ConvShape, groups, W, x shape, out shape)`` of a static NCHW/OIHW conv2d by a
    constant W in a supported dtype, else None."""
    x, w_expr = call.args
    at = call.attrs
    w = a.const(w_expr)
    xs, out = _static_shape(x), _static_shape(call)
    if xs is None or out is None or w is None or w.ndim != 4 or len(xs) != 4:
        return None
    if (str(at.data_layout), str(at.kernel_layout)) != ("NCHW", "OIHW"):
        return None
    if str(at.out_layout) not in ("NCHW", ""):
        return None
    if _dtype(x) not in SUPPORTED_DTYPES or str(w.dtype) != _dtype(x) or _dtype(call) != _dtype(x):
        return None
    groups = int(at.groups)
    if w.shape[1] * groups != xs[1]:
        return None
    shape = conv2d.ConvShape(
        n=xs[0], ic=xs[1], h=xs[2], w=xs[3], oc=w.shape[0], kh=w.shape[2], kw=w.shape[3],
        stride=tuple(int(s) for s in at.strides), padding=_pads(at),
        dilation=tuple(int(d) for d in at.dilation))
    if (shape.n, shape.oc) + shape.out_hw != out:
        return None
    return shape, groups, w, xs, out


def _conv_plans(shape: conv2d.ConvShape, w: "np.ndarray", dtype: str, xs: tuple, out: tuple
                ) -> list[tuple[Plan, dict]]:
    """The CPU kernels for a groups-1 conv."""
    wplan = conv2d.plan_wvec(shape)
    kshape = {**dataclasses.asdict(shape), "dtype": dtype}
    if wplan:
        kshape["variant"] = "width_vectorized"
        # the tuner may have measured the channel-blocked kernel faster on this CPU
        if (knobs_for(conv2d.NAME, kshape) or {}).get("kernel") == "oc_blocked":
            wplan = None
    packed = conv2d.pack_weight(w, wplan.oct if wplan else conv2d.LANES)

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual,
             scale=None) -> "relax.Expr":
        from tvm import relax

        flags = dict(bias=bias is not None, act=act, residual=residual is not None)
        func = build_tuned(conv2d.NAME, kshape, **flags)
        gv = bb.add_func(func, conv2d.NAME)
        call_args = [args[0], _weight(bb, packed, scale)] + (
            [relax.const(bias)] if bias is not None else []) + (
            [residual] if residual is not None else [])
        return relax.call_tir(gv, call_args, relax.TensorType(out, dtype))

    macs = out[0] * out[1] * out[2] * out[3] * shape.ic * shape.kh * shape.kw
    info = _conv_info(shape, xs, w, out, "width_vectorized" if wplan else "oc_blocked")
    plans = [(Plan(conv2d.NAME, emit, info=info, shape=kshape,
                   operands={"conv": shape, "weight": w, "out": out}), {"macs": macs})]
    if amx.available():
        plans.append(_amx_conv(shape, w, dtype, xs, out))
    if ((shape.kh, shape.kw, shape.stride, shape.dilation) == (1, 1, (1, 1), (1, 1))
            and not any(shape.padding)):
        for sparse in (False, True):
            found = _pointwise(shape, w, dtype, out, sparse)
            if found is not None:
                plan, work = found
                plan.info = {**info, "shape": {**info["shape"], "variant": "pointwise"},
                             **plan.info}
                plans.append((plan, {"macs": work}))
    return plans


def _match_dynamic_conv(a: _Analysis, call: "relax.Call") -> list[tuple[Plan, dict]] | None:
    """A conv (groups 1, NCHW) whose batch is known only at run time, the rest static (a
    model compiled with a dynamic batch): the static case's kernel (``conv2d_nchw_packed``,
    ``depthwise_nchw`` or ``grouped_conv2d_nchw``) built with a symbolic N, its weight packed
    here. Not fused with its neighbours (the fused kernels are planned per image)."""
    import numpy as np
    from tvm import relax, tirx

    x, w_expr = call.args
    at = call.attrs
    w = a.const(w_expr)
    xs, out = _shape_exprs(x), _shape_exprs(call)
    if w is None or w.ndim != 4 or xs is None or out is None or len(xs) != 4 or len(out) != 4:
        return None
    if not all(isinstance(d, tirx.IntImm) for d in (*xs[1:], *out[1:])) or _dims(
            x)[0] != _dims(call)[0]:
        return None
    if ((str(at.data_layout), str(at.kernel_layout)) != ("NCHW", "OIHW")
            or str(at.out_layout) not in ("NCHW", "")):
        return None
    groups = int(at.groups)
    dtype = _dtype(x)
    if dtype not in SUPPORTED_DTYPES or str(w.dtype) != dtype or _dtype(call) != dtype:
        return None
    c, h, wd = (int(d) for d in xs[1:])
    shape = conv2d.ConvShape(
        n=1, ic=c, h=h, w=wd, oc=w.shape[0], kh=w.shape[2], kw=w.shape[3],
        stride=tuple(int(s) for s in at.strides), padding=_pads(at),
        dilation=tuple(int(d) for d in at.dilation))
    if w.shape[1] * groups != c or (shape.oc,) + shape.out_hw != tuple(int(d) for d in out[1:]):
        return None
    # the kernel of the static case, built with a symbolic N (the tiles are chosen per image)
    dynamic = dataclasses.replace(shape, n=tirx.Var("n", "int64"))
    if depthwise.matches(shape, groups):
        strategy, layout, packed = depthwise.NAME, "depthwise", np.ascontiguousarray(w[:, 0])

        def build(**flags):
            return depthwise.build(dynamic, dtype, **flags)
    elif grouped_conv.matches(shape, groups):
        lanes = grouped_conv.pick_lanes(shape.oc // groups)
        strategy, layout = grouped_conv.NAME, "grouped"
        packed = grouped_conv.pack_weight(w, groups, lanes)

        def build(**flags):
            return grouped_conv.build(dynamic, groups, dtype, **flags)
    elif groups == 1 and ((shape.kh, shape.kw, shape.stride) == (1, 1, (1, 1))
                          and not any(shape.padding)):
        return [_dynamic_pointwise(shape, w, dtype, xs[0], out)]
    elif groups == 1:
        wplan = conv2d.plan_wvec(shape)
        strategy = conv2d.NAME
        layout = "width_vectorized" if wplan else "oc_blocked"
        packed = conv2d.pack_weight(w, wplan.oct if wplan else conv2d.LANES)

        def build(**flags):
            if wplan:
                return conv2d.build_wvec(dynamic, wplan, dtype, **flags)
            return conv2d.build_dynamic_batch(shape, dtype, **flags)
    else:
        return None

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        func = build(bias=bias is not None, act=act, residual=residual is not None)
        gv = bb.add_func(func, strategy)
        call_args = [args[0], relax.const(packed)] + (
            [relax.const(bias)] if bias is not None else []) + (
            [residual] if residual is not None else [])
        return relax.call_tir(gv, call_args, relax.TensorType(out, dtype))

    info = _conv_info(shape, [_shown(d) for d in xs], w, [_shown(d) for d in out], layout)
    info["rows"] = "run time"
    if groups > 1:
        info["shape"]["groups"] = groups
    macs = shape.oc * shape.out_hw[0] * shape.out_hw[1] * (c // groups) * shape.kh * shape.kw
    return [(Plan(strategy, emit, info=info, shape={"dynamic": True}), {"macs": macs})]


def _dynamic_pointwise(shape: conv2d.ConvShape, w: "np.ndarray", dtype: str, n: Any,
                       out: tuple) -> tuple[Plan, dict]:
    """``conv1x1_nchw`` for a pointwise conv with a run-time batch ``n`` (a PrimExpr): the
    static kernel with a symbolic N, X viewed as ``[N, CI, H*W]``."""
    from tvm import relax, tirx

    ci, co, p = shape.ic, shape.oc, shape.h * shape.w
    tile = pointwise.pick_tile(co, p)
    pp = tile.padded_pixels(p)
    packed = pointwise.pack_weight(w[:, :, 0, 0], tile.oct)

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        func = pointwise.build(tirx.Var("n", "int64"), ci, p, co, tile, dtype,
                               bias=bias is not None, act=act, residual=residual is not None)
        gv = bb.add_func(func, pointwise.NAME)
        x = bb.emit(relax.op.reshape(args[0], (n, ci, p)))
        if pp != p:
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, 0, pp - p]))
        call_args = [x, relax.const(packed)] + (
            [relax.const(bias)] if bias is not None else []) + (
            [bb.emit(relax.op.reshape(residual, (n, co, p)))] if residual is not None else [])
        y = bb.emit(relax.call_tir(gv, call_args, relax.TensorType((n, co, p), dtype)))
        return relax.op.reshape(y, out)

    info = _conv_info(shape, [_shown(n), ci, shape.h, shape.w], w, [_shown(d) for d in out],
                      "pointwise")
    info.update(rows="run time", tile=f"{tile.oct}x{tile.pixels}")
    macs = co * p * ci
    return Plan(pointwise.NAME, emit, info=info, shape={"dynamic": True}), {"macs": macs}


def _amx_conv(shape: conv2d.ConvShape, w: "np.ndarray", dtype: str, xs: tuple, out: tuple
              ) -> tuple[Plan, dict]:
    """The ``conv2d_amx_bf16`` plan: the conv as an im2col GEMM on AMX tiles (bf16)."""
    kshape = {**dataclasses.asdict(shape), "dtype": dtype}

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        from tvm import relax

        knobs = knobs_for(amx.CONV_NAME, kshape) or {}
        p = amx.conv_plan(shape, knobs.get("mt"), knobs.get("nt"))
        func = build_tuned(amx.CONV_NAME, kshape, bias=bias is not None, act=act,
                                  residual=residual is not None)
        gv = bb.add_func(func, amx.CONV_NAME)
        call_args = [args[0], relax.const(amx.pack_conv_weight(w, p))] + (
            [relax.const(bias)] if bias is not None else []) + (
            [residual] if residual is not None else [])
        return relax.call_tir(gv, call_args, relax.TensorType(out, dtype))

    p = amx.conv_plan(shape)
    info = _conv_info(shape, xs, w, out, "im2col")
    info.update(amx.report(p))
    return (Plan(amx.CONV_NAME, emit, info=info, shape=kshape),
            {"macs": shape.n * p.mp * p.kp * p.np_})


def _conv_info(shape: conv2d.ConvShape, xs: tuple, w: "np.ndarray", out: tuple, variant: str
               ) -> dict:
    """The compile report's description of a conv kernel decision."""
    return {"op": "conv2d", "shape": {"in": list(xs), "weight": list(w.shape), "out": list(out),
                                      "stride": list(shape.stride), "pad": list(shape.padding),
                                      "variant": variant}}


def _depthwise(shape: conv2d.ConvShape, w: "np.ndarray", dtype: str, xs: tuple, out: tuple
               ) -> tuple[Plan, dict]:
    """The ``depthwise_nchw`` plan of a conv with one 1-channel filter per channel."""
    import numpy as np

    weight = np.ascontiguousarray(w[:, 0])   # [C, KH, KW]
    kshape = {**dataclasses.asdict(shape), "dtype": dtype}

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        from tvm import relax

        func = build_tuned(depthwise.NAME, kshape, bias=bias is not None, act=act,
                                  residual=residual is not None)
        gv = bb.add_func(func, depthwise.NAME)
        call_args = [args[0], relax.const(weight)] + (
            [relax.const(bias)] if bias is not None else []) + (
            [residual] if residual is not None else [])
        return relax.call_tir(gv, call_args, relax.TensorType(out, dtype))

    p = depthwise.plan(*shape.out_hw)
    info = _conv_info(shape, xs, w, out, "depthwise")
    info["shape"]["tile"] = f"{p.rows}x{p.vecs * p.lanes}"
    macs = out[0] * out[1] * out[2] * out[3] * shape.kh * shape.kw
    return Plan(depthwise.NAME, emit, info=info, shape=kshape,
                operands={"conv": shape, "weight": weight, "out": out}), {"macs": macs}


def _grouped(shape: conv2d.ConvShape, groups: int, w: "np.ndarray", dtype: str, xs: tuple,
             out: tuple) -> tuple[Plan, dict]:
    """The ``grouped_conv2d_nchw`` plan of a grouped conv (not depthwise-multiplier-1)."""
    kshape = {**dataclasses.asdict(shape), "groups": groups, "dtype": dtype}

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        from tvm import relax

        lanes = grouped_conv.pick_lanes(shape.oc // groups)
        func = build_tuned(grouped_conv.NAME, kshape, bias=bias is not None, act=act,
                                  residual=residual is not None)
        gv = bb.add_func(func, grouped_conv.NAME)
        call_args = [args[0], relax.const(grouped_conv.pack_weight(w, groups, lanes))] + (
            [relax.const(bias)] if bias is not None else []) + (
            [residual] if residual is not None else [])
        return relax.call_tir(gv, call_args, relax.TensorType(out, dtype))

    info = _conv_info(shape, xs, w, out, "grouped")
    info["shape"]["groups"] = groups
    macs = out[0] * out[1] * out[2] * out[3] * (shape.ic // groups) * shape.kh * shape.kw
    return Plan(grouped_conv.NAME, emit, info=info, shape=kshape), {"macs": macs}


def _pointwise(shape: conv2d.ConvShape, w: "np.ndarray", dtype: str, out: tuple,
               sparse: bool) -> tuple[Plan, int] | None:
    """The ``conv1x1_nchw`` plan of a pointwise conv (``sparse``: the ``bsr_conv1x1`` plan,
    None when every weight panel reads every input channel), with the MACs it does
    (padding included)."""
    import numpy as np

    n, ci, co, p = shape.n, shape.ic, shape.oc, shape.h * shape.w
    if sparse:
        default = tile = bsr.conv_tile(p)
        w_kn = np.ascontiguousarray(w[:, :, 0, 0].T)
        rows = bsr.padded_rows(w_kn, tile.oct)
        if rows >= ci:
            return None
        name, info = bsr.CONV_NAME, {"rows_kept": rows}
        kshape = {"n": n, "ci": ci, "p": p, "co": co, "rows": rows, "dtype": dtype}
    else:
        kshape = {"n": n, "ci": ci, "p": p, "co": co, "dtype": dtype}
        # the strategy choice uses the default tile; a tuned one only changes the kernel
        default = pointwise.pick_tile(co, p)
        knobs = knobs_for(pointwise.NAME, kshape)
        tile = pointwise.Tile(*knobs["tile"]) if knobs else default
        rows, name, info = ci, pointwise.NAME, {}
    pp = tile.padded_pixels(p)
    info["tile"] = f"{tile.oct}x{tile.pixels}"

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual,
             scale=None) -> "relax.Expr":
        from tvm import relax

        flags = dict(bias=bias is not None, act=act, residual=residual is not None)
        if sparse:
            idx, data = bsr.pack_weight(w_kn, tile.oct)
            weights = [relax.const(idx), relax.const(data)]
            func = build_tuned(name, kshape, **flags)
        else:
            weights = [_weight(bb, pointwise.pack_weight(w[:, :, 0, 0], tile.oct), scale)]
            func = build_kernel(name, kshape, {"tile": [tile.oct, tile.pixels]}, **flags)
        gv = bb.add_func(func, name)
        x = bb.emit(relax.op.reshape(args[0], (n, ci, p)))
        if pp != p:   # whole pixel vectors: zero columns, cut again at the write-back
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, 0, pp - p]))
        call_args = [x, *weights]
        if bias is not None:
            call_args.append(relax.const(bias))
        if residual is not None:
            call_args.append(bb.emit(relax.op.reshape(residual, (n, co, p))))
        y = bb.emit(relax.call_tir(gv, call_args, relax.TensorType((n, co, p), dtype)))
        return relax.op.reshape(y, out)

    work = n * default.padded_pixels(p) * rows * (-(-co // default.oct)) * default.oct
    operands = {"weight": np.ascontiguousarray(w[:, :, 0, 0]), "out": out, "sparse": sparse}
    return Plan(name, emit, info=info, shape=kshape, operands=operands), work


def _weight(bb: "relax.BlockBuilder", packed: "np.ndarray", scale=None) -> "relax.Expr":
    """A kernel's packed weight (input channels on axis 1): the constant, or with ``scale``
    (a per-input-channel gate, ``Plan.input_scale``) the constant times the gate, computed
    each call."""
    from tvm import relax

    if scale is None:
        return relax.const(packed)
    gate = bb.emit(relax.op.reshape(scale, [1, packed.shape[1]] + [1] * (packed.ndim - 2)))
    return bb.emit(relax.op.multiply(relax.const(packed), gate))


#: kernels whose packed weight holds the input channels on axis 1, unpermuted: a gate on
#: their input can scale the weight instead (:func:`_fold_gates`)
GATE_FOLDABLE = (conv2d.NAME, pointwise.NAME)


def _fold_gates(a: _Analysis, plans: dict, decision_of: dict) -> None:
    """Squeeze-and-excitation: ``y = x * gate`` (``gate`` [1, C, 1, 1], one image), read
    only by planned convs that take it as their input. Each of those convs reads ``x`` and
    multiplies its packed weight by the gate instead, so the gated activation, the block's
    largest, is never written and read back (the mixed CNN's SE product on 96 x 80 x 80 took
    68 us of a 3.17 ms call; with the weights scaled instead the call takes 3.04 ms). Only
    where the convs' weights, scaled each call, are smaller than the activation."""
    from tvm import relax

    for var in a.order:
        call = a.bindings[var]
        if not (isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.multiply"):
            continue
        users = a.users.get(var, [])
        if not users or a.uses.get(var, 0) != len(users):    # a graph output too
            continue
        shapes = [_static_shape(arg) for arg in call.args]
        if any(sh is None for sh in shapes) or _dtype(var) not in SUPPORTED_DTYPES:
            continue
        for x, gate, xs, gs in ((*call.args, *shapes), (*call.args[::-1], *shapes[::-1])):
            if (len(xs) == 4 and xs[0] == 1 and xs[2] * xs[3] > 1
                    and gs in ((1, xs[1], 1, 1), (xs[1], 1, 1))):
                break
        else:
            continue
        readers = [(u, plans.get(u)) for u in users]
        if not all(p is not None and p.strategy in GATE_FOLDABLE and p.inputs is None
                   and p.input_scale is None and a.bindings[u].args[0].same_as(var)
                   and not a.bindings[u].args[1].same_as(var) for u, p in readers):
            continue
        weights = sum(p.shape["oc"] * p.shape["ic"] * p.shape["kh"] * p.shape["kw"]
                      if p.strategy == conv2d.NAME else p.shape["co"] * p.shape["ci"]
                      for _, p in readers)
        if weights >= xs[1] * xs[2] * xs[3]:
            continue
        for u, p in readers:
            p.inputs, p.input_scale = [x], gate
            if u in decision_of:
                decision_of[u]["input_gate"] = "folded into the weights"


def _match_cuda_linear(a: _Analysis, call: "relax.Call") -> list[tuple[Plan, dict]] | None:
    """A matmul by a constant W on CUDA: a sparse kernel where W's zeros pay
    (:func:`_match_sparse_cuda`), else ``mma_cuda`` on tensor cores in the compile's precision
    (:func:`_match_mma`); None leaves it to DLight's fp32 schedule."""
    lin = _linear(a, call)
    if lin is None:
        return _match_mma_batch(a, call)
    return _match_sparse_cuda(a, lin) or _match_mma(a, lin)


def _cuda_arch() -> int | None:
    """The compute capability of the CUDA target being compiled for (80 for sm_80), or None."""
    import re

    import tvm

    target = tvm.target.Target.current(allow_none=True)
    arch = re.fullmatch(r"sm_(\d+)[af]?", str(target.attrs.get("arch", ""))) if target else None
    return None if arch is None else int(arch.group(1))


def _match_mma(a: _Analysis, lin: _Linear) -> list[tuple[Plan, dict]] | None:
    """``mma_cuda`` (kernels/mma.py) for a linear layer when the compile's precision is tf32
    or bf16 and the GPU has their tensor-core instructions (sm_80+)."""
    def call(bb: "relax.BlockBuilder", func: "tirx.PrimFunc", args: list, wa, bias, residual
             ) -> "relax.Expr":
        return lin.emit(bb, func, mma.NAME, args, [wa], bias, residual)

    info = {"op": "matmul", "shape": {"M": lin.m, "K": lin.k, "N": lin.n}}
    return _mma_plan(lin.m, lin.k, lin.n, lin.dtype, lin.w, info, call)


def _match_cuda_conv(a: _Analysis, call: "relax.Call") -> list[tuple[Plan, dict]] | None:
    """``mma_cuda`` for a groups-1 NCHW conv by a constant W, as an implicit GEMM (output
    pixels x filter taps x output channels; kernels/mma.py); depthwise and grouped convs stay
    on DLight's schedules."""
    from tvm import relax

    found = _static_conv(a, call)
    if found is None or found[1] != 1:
        return None
    shape, _, w, xs, out = found
    m, k, n = mma.conv_gemm(shape)

    def emit(bb: "relax.BlockBuilder", func: "tirx.PrimFunc", args: list, wa, bias, residual
             ) -> "relax.Expr":
        gv = bb.add_func(func, mma.NAME)
        call_args = [args[0], wa] + ([relax.const(bias)] if bias is not None else []) + (
            [residual] if residual is not None else [])
        return relax.call_tir(gv, call_args, relax.TensorType(out, _dtype(call)))

    info = _conv_info(shape, xs, w, out, "implicit_gemm")
    info["shape"]["gemm"] = {"M": m, "K": k, "N": n}
    return _mma_plan(m, k, n, _dtype(call), w.reshape(n, k).T, info, emit, shape)


def _mma_precision() -> str | None:
    """The precision ``mma_cuda`` runs in for this compile: tf32 or bf16 on sm_80+, else None
    (fp32, or a GPU without those tensor-core instructions)."""
    precision = current_precision()
    arch = _cuda_arch()
    if precision not in mma.PRECISIONS or arch is None or arch < mma.MIN_ARCH:
        return None
    return precision


def _match_mma_batch(a: _Analysis, call: "relax.Call") -> list[tuple[Plan, dict]] | None:
    """``mma_cuda`` for a matmul of two run-time tensors ``[..., M, K] @ [..., K, N]`` with the
    same batch dims (attention's Q @ K^T and P @ V), both operands rounded in the kernel; a
    second operand that is a transpose of its last two axes (K^T) is read in place, and the
    transpose is gone."""
    import math

    from tvm import relax

    x, y = call.args
    xs, ys, out = _static_shape(x), _static_shape(y), _static_shape(call)
    precision = _mma_precision()
    if (precision is None or xs is None or ys is None or out is None or len(xs) != len(ys)
            or len(xs) < 2 or a.const(x) is not None or a.const(y) is not None):
        return None
    if xs[:-2] != ys[:-2] or xs[-1] != ys[-2] or out != xs[:-1] + ys[-1:]:
        return None
    dtype = _dtype(x)
    if dtype not in SUPPORTED_DTYPES or _dtype(y) != dtype or _dtype(call) != dtype:
        return None
    (m, k), n = xs[-2:], ys[-1]
    batch = math.prod(xs[:-2])
    yt = _transposed_operand(a, y)
    p = mma.plan(m, k, n, precision, batch)

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        func = mma.build(m, k, n, precision, dtype, bias=bias is not None, act=act,
                         residual=residual is not None, batch=batch,
                         b_transposed=yt is not None)
        kshape = {"batch": batch, "m": m, "k": k, "n": n, "dtype": dtype}
        return _call_batched(bb, bb.add_func(func, mma.NAME), kshape, args, bias, residual,
                             xs, out, yt is not None)

    info = {"op": "matmul", "shape": {"batch": batch, "M": m, "K": k, "N": n},
            **({"b_transposed": True} if yt is not None else {}),
            "precision": precision, "tensor_cores": mma.INSTRUCTION[precision],
            "warp_tile": f"{p.mt * mma.TILE_M} channels x {p.nt * mma.TILE_N} tokens",
            "grid": [*p.grid, batch], "split_k": 1}
    plan = Plan(mma.NAME, emit, info=info, inputs=None if yt is None else [x, yt],
                shape={"batch": batch, "m": m, "k": k, "n": n, "precision": precision,
                       "dtype": dtype, "b_transposed": yt is not None})
    return [(plan, {"macs": batch * p.mp * p.kp * p.np_})]


def _mma_plan(m: int, k: int, n: int, dtype: str, w_kn: "np.ndarray", info: dict,
              call: Callable, conv: conv2d.ConvShape | None = None
              ) -> list[tuple[Plan, dict]] | None:
    """The ``mma_cuda`` plan of an [M, K] x [K, N] GEMM by the constant ``w_kn`` (``call``
    emits the kernel's call from ``(bb, func, args, packed W, bias, residual)``), when the
    compile's precision is tf32 or bf16 and the GPU is sm_80+; else None."""
    precision = _mma_precision()
    if precision is None:
        return None
    p = mma.plan(m, k, n, precision)

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        from tvm import relax

        func = mma.build(m, k, n, precision, dtype, bias=bias is not None, act=act,
                         residual=residual is not None, conv=conv)
        return call(bb, func, args, relax.const(mma.pack_weight(w_kn, p)), bias, residual)

    info = {**info, "precision": precision, "tensor_cores": mma.INSTRUCTION[precision],
            "warp_tile": f"{p.mt * mma.TILE_M} channels x {p.nt * mma.TILE_N} tokens",
            "grid": [*p.grid, p.splits], "split_k": p.splits,
            "weight_bytes": {"dense": int(w_kn.nbytes), "packed": mma.weight_bytes(p)}}
    plan = Plan(mma.NAME, emit, info=info,
                shape={"m": m, "k": k, "n": n, "precision": precision, "dtype": dtype,
                       **({"conv": dataclasses.asdict(conv)} if conv is not None else {})})
    return [(plan, {"macs": p.mp * p.kp * p.np_})]


def _match_sparse_cuda(a: _Analysis, lin: _Linear) -> list[tuple[Plan, dict]] | None:
    """``nm_sparse_cuda`` for a matmul by a constant sparse W with few rows, when the
    compressed weight is at most 3/4 of the dense bytes (kernels/sparse_cuda.py); with more
    rows, ``mma_sp_cuda`` for a 2:4 W on sm_80+ (kernels/mma_sp.py)."""
    if lin.m > sparse_cuda.MAX_ROWS:
        return _match_mma_sp(a, lin)
    w, m, k, n, dtype = lin.w, lin.m, lin.k, lin.n, lin.dtype
    fmt = sparse_cuda.plan(w)
    dense_bytes = w.size * w.itemsize
    if sparse_cuda.weight_bytes(fmt, n, w.itemsize) * 4 > dense_bytes * 3:
        return None

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        from tvm import relax

        vals, offs = sparse_cuda.pack_weight(w, fmt)
        func = sparse_cuda.build(m, k, n, fmt, dtype, bias=bias is not None, act=act,
                                 residual=residual is not None)
        return lin.emit(bb, func, sparse_cuda.NAME, args, [relax.const(vals),
                                                            relax.const(offs)], bias, residual)

    pattern = f"{fmt.per_group}:{fmt.group}" if fmt.group else "unstructured"
    info = {"op": "matmul", "shape": {"M": m, "K": k, "N": n}, "pattern": pattern,
            "kept_per_channel": fmt.kept,
            "weight_bytes": {"dense": int(dense_bytes),
                             "sparse": sparse_cuda.weight_bytes(fmt, n, w.itemsize)}}
    plan = Plan(sparse_cuda.NAME, emit, info=info,
                shape={"m": m, "k": k, "n": n, "kept": fmt.kept, "dtype": dtype})
    return [(plan, {"macs": m * fmt.kept * n})]


def _match_mma_sp(a: _Analysis, lin: _Linear) -> list[tuple[Plan, dict]] | None:
    """``mma_sp_cuda`` for ``lin`` when W is 2:4 along K, the GPU has sparse tensor cores
    (sm_80+) and the compile allows bf16 (else a hint that it would)."""
    arch = _cuda_arch()
    if arch is None or arch < mma_sp.MIN_ARCH or not mma_sp.is_2_4(lin.w):
        return None
    if not bf16_allowed():      # lossy: with --precision bf16 only
        a.hint = "2:4 weight: --precision bf16 runs it on sparse tensor cores (mma_sp_cuda)"
        return None
    m, k, n, dtype = lin.m, lin.k, lin.n, lin.dtype
    p = mma_sp.plan(m, k, n)

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        from tvm import relax

        wa, we = mma_sp.pack_weight(lin.w, p)
        func = mma_sp.build(m, k, n, dtype, bias=bias is not None, act=act,
                            residual=residual is not None)
        return lin.emit(bb, func, mma_sp.NAME, args, [relax.const(wa), relax.const(we)], bias,
                        residual)

    dense_bytes = k * n * lin.w.itemsize
    info = {"op": "matmul", "shape": {"M": m, "K": k, "N": n}, "pattern": "2:4",
            "precision": "bf16", "tensor_cores": mma_sp.INSTRUCTION,
            "warp_tile": f"{p.mt * mma_sp.TILE_M} channels x {p.nt * mma_sp.TILE_N} tokens",
            "grid": list(p.grid),
            "weight_bytes": {"dense": int(dense_bytes), "sparse": mma_sp.weight_bytes(p)}}
    plan = Plan(mma_sp.NAME, emit, info=info, shape={"m": m, "k": k, "n": n, "dtype": dtype})
    return [(plan, {"macs": p.mp * p.kp * p.np_ // 2})]


def _match_softmax(a: _Analysis, call: "relax.Call") -> list[tuple[Plan, dict]] | None:
    """``softmax_rows`` for a softmax over the last axis of rows that are not whole 16-lane
    vectors (the generic row schedule vectorizes the others)."""
    x = call.args[0]
    xs = _static_shape(x)
    if xs is None:
        return _match_dynamic_softmax(call)
    if not xs or _dtype(x) != "float32" or _dtype(call) != "float32":
        return None
    if int(call.attrs.axis) not in (-1, len(xs) - 1) or not softmax.matches(xs[-1]):
        return None
    n = xs[-1]
    rows = 1
    for d in xs[:-1]:
        rows *= d
    kshape = {"rows": rows, "n": n, "dtype": "float32"}

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        from tvm import relax

        gv = bb.add_func(build_kernel(softmax.NAME, kshape), softmax.NAME)
        x2 = bb.emit(relax.op.reshape(args[0], (rows, n)))
        y2 = bb.emit(relax.call_tir(gv, [x2], relax.TensorType((rows, n), "float32")))
        return relax.op.reshape(y2, xs)

    info = {"op": "softmax", "shape": {"rows": rows, "N": n}}
    return [(Plan(softmax.NAME, emit, info=info, shape=kshape, epilogue=False),
             {"macs": rows * n})]


def _match_dynamic_softmax(call: "relax.Call") -> list[tuple[Plan, dict]] | None:
    """``softmax_rows`` with run-time rows and row length (``softmax.build_dynamic``) for a
    softmax over a symbolic last axis: attention's over the sequence in a dynamic model (the
    generic row schedule cannot vectorize a row of unknown length)."""
    from tvm import relax, tirx

    x = call.args[0]
    xs = _shape_exprs(x)
    if (xs is None or _dtype(x) != "float32" or _dtype(call) != "float32"
            or int(call.attrs.axis) not in (-1, len(xs) - 1)
            or isinstance(xs[-1], tirx.IntImm)):
        return None
    rows = xs[0]
    for d in xs[1:-1]:
        rows = rows * d
    n = xs[-1]

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        gv = bb.add_func(softmax.build_dynamic(), softmax.NAME)
        x2 = bb.emit(relax.op.reshape(args[0], (rows, n)))
        y2 = bb.emit(relax.call_tir(gv, [x2], relax.TensorType((rows, n), "float32")))
        return relax.op.reshape(y2, xs)

    info = {"op": "softmax", "shape": {"rows": _shown(rows), "N": _shown(n)},
            "rows": "run time"}
    return [(Plan(softmax.NAME, emit, info=info, shape={"dynamic": True}, epilogue=False),
             {"macs": 1024})]


def _match_pool(a: _Analysis, call: "relax.Call") -> list[tuple[Plan, dict]] | None:
    """``pool2d_nchw`` (``depthwise.build`` without weights) for an NCHW float32 max or
    average pool of static shape: ceil mode as extra bottom/right padding (a max pool's
    padding never wins; an average pool's is not counted, so one that counts its padding
    goes to the generic schedule when ceil mode adds windows); average pooling not dilated."""
    x = call.args[0]
    xs, out = _static_shape(x), _static_shape(call)
    at = call.attrs
    if (xs is None or out is None or len(xs) != 4 or _dtype(x) != "float32"
            or _dtype(call) != "float32" or str(at.layout) != "NCHW"
            or str(at.out_layout) != "NCHW"):
        return None
    pool = "max" if call.op.name == "relax.nn.max_pool2d" else "avg"
    kh, kw = (int(k) for k in at.pool_size)
    sh, sw = (int(v) for v in at.strides)
    dh, dw = (int(v) for v in at.dilation)
    pt, pl, pb0, pr0 = _pads(at)
    n, c, h, w = xs
    oh, ow = out[2], out[3]
    if kh > h + pt + pb0 or kw > w + pl + pr0:   # a window wider than the padded map
        return None
    # ceil mode: pad the bottom / right so that the floor formula gives the output's size
    pb = max(pb0, (oh - 1) * sh + (kh - 1) * dh + 1 - h - pt)
    pr = max(pr0, (ow - 1) * sw + (kw - 1) * dw + 1 - w - pl)
    shape = conv2d.ConvShape(n, c, h, w, c, kh, kw, (sh, sw), (pt, pl, pb, pr), (dh, dw))
    count_pad = bool(at.count_include_pad)
    if shape.out_hw != (oh, ow) or (pool == "avg" and (
            (dh, dw) != (1, 1) or (count_pad and (pb, pr) != (pb0, pr0)))):
        return None
    kshape = {**dataclasses.asdict(shape), "pool": pool, "count_include_pad": count_pad,
              "dtype": "float32"}

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        from tvm import relax

        gv = bb.add_func(build_kernel(depthwise.POOL_NAME, kshape), depthwise.POOL_NAME)
        return relax.call_tir(gv, [args[0]], relax.TensorType(out, "float32"))

    info = {"op": f"{pool}_pool2d", "shape": {"x": list(xs), "window": [kh, kw],
                                              "stride": [sh, sw], "pad": [pt, pl, pb, pr]}}
    return [(Plan(depthwise.POOL_NAME, emit, info=info, shape=kshape, epilogue=False),
             {"macs": n * c * oh * ow * kh * kw})]


_MATCHERS = {"relax.matmul": _match_dense, "relax.nn.conv2d": _match_conv,
             "relax.nn.softmax": _match_softmax, "relax.nn.max_pool2d": _match_pool,
             "relax.nn.avg_pool2d": _match_pool}
#: the heavy ops with a sparsec kernel per device (the rest go to the device's generic rules)
MATCHERS_BY_DEVICE = {"cpu": _MATCHERS, "cuda": {"relax.matmul": _match_cuda_linear,
                                                  "relax.nn.conv2d": _match_cuda_conv}}


def _channel_bias(a: _Analysis, heavy_var: Any, add_call: "relax.Call", channel_axis: int
                  ) -> "np.ndarray | None":
    """The per-output-channel bias vector if ``add_call`` is ``heavy + const`` that keeps the
    heavy op's shape, else None."""
    lhs, rhs = add_call.args
    other = rhs if lhs.same_as(heavy_var) else lhs if rhs.same_as(heavy_var) else None
    if other is None:
        return None
    c = a.const(other)
    out = _dims(heavy_var)
    if c is None or out is None or _dims(add_call) != out or str(c.dtype) != _dtype(
            heavy_var):
        return None
    rank = len(out)
    axis = channel_axis % rank
    if not isinstance(out[axis], int):
        return None
    if c.ndim > rank:
        return None
    full = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(full) if i != axis) or full[axis] not in (1, out[axis]):
        return None
    vec = c.reshape(-1)
    if vec.size == 1:
        import numpy as np

        vec = np.full((out[axis],), vec[0], dtype=c.dtype)
    return vec


def _residual(a: _Analysis, heavy_var: Any, tail: Any, add_call: "relax.Call",
              params: set) -> Any:
    """The other operand of ``add_call`` when it is ``tail + r`` with ``r`` a non-constant tensor
    of ``tail``'s shape (the heavy op's, or a reshape of it) that already exists where the heavy
    op is computed, else None."""
    lhs, rhs = add_call.args
    other = rhs if lhs.same_as(tail) else lhs if rhs.same_as(tail) else None
    if other is None or other.same_as(tail) or a.const(other) is not None:
        return None
    out = _dims(tail)
    if out is None or _dims(other) != out or _dims(add_call) != out or _dtype(
            other) != _dtype(heavy_var):
        return None
    if other in params:
        return other
    if other in a.bindings and a.order.index(other) < a.order.index(heavy_var):
        return other
    return None


def _clip_bound(a: _Analysis, mod: "ir.IRModule | None", tail: Any) -> tuple[Any, int, float
                                                                           ] | None:
    """``(binding var, side, bound)`` when ``tail``'s only user is ``call_tir(f, (tail, c))``
    with ``f`` exactly the importer's lower (side 0) or upper (side 1) bound and ``c`` a
    scalar constant: ONNX Clip (ReLU6, hardtanh) as ``backend.import_onnx`` imports it. ``f``
    is compared structurally with the PrimFunc ``common.clip_bound`` builds for that shape,
    not trusted by its name."""
    import tvm_ffi
    from tvm import relax, te

    from sparsec.targets.kernels.common import clip_bound

    nxt = a.single_user(tail)
    if nxt is None or mod is None:
        return None
    var, call = nxt
    if not (isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.call_tir"):
        return None
    gv, args = call.args[0], call.args[1]
    if not isinstance(args, relax.Tuple) or len(args.fields) != 2:
        return None
    if not args.fields[0].same_as(tail) or gv not in mod.get_global_vars():
        return None
    bound = a.const(args.fields[1])
    ty = getattr(tail, "ty", None)
    if bound is None or bound.shape != () or not isinstance(ty, relax.TensorType):
        return None
    func = mod[gv]
    for side in (0, 1):
        x = te.placeholder(ty.shape.values, str(ty.dtype))
        c = te.placeholder((), str(ty.dtype))
        # as the importer's emit_te builds it (int64 indices throughout)
        ref = te.create_prim_func([x, c, clip_bound(x, c, side)], index_dtype_override="int64"
                                  ).without_attr("global_symbol")
        if tvm_ffi.structural_equal(func, ref, map_free_vars=True):
            return var, side, float(bound)
    return None


def _op_macs(call: "relax.Call") -> int:
    """Multiply-adds of a matmul or conv2d from its static shapes (0 when unknown)."""
    import math

    out = _static_shape(call)
    if out is None:
        return 0
    if call.op.name == "relax.matmul":
        x = _static_shape(call.args[0])
        return math.prod(out) * x[-1] if x else 0
    if call.op.name == "relax.nn.conv2d":
        w = _static_shape(call.args[1])
        return math.prod(out) * math.prod(w[1:]) if w else 0
    return 0


def _op_facts(call: "relax.Call", macs: int, device: str) -> dict:
    """What the compile report says of a heavy op none of sparsec's kernels took: its operand
    and output shapes, dtype, MACs, and the schedule that runs it instead."""
    shapes = [list(s) if (s := _static_shape(x)) is not None else None for x in call.args]
    out = _static_shape(call)
    return {"shapes": shapes, "out_shape": list(out) if out is not None else None,
            "dtype": _dtype(call), "macs": int(macs),
            "kernel": ("dlight: DLight's GPU rules (compile.kernels counts each rule)"
                       if device == "cuda" else
                       "fallback: legalized, fused and given the generic schedule")}


def plan_function(func: "relax.Function", cores: int, mod: "ir.IRModule | None" = None,
                  device: str = "cpu") -> tuple[dict, dict, list[dict]]:
    """Choose a strategy for each heavy op; returns (plans by var, aliases, decisions).
    ``mod`` holds the PrimFuncs the function calls (to recognise Clip); ``device`` selects
    the kernels (``MATCHERS_BY_DEVICE``)."""
    from tvm import relax

    matchers = MATCHERS_BY_DEVICE[device]
    a = _Analysis(func)
    params = set(func.params)
    plans: dict[Any, Plan] = {}
    aliases: dict[Any, Any] = {}
    decisions: list[dict] = []
    decision_of: dict[Any, dict] = {}
    for var in a.order:
        call = a.bindings[var]
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm_op_type()):
            continue
        matcher = matchers.get(call.op.name)
        if matcher is None:
            continue
        a.hint = None
        try:
            matched = matcher(a, call)
        except Exception:  # noqa: BLE001 - odd attrs: let the generic path handle it
            matched = None
        found = {} if matched is None else {p.strategy: (p, c) for p, c in (
            matched if isinstance(matched, list) else [matched])}
        macs = max((c["macs"] for _, c in found.values()), default=_op_macs(call))
        name, why = kernels.choose(call.op.name, macs, cores,
                                   {s: c["macs"] for s, (_, c) in found.items()})
        decision = {"op": call.op.name.removeprefix("relax."), **why}
        if a.hint:
            decision["hint"] = a.hint
        if name not in found:      # no kernel of ours: say what the op is and who runs it
            decision.update(_op_facts(call, macs, device))
        alternatives = [(s, p.shape) for s, (p, _) in found.items()]
        measured = measured_choice(alternatives) if len(alternatives) > 1 else None
        if measured in found:
            name = decision["chosen"] = measured     # timed on this machine: over the estimate
            decision["chosen_by"] = "measurement"
        if name not in found:
            decisions.append(decision)
            continue
        plan = found[name][0]
        decision.update(plan.info)
        if (knobs := knobs_for(plan.strategy, plan.shape)) is not None:
            decision["tuned"] = knobs
        plans[var] = plan
        if not plan.epilogue:
            decisions.append(decision)
            decision_of[var] = decision
            continue
        # epilogue: + per-channel bias, + skip connection, then relu and/or clip bounds or
        # gelu, each the single user of the previous value. The skip connection and the
        # activation may come after reshapes of the output (a Linear on a 3-D input is
        # exported as reshape -> Gemm -> reshape): elementwise ops commute with a reshape, so
        # they fold and the reshape stays, applied to the kernel's finished output.
        channel_axis = 1 if plan.info.get("op") == "conv2d" else -1
        tail = anchor = var
        nxt = _single_user_call(a, tail, "relax.add")
        if nxt and (bias := _channel_bias(a, tail, nxt[1], channel_axis)) is not None:
            plan.bias = bias
            aliases[nxt[0]] = anchor
            tail = nxt[0]
        tail, anchor = _past_reshapes(a, tail, anchor)
        nxt = _single_user_call(a, tail, "relax.add")
        if nxt and (res := _residual(a, var, tail, nxt[1], params)) is not None:
            plan.residual = res
            if anchor is not var:       # the add saw the output through reshapes
                plan.residual_shape = _static_shape(var) or _shape_exprs(var)
            aliases[nxt[0]] = anchor
            tail = nxt[0]
        tail, anchor = _past_reshapes(a, tail, anchor)
        lo = hi = None
        nxt = _single_user_call(a, tail, "relax.nn.relu")
        if nxt:
            lo = 0.0
            aliases[nxt[0]] = anchor
            tail = nxt[0]
        # max(., low) then min(., high): the order the epilogue applies them
        for want in (0, 1):
            found_bound = _clip_bound(a, mod, tail)
            if found_bound is None or found_bound[1] != want:
                continue
            bvar, side, bound = found_bound
            if side == 0:
                lo = bound if lo is None else max(lo, bound)
            else:
                hi = bound
            aliases[bvar] = anchor
            tail = bvar
        gelu = False
        if lo is None and hi is None and (nxt := _single_user_call(a, tail, "relax.nn.gelu")):
            gelu = True
            aliases[nxt[0]] = anchor
        silu = False
        if lo is None and hi is None and not gelu and device == "cpu" and (
                sig := _silu_gate(a, tail)) is not None:
            silu = True
            aliases[sig] = anchor
        if lo is not None or hi is not None or gelu or silu:
            plan.act = Activation(lo, hi, gelu, silu)
        decision["epilogue"] = [e for e, on in (("bias", plan.bias is not None),
                                                ("residual", plan.residual is not None))
                                if on] + ([plan.act.name] if plan.act else [])
        decisions.append(decision)
        decision_of[var] = decision
    if device == "cpu":
        _fuse_small_blocks(a, plans, aliases, decision_of)
        _fuse_depthwise_pointwise(a, plans, aliases, decision_of)
        _fuse_pointwise_depthwise(a, plans, aliases, decision_of)
        _fold_gates(a, plans, decision_of)
    return plans, aliases, decisions


def _conv1x1_weight(plan: Plan | None, inner: bool = True) -> "np.ndarray | None":
    """``W[CO, CI]`` of a planned dense 1x1 conv (stride 1, no padding; the pointwise or the
    direct conv kernel), for a fused kernel's ``inner`` stage only where it has a plain
    epilogue; None for any other plan."""
    if (plan is None or plan.input_scale is not None or (inner and not _plain_epilogue(plan))
            or "weight" not in plan.operands):      # a dynamic batch's kernel: no operands
        return None
    if plan.strategy == pointwise.NAME:
        return plan.operands["weight"]
    s = plan.operands.get("conv")
    if plan.strategy != conv2d.NAME or s is None or (
            (s.kh, s.kw, s.stride, s.dilation) != (1, 1, (1, 1), (1, 1)) or any(s.padding)):
        return None
    w = plan.operands["weight"]
    return w.reshape(w.shape[0], w.shape[1])


def _fuse_small_blocks(a: _Analysis, plans: dict, aliases: dict, decision_of: dict) -> None:
    """Replace each planned 1x1 expansion -> depthwise conv -> 1x1 projection chain on a small
    map (each output read by the next alone) with one ``inverted_residual_c16`` kernel
    where :func:`block_c16.worth_fusing` says so; the projection keeps its own epilogue
    (bias, residual, activation). The two inner bindings are left without users: dead code
    elimination drops them."""
    for var, plan in list(plans.items()):
        w_proj = _conv1x1_weight(plan, inner=False)
        if w_proj is None:
            continue
        dw_var, dw_plan = _sole_producer(a, plans, aliases, var)
        if (dw_plan is None or dw_plan.strategy != depthwise.NAME
                or not _plain_epilogue(dw_plan) or "conv" not in dw_plan.operands):
            continue
        pw_var, pw_plan = _sole_producer(a, plans, aliases, dw_var)
        w_exp = _conv1x1_weight(pw_plan)
        s = dw_plan.operands["conv"]
        if w_exp is None or not block_c16.worth_fusing(
                s, w_exp.shape[1], w_proj.shape[0], _row_bands_take(pw_plan, dw_plan, plan)):
            continue
        fused = _small_block_plan(w_exp, pw_plan, dw_plan, w_proj, plan,
                                  a.bindings[pw_var].args[0])
        _record_fusion(plans, decision_of, var, dw_var, "fused_depthwise", fused)
        _record_fusion(plans, decision_of, var, pw_var, "fused_expansion", fused)


def _small_block_plan(w_exp: "np.ndarray", pw_plan: Plan, dw_plan: Plan,
                      w_proj: "np.ndarray", proj_plan: Plan, x: Any) -> Plan:
    """The ``inverted_residual_c16`` plan reading the expansion's input ``x``."""
    s = dw_plan.operands["conv"]
    co, out = w_proj.shape[0], (s.n, w_proj.shape[0], s.h, s.w)
    kshape = {**dataclasses.asdict(s), "co": co, "k": w_exp.shape[1],
              "dtype": proj_plan.shape["dtype"]}
    weights = block_c16.pack_weights(w_exp, dw_plan.operands["weight"], w_proj,
                                     pw_plan.bias, dw_plan.bias)
    emit = _block_emit(block_c16.NAME, kshape, pw_plan, dw_plan, weights, out)
    padded_c = block_c16.padded_widths(s.ic, co)[0]
    info = {"tile": f"{block_c16.lanes()}-channel blocks, "
                    f"{target_cores()} splits of the expanded channels"
                    + (f" ({padded_c - s.ic} zero channels added)" if padded_c > s.ic else "")}
    return dataclasses.replace(proj_plan, strategy=block_c16.NAME, emit=emit, inputs=[x],
                               shape=kshape, info=info, operands={})


def _block_emit(name: str, kshape: dict, pw_plan: Plan, dw_plan: Plan, weights: list,
                out: tuple) -> Callable[..., "relax.Expr"]:
    """The emitter of a whole-block kernel ``name``: the expansion's input as ``[N, K, H*W]``,
    ``weights`` (the expansion's, the depthwise conv's and the projection's, packed, with the
    biases of the inner two; None where one has none), then the projection's epilogue
    operands; the inner epilogues from the absorbed plans."""

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        from tvm import relax

        func = build_tuned(
            name, kshape, pw_bias=pw_plan.bias is not None, pw_act=pw_plan.act,
            dw_bias=dw_plan.bias is not None, dw_act=dw_plan.act, bias=bias is not None,
            act=act, residual=residual is not None)
        gv = bb.add_func(func, name)
        n, k, h, w = kshape["n"], kshape["k"], kshape["h"], kshape["w"]
        call_args = [bb.emit(relax.op.reshape(args[0], (n, k, h * w)))] + [
            relax.const(v) for v in weights if v is not None]
        if bias is not None:
            call_args.append(relax.const(bias))
        if residual is not None:
            call_args.append(residual)
        return relax.call_tir(gv, call_args, relax.TensorType(out, kshape["dtype"]))
    return emit


def _fuse_depthwise_pointwise(a: _Analysis, plans: dict, aliases: dict, decision_of: dict
                              ) -> None:
    """Replace each planned depthwise conv -> pointwise conv pair (the depthwise output, after
    its bias and clip, read by the pointwise conv only) with one ``dw_conv1x1_nchw`` kernel
    where :func:`dw_pointwise.worth_fusing` says so. The depthwise binding is left in place
    with no user: dead code elimination drops it."""
    for var, plan in list(plans.items()):
        if plan.strategy not in (pointwise.NAME, bsr.CONV_NAME):
            continue
        dw_var, dw_plan = _sole_producer(a, plans, aliases, var)
        if (dw_plan is None or dw_plan.strategy != depthwise.NAME or not _plain_epilogue(dw_plan)
                or "conv" not in dw_plan.operands
                or not dw_pointwise.worth_fusing(dw_plan.operands["conv"])):
            continue
        _record_fusion(plans, decision_of, var, dw_var, "fused_depthwise",
                       _fused_plan(dw_plan, plan, a.bindings[dw_var].args[0]))
        pw_var, pw_plan = _sole_producer(a, plans, aliases, dw_var)
        if _row_bands_take(pw_plan, dw_plan, plan):
            _record_fusion(plans, decision_of, var, pw_var, "fused_expansion",
                           _block_plan(pw_plan, dw_plan, plan, a.bindings[pw_var].args[0]))


def _row_bands_take(pw_plan: Plan | None, dw_plan: Plan, plan: Plan) -> bool:
    """Whether the expansion ``pw_plan``, the depthwise conv ``dw_plan`` (plain epilogue, read
    by ``plan`` alone) and the projection ``plan`` become one ``conv1x1_dw_conv1x1_nchw``
    kernel (row bands, each expanding its own pixels)."""
    s = dw_plan.operands["conv"]
    return (plan.strategy == pointwise.NAME and dw_pointwise.worth_fusing(s)
            and pw_plan is not None and pw_plan.strategy == pointwise.NAME
            and _plain_epilogue(pw_plan) and pw_plan.shape["n"] == s.n
            and dw_pointwise.worth_fusing_block(s, pw_plan.shape["ci"], plan.operands["out"][1]))


def _sole_producer(a: _Analysis, plans: dict, aliases: dict, var: Any) -> tuple[Any, Any]:
    """(binding, plan) of the planned kernel whose output (after its folded epilogue) is the
    input of ``var``'s op and read by it alone; ``(None, None)`` when there is none."""
    x = a.bindings[var].args[0]
    if a.uses.get(x, 0) != 1:
        return None, None
    producer = aliases.get(x, x)
    return producer, plans.get(producer)


def _plain_epilogue(plan: Plan) -> bool:
    """Whether a fused kernel can apply ``plan``'s epilogue to its inner stage: bias and
    clip bounds only (no residual, no GELU or SiLU)."""
    return plan.residual is None and not (plan.act and (plan.act.gelu or plan.act.silu))


def _record_fusion(plans: dict, decision_of: dict, var: Any, inner_var: Any, key: str,
                   fused: Plan) -> None:
    """``fused`` replaces the plans of ``var`` and of ``inner_var`` (the producer it absorbs,
    whose binding dead code elimination then drops); the decisions say so, the absorbed one
    under ``key`` of ``var``'s, and the fused kernel's own tuned knobs replace either op's."""
    plans[var] = fused
    del plans[inner_var]
    inner = decision_of[inner_var]
    inner["fused_into_next"] = fused.strategy
    inner.pop("tuned", None)   # its own kernel is not built
    decision = decision_of[var]
    decision["chosen"] = fused.strategy
    decision[key] = {k: v for k, v in inner.items() if k in ("shape", "epilogue")}
    decision.update(fused.info)
    decision.pop("tuned", None)
    if (knobs := knobs_for(fused.strategy, fused.shape)) is not None:
        decision["tuned"] = knobs


def _fused_plan(dw_plan: Plan, pw_plan: Plan, x: Any) -> Plan:
    """The ``dw_conv1x1_nchw`` plan reading the depthwise conv's input ``x``."""
    import numpy as np

    s = dw_plan.operands["conv"]
    w_pw, out, sparse = (pw_plan.operands[k] for k in ("weight", "out", "sparse"))
    co, dtype = out[1], pw_plan.shape["dtype"]
    kshape = {**dataclasses.asdict(s), "co": co, "dtype": dtype}
    fplan = dw_pointwise.plan(s.ic, co, *s.out_hw, sparse=sparse)
    if sparse:    # bsr_conv1x1's panels: each 4 output channels' kept input channels
        idx, data = bsr.pack_weight(np.ascontiguousarray(w_pw.T), fplan.oct)
        kshape["kept"] = int(idx.shape[1])
        weights = [idx, data]
    else:
        weights = [pointwise.pack_weight(w_pw, fplan.oct)]

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        from tvm import relax

        func = build_tuned(
            dw_pointwise.NAME, kshape, dw_bias=dw_plan.bias is not None, dw_act=dw_plan.act,
            bias=bias is not None, act=act, residual=residual is not None)
        gv = bb.add_func(func, dw_pointwise.NAME)
        call_args = [args[0], relax.const(dw_plan.operands["weight"])]
        if dw_plan.bias is not None:
            call_args.append(relax.const(dw_plan.bias))
        call_args += [relax.const(w) for w in weights]
        if bias is not None:
            call_args.append(relax.const(bias))
        if residual is not None:
            call_args.append(residual)
        return relax.call_tir(gv, call_args, relax.TensorType(out, dtype))

    info = {"tile": f"{fplan.rows} rows, {fplan.oct}x{fplan.tile_pixels}"}
    if sparse:
        info["rows_kept"] = kshape["kept"]
    return dataclasses.replace(pw_plan, strategy=dw_pointwise.NAME, emit=emit, inputs=[x],
                               shape=kshape, info=info)


def _block_plan(pw_plan: Plan, dw_plan: Plan, proj_plan: Plan, x: Any) -> Plan:
    """The ``conv1x1_dw_conv1x1_nchw`` plan (expansion, depthwise conv and projection: a
    whole inverted-residual block) reading the expansion's input ``x``."""
    s = dw_plan.operands["conv"]
    w_proj, out = (proj_plan.operands[n] for n in ("weight", "out"))
    kshape = {**dataclasses.asdict(s), "co": out[1], "k": pw_plan.shape["ci"],
              "dtype": proj_plan.shape["dtype"]}
    _, fplan, eoct = block_kernel_plan(kshape, knobs_for(dw_pointwise.EXPANDED_NAME, kshape))
    weights = [pointwise.pack_weight(pw_plan.operands["weight"], eoct), pw_plan.bias,
               dw_plan.operands["weight"], dw_plan.bias,
               pointwise.pack_weight(w_proj, fplan.oct)]
    emit = _block_emit(dw_pointwise.EXPANDED_NAME, kshape, pw_plan, dw_plan, weights, out)
    info = {"tile": f"{fplan.rows} rows, {fplan.oct}x{fplan.tile_pixels}; expansion "
                    f"{eoct}x{fplan.lanes}"}
    return dataclasses.replace(proj_plan, strategy=dw_pointwise.EXPANDED_NAME, emit=emit,
                               inputs=[x], shape=kshape, info=info)


def _fuse_pointwise_depthwise(a: _Analysis, plans: dict, aliases: dict, decision_of: dict
                              ) -> None:
    """Replace each planned pointwise conv -> depthwise conv pair (the pointwise output,
    after its bias and clip, read by the depthwise conv only; the depthwise conv not fused
    with its own projection) with one ``conv1x1_dw_nchw`` kernel where
    :func:`pointwise_dw.worth_fusing` says so. The pointwise binding is left in place with
    no user: dead code elimination drops it."""
    for var, plan in list(plans.items()):
        if (plan.strategy != depthwise.NAME or not _plain_epilogue(plan)
                or "conv" not in plan.operands):     # a dynamic batch's kernel
            continue
        pw_var, pw_plan = _sole_producer(a, plans, aliases, var)
        s = plan.operands["conv"]
        if (pw_plan is None or pw_plan.strategy != pointwise.NAME
                or not _plain_epilogue(pw_plan) or not pointwise_dw.worth_fusing(s)
                or pw_plan.shape["n"] != s.n):
            continue
        _record_fusion(plans, decision_of, var, pw_var, "fused_pointwise",
                       _fused_expansion_plan(pw_plan, plan, a.bindings[pw_var].args[0]))


def _fused_expansion_plan(pw_plan: Plan, dw_plan: Plan, x: Any) -> Plan:
    """The ``conv1x1_dw_nchw`` plan reading the pointwise conv's input ``x``."""
    s = dw_plan.operands["conv"]
    k, dtype = pw_plan.shape["ci"], dw_plan.shape["dtype"]
    kshape = {**dataclasses.asdict(s), "k": k, "dtype": dtype}
    _, fplan = expansion_plan(kshape, knobs_for(pointwise_dw.NAME, kshape))
    w_exp = pointwise.pack_weight(pw_plan.operands["weight"], fplan.oct)

    def emit(bb: "relax.BlockBuilder", args: list, bias, act: Activation | None, residual
             ) -> "relax.Expr":
        from tvm import relax

        func = build_tuned(
            pointwise_dw.NAME, kshape, pw_bias=pw_plan.bias is not None, pw_act=pw_plan.act,
            bias=bias is not None, act=act)
        gv = bb.add_func(func, pointwise_dw.NAME)
        call_args = [args[0], relax.const(w_exp)]
        if pw_plan.bias is not None:
            call_args.append(relax.const(pw_plan.bias))
        call_args.append(relax.const(dw_plan.operands["weight"]))
        if bias is not None:
            call_args.append(relax.const(bias))
        return relax.call_tir(gv, call_args, relax.TensorType(dw_plan.operands["out"], dtype))

    info = {"tile": f"{fplan.rows} rows, {fplan.oct}x{fplan.lanes}"}
    return dataclasses.replace(dw_plan, strategy=pointwise_dw.NAME, emit=emit, inputs=[x],
                               shape=kshape, info=info)


def _past_reshapes(a: _Analysis, tail: Any, anchor: Any) -> tuple[Any, Any]:
    """``(tail, anchor)`` moved past a chain of reshapes that are each the single user of the
    previous value, when an epilogue op follows the last one; unchanged otherwise. ``anchor``
    is the binding folded ops become aliases of: the kernel output, or the last reshape."""
    from tvm import relax

    end = tail
    while (nxt := _single_user_call(a, end, "relax.reshape")) is not None:
        end = nxt[0]
    if end is tail:
        return tail, anchor
    user = a.single_user(end)
    if user is None or not isinstance(user[1], relax.Call):
        return tail, anchor
    name = getattr(user[1].op, "name", "")
    if name in ("relax.add", "relax.nn.relu", "relax.nn.gelu", "relax.call_tir"):
        return end, end
    return tail, anchor


def _silu_gate(a: _Analysis, var: Any) -> Any | None:
    """The binding of ``var * sigmoid(var)`` (SiLU / Swish as ONNX spells it: Sigmoid, Mul)
    when those two are ``var``'s only users and the sigmoid feeds the product alone; the
    sigmoid binding then has no user left and dead code elimination drops it."""
    from tvm import relax

    users = a.users.get(var, [])
    if a.uses.get(var, 0) != 2 or len(users) != 2:
        return None
    calls = {getattr(a.bindings[u].op, "name", ""): u for u in users
             if isinstance(a.bindings[u], relax.Call)}
    sig, mul = calls.get("relax.sigmoid"), calls.get("relax.multiply")
    if sig is None or mul is None or a.single_user(sig) is None or a.single_user(sig)[0] != mul:
        return None
    args = list(a.bindings[mul].args)
    return mul if any(x.same_as(var) for x in args) and any(x.same_as(sig) for x in args) \
        else None


def _single_user_call(a: _Analysis, var: Any, op_name: str) -> tuple[Any, Any] | None:
    """(binding var, call) of ``var``'s only user when that user is a call of ``op_name``."""
    from tvm import relax

    nxt = a.single_user(var)
    if nxt and isinstance(nxt[1], relax.Call) and getattr(nxt[1].op, "name", "") == op_name:
        return nxt
    return None


def _make_mutator():
    from tvm import relax

    @relax.expr_functor.mutator
    class KernelRewriter(relax.PyExprMutator):
        """Emits planned kernels; turns folded epilogue bindings into aliases."""

        def __init__(self, mod: "ir.IRModule", plans: dict, aliases: dict,
                     built: "Progress | None" = None) -> None:
            super().__init__(mod)
            self.plans = plans
            self.aliases = aliases
            self.built = built
            self._binding = None

        def visit_var_binding_(self, binding: "relax.VarBinding") -> None:
            self._binding = binding
            super().visit_var_binding_(binding)
            self._binding = None

        def visit_call_(self, call: "relax.Call") -> "relax.Expr":
            b = self._binding
            if b is not None and b.value.same_as(call):
                if b.var in self.aliases:
                    return self.visit_expr(self.aliases[b.var])
                plan = self.plans.get(b.var)
                if plan is not None:
                    args = [self.visit_expr(x) for x in (plan.inputs or call.args)]
                    residual = (self.visit_expr(plan.residual) if plan.residual is not None
                                else None)
                    if plan.residual_shape is not None:
                        residual = self.builder_.emit(
                            relax.op.reshape(residual, plan.residual_shape))
                    scale = ({} if plan.input_scale is None
                             else {"scale": self.visit_expr(plan.input_scale)})
                    out = plan.emit(self.builder_, args, plan.bias, plan.act, residual, **scale)
                    if self.built is not None:
                        self.built.step(detail=plan.strategy)
                    return out
            return super().visit_call_(call)

    return KernelRewriter


def rewrite_pass(cores: int, decisions_out: list[dict], device: str = "cpu"):
    """Module pass running :func:`plan_function` + the rewriter on every Relax function."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="SparsecKernelRewrite")
    def _pass(mod: "ir.IRModule", _ctx) -> "ir.IRModule":
        mutator_cls = _make_mutator()
        work = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
        all_plans: dict = {}
        all_aliases: dict = {}
        for _, func in work:
            plans, aliases, decisions = plan_function(func, cores, mod, device)
            all_plans.update(plans)
            all_aliases.update(aliases)
            decisions_out.extend(decisions)
        with Progress(progress.current(), "kernels", len(all_plans), "built") as built:
            mutator = mutator_cls(mod, all_plans, all_aliases, built)
            for gv, func in work:
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()

    return _pass
