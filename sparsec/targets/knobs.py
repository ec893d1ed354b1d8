"""Kernels by (strategy, shape, knobs): build one (:func:`build`), the knob settings worth
timing for it (:func:`_variants`) and the heuristics' default among them, and the compile side
of tuning: the cache of measured-best knobs and strategy choices, which :func:`using` makes
the answer of :func:`knobs_for` / :func:`measured_choice` while a model compiles.

The kernel rewrite (``kernels/rewrite.py``) builds every kernel through this module; the tuner
(``tuning.py``) times the variants and writes the cache. This module imports no back end, so
both can depend on it.

Cache: ``$SPARSEC_TUNING_CACHE``, else ``<cache dir>/sparsec/tuning.json``; a JSON object
``{target key: {"strategy shape-json": {"knobs": ..., "ms": {variant: ms}}}}``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tvm import tirx

#: PrimFunc attribute holding the kernel's shape arguments (JSON), for the tuner to rebuild it
SHAPE_ATTR = "sparsec.shape"
#: the AMX kernels, whose knobs are the block of C tiles (mt x nt)
AMX_STRATEGIES = ("dense_amx_bf16", "sparse_amx_bf16", "conv2d_amx_bf16",
                  "batch_matmul_amx_bf16")


def cache_path() -> Path:
    env = os.environ.get("SPARSEC_TUNING_CACHE")
    if env:
        return Path(env)
    from sparsec.deploy.runtime import cache_dir

    return cache_dir() / "tuning.json"


def target_key(tvm_target: dict) -> str:
    return json.dumps(tvm_target, sort_keys=True)


class Cache:
    """The tuning records of every target, read once, written atomically."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else cache_path()
        try:
            self.data: dict = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def get(self, target: str, strategy: str, shape: dict) -> dict | None:
        return self.data.get(target, {}).get(_key(strategy, shape))

    def put(self, target: str, strategy: str, shape: dict, record: dict) -> None:
        self.data.setdefault(target, {})[_key(strategy, shape)] = record

    def save(self) -> None:
        from sparsec.errors import OutputError
        from sparsec.package import atomic_write_bytes

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, (json.dumps(self.data, indent=1, sort_keys=True)
                                           + "\n").encode())
        except OSError as e:
            raise OutputError(f"cannot write the tuning cache {self.path}: {e.strerror or e} "
                              "(set SPARSEC_TUNING_CACHE to a writable file)") from None


def _key(strategy: str, shape: dict) -> str:
    return f"{strategy} {json.dumps(shape, sort_keys=True)}"


# --------------------------------------------------------------------------- knobs per kernel


def _conv_shape(shape: dict):
    from sparsec.targets.kernels.conv2d import ConvShape

    return ConvShape(**{k: tuple(v) if isinstance(v, list) else v for k, v in shape.items()
                        if k != "dtype"})


def _fused_kernel_plan(shape: dict):
    """The depthwise conv and the default plan of a ``dw_conv1x1_nchw`` kernel's shape."""
    from sparsec.targets.kernels import dw_pointwise

    s = _conv_shape({n: v for n, v in shape.items() if n not in ("co", "kept")})
    return s, dw_pointwise.plan(s.ic, shape["co"], *s.out_hw, sparse="kept" in shape)


def _expansion_kernel_plan(shape: dict):
    """The depthwise conv and the default plan of a ``conv1x1_dw_nchw`` kernel's shape."""
    from sparsec.targets.kernels import pointwise_dw

    s = _conv_shape({n: v for n, v in shape.items() if n != "k"})
    return s, pointwise_dw.plan(s, shape["k"])


def block_kernel_plan(shape: dict, knobs: dict | None = None):
    """The depthwise conv, the plan and the expansion tile's channels of a
    ``conv1x1_dw_conv1x1_nchw`` kernel's shape, ``knobs`` (``rows``) over the defaults."""
    from sparsec.targets.kernels import dw_pointwise

    s = _conv_shape({n: v for n, v in shape.items() if n not in ("co", "k")})
    planned = dw_pointwise.block_plan(s, shape["co"], (knobs or {}).get("rows"))
    if planned is None:
        raise ValueError(f"no whole-block plan for {s} with knobs {knobs}")
    return (s, *planned)


