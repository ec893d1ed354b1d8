"""Pruning a model with dynamic dims (ONNX ``dim_param``: ``batch_size``, ``sequence_length``).

The analysis and the passes work on a static graph, so the model is pruned at one size: the
one ``--input-shapes`` gives, else the calibration data's (:func:`calibration_at_one_size`:
samples of different lengths are padded to the longest, the padding marked in the mask input
so that no fit, statistic or fidelity figure sees it; a batch dim takes the largest size that
divides every batch, which the calibration reader then cuts batches into).

The pruned weights are then carried back into the model as it was (:func:`carry_back`): every
constant the passes changed replaces the one the same node reads in the dynamic model, so the
model's own shape computations, and with them its symbolic dims, stay as they were. That takes
passes that change weights only (channel, head and FFN pruning, hidden widths, sparsity,
reconstruction); a pass that changes the graph's structure, or a value the dynamic model
computes at run time, is refused (``DynamicShapeError``), and the result is checked against the
pruned static graph in ONNX Runtime before it is given back.
"""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
from onnx import numpy_helper

from sparsec.errors import BadOptionError, DynamicShapeError
from sparsec.ir.graph import Graph


def dynamic_dims(model) -> tuple[onnx.ModelProto, dict[str, list[tuple[str, int]]]] | None:
    """(the model's proto, its dynamic dims -> the (input, axis) places each sizes), or None
    for a model that is not an ONNX model with named dynamic input dims."""
    from sparsec.frontends.dynamic import dim_params, read_dynamic
    from sparsec.frontends.onnx import read_model

    if isinstance(model, onnx.ModelProto):
        params = dim_params(model)
    elif isinstance(model, (str, os.PathLike)):
        params = dim_params(read_model(model))
    else:
        return None
    return (read_dynamic(model), params) if params else None    # a copy, with its weights


def _items(calibration, names: list[str]) -> list[dict[str, np.ndarray]]:
    """Calibration data in any form ``prune`` takes, as a list of {input: array}."""
    from sparsec.package import _load_npz

    if isinstance(calibration, (str, os.PathLike)):
        calibration = [dict(_load_npz(calibration)[1])]
    elif isinstance(calibration, dict):
        calibration = [calibration]
    out = []
    for item in calibration:
        if not isinstance(item, dict):
            item = dict(zip(names, item if isinstance(item, (tuple, list)) else [item]))
        out.append({k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
                    for k, v in item.items()})
    if not out:
        raise BadOptionError("the calibration data is empty")
    return out


def calibration_at_one_size(proto: onnx.ModelProto, dims: dict[str, list[tuple[str, int]]],
                            calibration, mask: str | None
                            ) -> tuple[list[dict[str, np.ndarray]], dict[str, tuple[int, ...]],
                                       str | None]:
    """(calibration batches at one size, ``input_shapes`` for that size, the mask input) for
    a model with dynamic ``dims``: each dim at the longest size in the data (shorter samples
    padded with zeros, which the mask input marks as padding), a batch dim (axis 0 wherever it
    is used) at the largest size dividing every batch."""
    if calibration is None:
        raise DynamicShapeError(
            f"the model has dynamic dims ({', '.join(sorted(dims))}): give calibration data "
            f"(--calib) to prune it at the sizes of real inputs, or --input-shapes")
    init = {t.name for t in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in init]
    items = _items(calibration, [v.name for v in inputs])
    seen: dict[str, list[int]] = {d: [] for d in dims}
    for item in items:
        for dim, places in dims.items():
            sizes = {np.shape(item[i])[axis] for i, axis in places
                     if i in item and np.ndim(item[i]) > axis}
            if len(sizes) > 1:
                raise BadOptionError(f"calibration inputs of one batch disagree on {dim}: "
                                     f"{sorted(sizes)}")
            seen[dim] += sizes
    size = {}
    for dim, places in dims.items():
        if not seen[dim]:
            raise BadOptionError(f"the calibration data has no input sized by {dim}")
        batch = all(axis == 0 for _, axis in places)
        size[dim] = math.gcd(*seen[dim]) if batch else max(seen[dim])
    padded = [d for d, places in dims.items() if len(set(seen[d])) > 1
              and not all(axis == 0 for _, axis in places)]
    if padded:
        names = [v.name for v in inputs]
        mask = mask if mask else None if mask == "" else next(
            (n for n in names if n.lower().endswith("attention_mask")), None)
        if mask is None or mask not in names:
            shown = ", ".join(f"{d} {min(seen[d])}..{max(seen[d])}" for d in padded)
            raise BadOptionError(f"calibration samples of different sizes ({shown}) are padded "
                                 f"to the longest, which needs the input that marks padding: "
                                 f"name it with --calib-mask")
    batches = []
    for item in items:
        out = {}
        for v in inputs:
            arr = item.get(v.name)
            if arr is None:
                raise BadOptionError(f"a calibration batch has no input '{v.name}' "
                                     f"(has: {', '.join(item) or '-'})")
            pad = [(0, 0)] * arr.ndim
            for axis, d in enumerate(v.type.tensor_type.shape.dim):
                if d.dim_param in padded and axis < arr.ndim:
                    pad[axis] = (0, size[d.dim_param] - arr.shape[axis])
            out[v.name] = np.pad(arr, pad) if any(p[1] for p in pad) else arr
        batches.append(out)
    shapes = {v.name: tuple(d.dim_value if d.HasField("dim_value") else size[d.dim_param]
                            for d in v.type.tensor_type.shape.dim) for v in inputs}
    return batches, shapes, (mask if padded else None)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def _refuse(why: str) -> DynamicShapeError:
    return DynamicShapeError(f"cannot keep the model's dynamic dims: {why}; prune at one fixed "
                             f"size with --input-shapes instead")