def expansion_plan(shape: dict, knobs: dict | None):
    """The depthwise conv and the ``conv1x1_dw_nchw`` plan for ``shape`` with ``knobs``
    (``rows``, and ``oct``, the expansion tile's channels) over the default plan's."""
    from sparsec.targets.kernels import pointwise_dw

    s, fplan = _expansion_kernel_plan(shape)
    if knobs and "rows" in knobs:
        fplan = pointwise_dw.plan(s, shape["k"], knobs["rows"])
    if knobs and "oct" in knobs:
        fplan = dataclasses.replace(fplan, oct=knobs["oct"])
    return s, fplan


def _row_tiles(shape: dict) -> list[dict]:
    return [{"rows": t} for t in (1, 2, 3, 4, 5, 6, 8) if shape["m"] % t == 0]


def _variants(strategy: str, shape: dict) -> list[dict]:
    """Every knob setting worth timing for one kernel (the default among them)."""
    from sparsec.targets.kernels import pointwise

    if strategy in ("dense_packed", "bsr_dense", "batch_matmul"):
        return _row_tiles(shape)
    if strategy == "conv1x1_nchw":
        return [{"tile": [t.oct, t.pixels]} for t in pointwise.tiles()]
    if strategy in AMX_STRATEGIES:
        rows = shape["m"] if "m" in shape else shape["oc"]     # blocks that fit 8 registers
        return [{"mt": mt, "nt": nt} for mt, nt in ((2, 2), (2, 1), (1, 3), (1, 2), (1, 1))
                if mt == 1 or rows > 16]
    if strategy == "depthwise_nchw":
        return [{"max_acc": a} for a in (4, 6, 8, 12)]
    if strategy == "dw_conv1x1_nchw":
        oh = _fused_kernel_plan(shape)[0].out_hw[0]
        return [{"rows": r} for r in range(1, 9) if oh % r == 0]
    if strategy == "conv1x1_dw_conv1x1_nchw":
        from sparsec.targets.kernels import dw_pointwise
        from sparsec.targets.kernels.common import target_cores

        s, fplan, _ = block_kernel_plan(shape)
        oh, cores = s.out_hw[0], target_cores()
        return [{"rows": r} for r in range(1, oh + 1) if oh % r == 0 and (oh // r) % cores == 0
                and dw_pointwise.expansion_pixels(s, r, fplan.lanes) is not None]
    if strategy == "conv1x1_dw_nchw":
        # band heights at the default tile, and the other tile widths at the default band
        # (the tile rule, ``pointwise_dw.SHORT_K``, was measured on one CPU)
        from sparsec.targets.kernels import pointwise_dw

        s, fplan = _expansion_kernel_plan(shape)
        oh = s.out_hw[0]
        return [{"rows": r} for r in range(1, 17) if oh % r == 0 and oh // r >= 2] + [
            {"rows": fplan.rows, "oct": t} for t in pointwise_dw.OCTS if t != fplan.oct]
    if strategy == "conv2d_nchw_packed" and "variant" not in shape:
        from sparsec.targets.kernels import conv2d

        return [{"width_tile": t} for t in range(1, conv2d.max_tile() + 1)]
    if strategy == "conv2d_nchw_packed":
        # the width-vectorized kernel against the channel-blocked one, whose weight packing
        # differs (the compile packs for the kernel the record names): which wins depends on
        # the CPU (ResNet-18's stem, one thread: Zen 4 1453 against 1599 us, Emerald Rapids
        # 2523 against 2111)
        return [{"kernel": "width_vectorized"}, {"kernel": "oc_blocked"}]
    if strategy == "grouped_conv2d_nchw":
        from sparsec.targets.kernels import grouped_conv

        return [{"width_tile": t} for t in range(1, grouped_conv.MAX_STRIP + 1)]
    return []


def build(strategy: str, shape: dict, knobs: dict | None = None, **flags) -> "tirx.PrimFunc":
    """The kernel ``strategy`` for ``shape`` with ``knobs`` (defaults where absent) and the
    epilogue ``flags`` (bias, act, residual), tagged with its shape for the tuner."""
    from sparsec.targets.kernels import (amx, batch_matmul, block_c16, bsr, conv2d, dense,
                                         depthwise, dw_pointwise, grouped_conv, pointwise,
                                         pointwise_dw, softmax)

    k = knobs or {}
    rows = (k["rows"],) if "rows" in k else None
    if strategy == "dense_packed":
        func = dense.build(shape["m"], shape["k"], shape["n"], shape["dtype"], **flags,
                           **({"rows": rows} if rows else {}))
    elif strategy in ("dense_amx_bf16", "sparse_amx_bf16"):
        func = amx.build(shape["m"], shape["k"], shape["n"], shape["dtype"], **flags,
                         mt=k.get("mt"), nt=k.get("nt"), nnz=shape.get("nnz"))
    elif strategy == "batch_matmul_amx_bf16":
        func = amx.build_batch(shape["batch"], shape["m"], shape["k"], shape["n"],
                               shape["dtype"], **flags,
                               b_transposed=shape.get("b_transposed", False), mt=k.get("mt"),
                               nt=k.get("nt"))
    elif strategy == "conv2d_amx_bf16":
        func = amx.build_conv(_conv_shape(shape), shape["dtype"], **flags, mt=k.get("mt"),
                              nt=k.get("nt"))
    elif strategy == "bsr_dense":
        func = bsr.build(shape["m"], shape["k"], shape["n"], shape["rows"], shape["dtype"],
                         **flags, **({"row_tiles": rows} if rows else {}))
    elif strategy == "batch_matmul":
        func = batch_matmul.build(shape["batch"], shape["m"], shape["k"], shape["n"],
                                  shape["dtype"], **flags,
                                  b_transposed=shape.get("b_transposed", False),
                                  **({"row_tiles": rows} if rows else {}))
    elif strategy == "conv1x1_nchw":
        tile = pointwise.Tile(*k["tile"]) if "tile" in k else pointwise.pick_tile(
            shape["co"], shape["p"])
        func = pointwise.build(shape["n"], shape["ci"], shape["p"], shape["co"], tile,
                               shape["dtype"], **flags)
    elif strategy == "bsr_conv1x1":
        func = bsr.build_conv1x1(shape["n"], shape["ci"], shape["p"], shape["co"],
                                 shape["rows"], shape["dtype"], **flags)
    elif strategy == "depthwise_nchw":
        func = depthwise.build(_conv_shape(shape), shape["dtype"], **flags,
                               **({"max_acc": k["max_acc"]} if "max_acc" in k else {}))
    elif strategy == "dw_conv1x1_nchw":
        s, fplan = _fused_kernel_plan(shape)
        if "rows" in k:
            fplan = dataclasses.replace(fplan, rows=k["rows"])
        func = dw_pointwise.build(s, shape["co"], fplan, shape["dtype"], **flags,
                                  kept=shape.get("kept"))
    elif strategy == "inverted_residual_c16":
        func = block_c16.build(_conv_shape({n: v for n, v in shape.items()
                                            if n not in ("co", "k")}),
                               shape["k"], shape["co"], shape["dtype"], **flags)
    elif strategy == "conv1x1_dw_conv1x1_nchw":
        s, fplan, eoct = block_kernel_plan(shape, k)
        expansion = dw_pointwise.Expansion(shape["k"], eoct, flags.pop("pw_bias", False),
                                           flags.pop("pw_act", None))
        func = dw_pointwise.build(s, shape["co"], fplan, shape["dtype"], **flags,
                                  expansion=expansion)
    elif strategy == "conv1x1_dw_nchw":
        s, fplan = expansion_plan(shape, k)
        func = pointwise_dw.build(s, shape["k"], fplan, shape["dtype"], **flags)
    elif strategy == "conv2d_nchw_packed":
        s = _conv_shape({n: v for n, v in shape.items() if n != "variant"})
        if "variant" in shape and k.get("kernel") != "oc_blocked":
            plan = conv2d.plan_wvec(s)      # ISA-dependent: built in the target's scope
            if plan is None:
                raise ValueError(f"no width-vectorized tiling for {s} on this target")
            func = conv2d.build_wvec(s, plan, shape["dtype"], **flags)
        else:
            func = conv2d.build(s, shape["dtype"], **flags,
                                **({"width_tile": k["width_tile"]} if "width_tile" in k
                                   else {}))
    elif strategy == "pool2d_nchw":
        func = depthwise.build(_conv_shape({n: v for n, v in shape.items()
                                            if n not in ("pool", "count_include_pad")}),
                               shape["dtype"], pool=shape["pool"],
                               count_include_pad=shape["count_include_pad"])
    elif strategy == "softmax_rows":
        func = softmax.build(shape["rows"], shape["n"], shape["dtype"])
    elif strategy == "grouped_conv2d_nchw":
        func = grouped_conv.build(_conv_shape({n: v for n, v in shape.items() if n != "groups"}),
                                  shape["groups"], shape["dtype"], **flags,
                                  **({"width_tile": k["width_tile"]} if "width_tile" in k
                                     else {}))
    else:
        raise KeyError(strategy)
    return func.with_attr(SHAPE_ATTR, json.dumps(shape, sort_keys=True))


# --------------------------------------------------------------------------- compile side

_ACTIVE: contextvars.ContextVar[tuple[Cache, str] | None] = contextvars.ContextVar(
    "sparsec_tuning", default=None)


@contextlib.contextmanager
def using(cache: Cache | None, tvm_target: dict):
    """Within the block, ``knobs_for`` answers from ``cache`` for ``tvm_target``."""
    token = _ACTIVE.set(None if cache is None else (cache, target_key(tvm_target)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


_ALTERNATIVES: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "sparsec_alternatives", default=None)


def _choice_key(alternatives: list[tuple[str, dict]]) -> dict:
    return {"candidates": sorted([s, sh] for s, sh in alternatives)}


def measured_choice(alternatives: list[tuple[str, dict]]) -> str | None:
    """The strategy measured fastest among ``alternatives`` ((strategy, shape) of the kernels
    that could serve one op) when ``tune`` timed them for the active target, else None (the
    cost rule decides). Also notes them for :func:`kernels_of`."""
    noted = _ALTERNATIVES.get()
    if noted is not None:
        noted.append(list(alternatives))
    active = _ACTIVE.get()
    if active is None:
        return None
    record = active[0].get(active[1], "choice", _choice_key(alternatives))
    return None if record is None or "rejected" in record else record["choice"]


def build_tuned(strategy: str, shape: dict, **flags) -> "tirx.PrimFunc":
    """``build`` with the knobs the active cache recorded for this kernel (defaults if none)."""
    return build(strategy, shape, knobs_for(strategy, shape), **flags)


def knobs_for(strategy: str, shape: dict) -> dict | None:
    """The tuned knobs of a kernel, or None (defaults) when it was never tuned."""
    active = _ACTIVE.get()
    if active is None:
        return None
    record = active[0].get(active[1], strategy, shape)
    return None if record is None or "rejected" in record else record["knobs"]


def _default_knobs(strategy: str, shape: dict) -> dict | None:
    """The knob setting the heuristics pick without tuning, when it is one of the variants."""
    from sparsec.targets.kernels import conv2d, depthwise, pointwise
    from sparsec.targets.kernels.common import pick_row_tile

    if strategy == "dense_packed":
        from sparsec.targets.kernels import dense

        return {"rows": pick_row_tile(shape["m"], dense.row_tiles())}
    if strategy in ("bsr_dense", "batch_matmul"):
        return {"rows": pick_row_tile(shape["m"])}
    if strategy == "conv1x1_nchw":
        t = pointwise.pick_tile(shape["co"], shape["p"])
        return {"tile": [t.oct, t.pixels]}
    if strategy == "depthwise_nchw":
        return {"max_acc": depthwise.MAX_ACC}
    if strategy in AMX_STRATEGIES:
        from sparsec.targets.kernels import amx

        p = (amx.conv_plan(_conv_shape(shape)) if strategy == "conv2d_amx_bf16"
             else amx.plan(shape["m"], shape["k"], shape["n"]))
        return {"mt": p.mt, "nt": p.nt}
    if strategy == "dw_conv1x1_nchw":
        return {"rows": _fused_kernel_plan(shape)[1].rows}
    if strategy == "conv1x1_dw_nchw":
        return {"rows": _expansion_kernel_plan(shape)[1].rows}
    if strategy == "conv1x1_dw_conv1x1_nchw":
        return {"rows": block_kernel_plan(shape)[1].rows}
    if strategy == "conv2d_nchw_packed" and "variant" in shape:
        return {"kernel": "width_vectorized"}
    if strategy == "conv2d_nchw_packed":
        return {"width_tile": conv2d.pick_width_tile(_conv_shape(shape).out_hw[1])}
    if strategy == "grouped_conv2d_nchw":
        from sparsec.targets.kernels import grouped_conv

        s = _conv_shape({n: v for n, v in shape.items() if n != "groups"})
        return {"width_tile": conv2d.pick_width_tile(s.out_hw[1], grouped_conv.MAX_STRIP)}
    return None


def _short(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if k != "dtype")


__all__ = ["AMX_STRATEGIES", "SHAPE_ATTR", "Cache", "build", "build_tuned", "cache_path",
           "knobs_for", "measured_choice", "target_key", "using"]