def carry_back(proto: onnx.ModelProto, loaded: Graph, pruned: Graph,
               feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The dynamic model ``proto`` with the weights of ``pruned`` (``loaded`` pruned at one
    size): see the module docstring. ``feeds`` (at that size) check the result."""
    from sparsec import reference
    from sparsec.ir.onnx_io import MAX_IR_VERSION
    from sparsec.passes.manager import EXACT_REL_TOL

    if [(n.name, n.op_type, n.outputs) for n in loaded.nodes] != \
            [(n.name, n.op_type, n.outputs) for n in pruned.nodes]:
        raise _refuse("the passes changed the graph's structure (removed or added layers)")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    consts = {t.name for t in graph.initializer}
    for n in graph.node:        # exporters share a deduplicated weight through Identity nodes
        if n.op_type == "Constant" or n.op_type == "Identity" and n.input[0] in consts:
            consts.add(n.output[0])
    # by the name the loader gives each node (``ir.onnx_io``: its own, or op type and index)
    nodes = {n.name or f"{n.op_type}_{i}": n for i, n in enumerate(graph.node)}
    used = set(consts) | {v.name for v in graph.input} | {o for n in graph.node for o in n.output}
    added = []
    for before, after in zip(loaded.nodes, pruned.nodes):
        if before.attrs.keys() != after.attrs.keys() or any(
                not _same(before.attrs[k], after.attrs[k]) for k in before.attrs):
            raise _refuse(f"the passes changed attributes of node '{after.name}'")
        for slot, (old_name, name) in enumerate(zip(before.inputs, after.inputs)):
            new = pruned.initializers.get(name)
            old = loaded.initializers.get(old_name)
            if new is None and old is None and old_name == name:
                continue
            if new is not None and old is not None and old.shape == new.shape and \
                    old.dtype == new.dtype and np.array_equal(old, new):
                continue
            node = nodes.get(after.name)
            if new is None or node is None or node.op_type != after.op_type or \
                    slot >= len(node.input):
                raise _refuse(f"the input {slot} of node '{after.name}' changed, and the "
                              f"dynamic model has no such constant")
            if node.input[slot] not in consts:
                raise _refuse(f"pruning changes '{node.input[slot]}', which the dynamic model "
                              f"computes at run time")
            fresh, k = name, 1
            while fresh in used:
                fresh, k = f"{name}.pruned{'' if k == 1 else k}", k + 1
            used.add(fresh)
            added.append(numpy_helper.from_array(np.ascontiguousarray(new), fresh))
            node.input[slot] = fresh
    graph.initializer.extend(added)
    while True:                 # the replaced constants, and what only they read, go
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("Constant", "Identity")
                and n.output[0] not in read]
        for n in dead:
            graph.node.remove(n)
        if not dead:
            break
    keep = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]         # intermediate shapes changed with the weights
    for v in graph.output:          # fixed output dims as pruned, dynamic ones as they were
        for d, size in zip(v.type.tensor_type.shape.dim, pruned.shape(v.name)):
            if d.HasField("dim_value"):
                d.dim_value = int(size)
    out.ir_version = min(out.ir_version, MAX_IR_VERSION)
    try:
        got = reference.session(out).run(None, feeds)
    except Exception as e:  # noqa: BLE001 - ORT's error, one line
        raise _refuse(f"the pruned dynamic model does not run in ONNX Runtime "
                      f"({str(e).strip().splitlines()[0][:160]})") from None
    fid = reference.compare(reference.run(pruned, feeds), got)
    if not fid.max_rel_err <= EXACT_REL_TOL:
        raise _refuse(f"the weights carried back differ from the pruned model by "
                      f"{fid.max_rel_err:.3g} (relative)")
    return out
