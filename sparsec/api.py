"""The Python API. The CLI is the same thing: each CLI flag is one keyword here.

    import sparsec
    g = sparsec.load("model.onnx")                      # or sparsec.capture(module, (x,))
    result = sparsec.prune(g, "small.onnx", ratio=0.3)  # pruned ONNX + per-pass report
    sparsec.compile("model.onnx", "build/model", target="host", ratio=0.3)
    sparsec.validate("build/model")                     # library vs ONNX Runtime
"""

from __future__ import annotations

import contextlib
import inspect as pyinspect
import os
import tempfile
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sparsec import reference
from sparsec.analysis.cost import Cost, cost
from sparsec.analysis.depgraph import DependencyGraph
from sparsec.errors import (BadOptionError, InvalidModelError, SparsecError, ToolchainError,
                            ValidationError)
from sparsec.frontends.onnx import InputShapes, load_onnx, parse_input_shapes
from sparsec.ir.graph import Graph
from sparsec.ir.onnx_io import to_onnx
from sparsec.recipe import Recipe
from sparsec.package import (
    FORMAT,
    LIBRARY,
    MANIFEST,
    MODEL,
    Package,
    archive_name,
    atomic_write_bytes,
    check_elf,
    check_writable_dir,
    check_writable_file,
    file_hashes,
    header_name,
    read_calibration,
    seal,
    sha256,
    staging_dir,
    write_json,
    write_reference,
)
from sparsec.passes.channel_prune import ChannelPrune
from sparsec.passes.criteria import CRITERIA, NEEDS_DATA, NEEDS_TORCH
from sparsec.passes.dead_channels import RemoveDeadChannels
from sparsec.passes.ffn_fusion import FuseFFN, fusible_runs
from sparsec.passes.layer_removal import RemoveAttention, RemoveLayers, find_blocks, find_layers
from sparsec.passes.manager import FEW_SAMPLES, PassManager, PassResult
from sparsec.passes.reorder import ReorderChannels, weight_matrices
from sparsec.passes.sparsify import CRITERIA as SPARSITY_CRITERIA
from sparsec.passes.sparsify import Sparsify, parse_pattern
from sparsec.reference import signature
from sparsec.targets.kernels.common import PRECISIONS

Log = Callable[[str], None]
ModelLike = Any  # path, onnx.ModelProto, sparsec Graph, or torch.nn.Module (with example_inputs)


def _quiet(msg: str) -> None:
    pass


def version() -> str:
    try:
        return metadata.version("sparsec")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- loading
def load(model: ModelLike, input_shapes: InputShapes | str | None = None,
         example_inputs: Sequence[Any] | None = None) -> Graph:
    """Any supported model form -> a static-shaped Graph (the input is never modified)."""
    if isinstance(input_shapes, str):
        input_shapes = parse_input_shapes(input_shapes)
    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, os.PathLike)) or type(model).__name__ == "ModelProto":
        return load_onnx(model, input_shapes)
    if hasattr(model, "forward") and hasattr(model, "parameters"):
        if example_inputs is None:
            raise BadOptionError("a torch module needs example_inputs to be captured")
        from sparsec.frontends.torch import capture
        return capture(model, example_inputs)
    raise BadOptionError(f"cannot load a model from a {type(model).__name__}")


def capture(module, example_inputs: Sequence[Any]) -> Graph:
    """Capture a torch.nn.Module with torch.export at the example inputs' shapes."""
    from sparsec.frontends.torch import capture as _capture
    return _capture(module, example_inputs)


def inspect(model: ModelLike, input_shapes: InputShapes | str | None = None) -> dict:
    """Op histogram, parameters, MACs and channel groups (frozen ones with their reasons)."""
    graph = load(model, input_shapes)
    dg = DependencyGraph(graph)
    c = cost(graph)
    return {
        "name": graph.name,
        "inputs": signature(graph, graph.inputs),
        "outputs": signature(graph, graph.outputs),
        "ops": graph.op_histogram(),
        "params": c.params,
        "macs": c.macs,
        "load": graph.notes,
        "groups": [g.as_dict(graph) for g in dg.groups],
        "prunable_groups": sum(g.prunable for g in dg.groups),
        "hidden_groups": sum(g.hidden_prunable for g in dg.groups),
        "frozen_groups": sum(not g.prunable and not g.hidden_prunable for g in dg.groups),
    }


# ----------------------------------------------------------------------------- pruning
RECIPE_KEYS = frozenset(f.name for f in fields(Recipe))


def as_recipe(recipe) -> Recipe:
    """A ``Recipe`` from a Recipe, a dict of options, or the path of a TOML file."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe.from_file(recipe)


def merge_recipe(recipe, given: dict[str, Any]) -> Recipe:
    """``recipe`` with the keyword options in ``given`` that differ from ``prune``'s defaults
    (an empty list or table counts as not given)."""
    defaults = {k: p.default for k, p in pyinspect.signature(prune).parameters.items()}

    def is_default(key: str, value) -> bool:
        d = defaults[key]
        return value == d or (isinstance(value, (dict, list, tuple)) and not value
                              and d in (None, ()))
    return as_recipe(recipe).updated(**{k: (tuple(v) if k == "ignore" else v)
                                        for k, v in given.items() if not is_default(k, v)})

@dataclass
class PruneResult:
    graph: Graph
    passes: list[PassResult]
    before: Cost
    after: Cost
    fidelity: reference.Fidelity
    output: Path | None = None
    #: one batch of the calibration data (seeded random inputs without it): a real input for
    #: the package's reference pair
    sample: dict[str, np.ndarray] = field(default_factory=dict)

    #: what loading did to the input model (``Graph.notes``: folding, fused pads, ...)
    load: dict = field(default_factory=dict)
    #: what ``fidelity`` was measured on; False when nothing could be held out from fitting
    #: (one calibration sample): the figure is then not a fidelity and is not shown as one
    measured_on: str = ""
    held_out: bool = True
    #: with ``max_drop``: every ratio tried, what it cost and whether it was within the drop
    search: list[dict] = field(default_factory=list)
    #: the options that ran (``sparsec.recipe``), recorded in a package's manifest
    recipe: Recipe | None = None

    def report(self) -> dict:
        out = {"before": self.before.as_dict(), "after": self.after.as_dict(),
               "fidelity": {**self.fidelity.as_dict(), "measured_on": self.measured_on,
                            "held_out": self.held_out},
               "passes": [p.as_dict() for p in self.passes], "load": self.load}
        if self.search:
            out["search"] = self.search
        if self.recipe is not None:
            out["recipe"] = self.recipe.to_dict()
        return out


def _check_ratio(ratio: float) -> float:
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise BadOptionError(f"ratio must be a number in [0, 1), got {ratio!r}") from None
    if not 0.0 <= ratio < 1.0:
        raise BadOptionError(f"ratio must be in [0, 1), got {ratio}")
    return ratio


def _calibration(graph: Graph, calibration) -> list[dict[str, np.ndarray]]:
    """Calibration batches as feeds: an .npz path, one dict, or any iterable (a list, a torch
    DataLoader, a generator) of dicts keyed by input name, of arrays/tensors (one input), or of
    tuples whose first items are the inputs in order (labels after them are ignored)."""
    if calibration is None:
        return [reference.random_inputs(graph, seed=s) for s in range(2)]
    if isinstance(calibration, (str, os.PathLike)):
        return read_calibration(calibration, signature(graph, graph.inputs))
    if isinstance(calibration, dict):
        calibration = [calibration]
    batches = []
    for item in calibration:
        if not isinstance(item, dict):
            items = list(item) if isinstance(item, (tuple, list)) else [item]
            if len(items) < len(graph.inputs):
                raise BadOptionError(f"a calibration batch has {len(items)} item(s), the model "
                                     f"takes {len(graph.inputs)} input(s)")
            item = dict(zip(graph.inputs, items))
        batches.extend(_chunks(graph, item))
    if not batches:
        raise BadOptionError("the calibration data is empty")
    return batches


def _chunks(graph: Graph, item: dict) -> list[dict[str, np.ndarray]]:
    """One calibration item as feeds of the model's static shapes: a batch larger than the
    model's (a DataLoader of 32 for a model captured at batch 1) is cut into model batches."""
    parts: dict[str, list[np.ndarray]] = {}
    for name in graph.inputs:
        if name not in item:
            raise BadOptionError(f"a calibration batch has no input '{name}' "
                                 f"(has: {', '.join(item) or '-'})")
        value = item[name]
        if hasattr(value, "detach"):                   # a torch tensor
            value = value.detach().cpu().numpy()
        want = graph.shape(name)
        arr = np.asarray(value).astype(graph.value(name).dtype, copy=False)
        if arr.shape == want:
            parts[name] = [arr]
        elif (arr.ndim == len(want) and arr.shape[1:] == want[1:] and want[0] > 0
              and arr.shape[0] % want[0] == 0):
            parts[name] = np.split(arr, arr.shape[0] // want[0])
        else:
            raise BadOptionError(f"calibration input '{name}' has shape {list(arr.shape)}, "
                                 f"the model expects {list(want)} (or a multiple of its batch)")
    counts = {len(v) for v in parts.values()}
    if len(counts) != 1:
        raise BadOptionError("calibration inputs of one batch hold different numbers of samples")
    return [{k: v[i] for k, v in parts.items()} for i in range(counts.pop())]


def _check_patterns(graph: Graph, layer_ratios: dict[str, float], ignore: Sequence[str]) -> None:
    """Every layer pattern must name at least one channel group (a typo is an error)."""
    from fnmatch import fnmatchcase

    for r in layer_ratios.values():
        _check_ratio(r)
    if not layer_ratios and not ignore:
        return
    sources = sorted({s for g in DependencyGraph(graph).groups if g.prunable for s in g.sources})
    weights = sorted(weight_matrices(graph))       # --ignore also spares weights from sparsity
    for pat in [*layer_ratios, *ignore]:
        if not any(fnmatchcase(s, pat) for s in sources) and not (
                pat in ignore and any(fnmatchcase(w, pat) for w in weights)):
            shown = ", ".join(sources[:6]) + (" ..." if len(sources) > 6 else "")
            raise BadOptionError(f"layer pattern '{pat}' matches no prunable channel group "
                                 f"(group sources: {shown or 'none'})")


def _check_structure(graph: Graph, remove_layers: int, remove_attention: int,
                     fuse_ffn: int) -> None:
    """Bad layer-removal / attention-removal / FFN-fusion counts fail before any work."""
    for name, n in (("remove_layers", remove_layers), ("remove_attention", remove_attention),
                    ("fuse_ffn", fuse_ffn)):
        if int(n) < 0:
            raise BadOptionError(f"{name} must be >= 0, got {n}")
    if not (remove_layers or remove_attention or fuse_ffn):
        return
    blocks = find_blocks(graph)
    if remove_layers and int(remove_layers) >= (found := len(find_layers(graph, blocks))):
        raise BadOptionError(f"cannot remove {remove_layers} layers: the model has {found} "
                             f"removable residual layers")
    # with fusion, only attention blocks between two FFN blocks are candidates
    found = sum(b.attention and (not fuse_ffn or (k > 0 and not blocks[k - 1].attention))
                for k, b in enumerate(blocks))
    if remove_attention and int(remove_attention) > found:
        where = " between FFN blocks" if fuse_ffn else ""
        raise BadOptionError(f"cannot remove {remove_attention} attention blocks: the model has "
                             f"{found}{where}")
    if fuse_ffn == 1 or (fuse_ffn and int(fuse_ffn) > len(blocks) - int(remove_attention)):
        raise BadOptionError(f"fuse_ffn needs 2 or more consecutive FFN blocks, and the model "
                             f"has {len(blocks) - int(remove_attention)} residual blocks left "
                             f"after attention removal; got {fuse_ffn}")
    if fuse_ffn and not remove_attention and not remove_layers:
        fusible_runs(graph, blocks, int(fuse_ffn))      # fails now, not after calibration


def _check_sparsity(sparsity: float, pattern: str, criterion: str, lamp: bool):
    """(pattern kind, numbers) of a valid sparsification request; BadOptionError otherwise."""
    try:
        kind, nums = parse_pattern(pattern)
    except ValueError as e:
        raise BadOptionError(str(e)) from None
    if not 0.0 <= float(sparsity) < 1.0:
        raise BadOptionError(f"sparsity must be in [0, 1), got {sparsity}")
    if criterion not in SPARSITY_CRITERIA:
        raise BadOptionError(f"unknown sparsity criterion '{criterion}' (known: "
                             f"{', '.join(SPARSITY_CRITERIA)})")
    if kind == "nm" and sparsity and abs(sparsity - (1 - nums[0] / nums[1])) > 1e-9:
        raise BadOptionError(f"pattern {pattern} fixes sparsity at {1 - nums[0] / nums[1]:g}; "
                             f"leave sparsity out")
    if kind == "nm" and lamp:
        raise BadOptionError("lamp allocation applies to unstructured and block patterns, "
                             "not N:M")
    return kind, nums


def prune(model: ModelLike, output: str | os.PathLike | None = None, *, recipe=None,
          ratio: float = 0.0,
          criterion: str = "l2", reconstruct: bool = False, round_to: int | None = None,
          head_ratio: float | None = None, hidden_ratio: float = 0.0, remove_layers: int = 0,
          replace_linear: bool = False,
          remove_attention: int = 0, fuse_ffn: int = 0, sensitivity: bool = False,
          sparsity: float = 0.0, sparsity_pattern: str = "unstructured",
          sparsity_criterion: str = "magnitude", lamp: bool = False, reorder: bool = False,
          layer_ratios: dict[str, float] | None = None, ignore: Sequence[str] = (),
          input_shapes: InputShapes | str | None = None,
          calibration=None, calib_mask: str | None = None, max_drop: float | None = None,
          metric: Callable[[Graph], float] | None = None, remove_dead: bool = False,
          example_inputs: Sequence[Any] | None = None, scores=None,
          log: Log = _quiet) -> PruneResult:
    """Prune the least important channels of every channel group; optionally write ONNX.

    ``layer_ratios`` {glob over group source weights: ratio} overrides the ratio per group;
    ``head_ratio`` is the ratio for attention-head groups (default: ``ratio``);
    ``hidden_ratio`` cuts hidden widths, the residual streams under LayerNorms that
    ``ratio`` leaves whole (lossy even for empty channels: the norms' statistics change);
    ``sensitivity`` spreads each ratio over the model by measured cost instead of applying it
    in every group (see ``sparsec.passes.allocation``);
    ``remove_layers`` first drops that many consecutive residual layers, the run whose input
    and output hidden states are closest in angle on the calibration data (with
    ``replace_linear`` a least-squares linear map stands in for them, as in ReplaceMe);
    ``remove_attention`` then drops that many attention blocks (each on its own, the ones
    closest in angle; with ``fuse_ffn`` only those between two FFN blocks), keeping their
    FFNs; ``fuse_ffn`` fuses that many consecutive FFN blocks into one wider FFN evaluated on
    the run's input (the run whose fused model stays closest to the original; see
    ``sparsec.passes.ffn_fusion``);
    ``sparsity`` zeros that share of the remaining weights in ``sparsity_pattern``
    (``"unstructured"``, blocks ``"RxC"`` or ``"N:M"``, which fixes the share itself) by
    ``sparsity_criterion`` (``"magnitude"`` or ``"wanda"``), the same share in every layer or,
    with ``lamp``, layer-adaptive (see ``sparsec.passes.sparsify``);
    ``reorder`` finally permutes channel groups so nonzero weights cluster into dense 4x4
    blocks (exact; see ``sparsec.passes.reorder``);
    ``ignore`` globs leave groups whole; ``round_to`` rounds kept channel counts up to a
    multiple (none by default here; ``compile`` takes it from the target).

    ``criterion``: ``"l2"`` / ``"l1"`` (weight magnitude); on the calibration data
    ``"activation"`` (activation norm), ``"wanda"`` (|W| x activation norm) or
    ``"fluctuation"`` (activation variance x W^2, FLAP); or, for torch modules through
    ``prune_module``, ``"taylor"`` (gradients; ``scores`` carries them in).

    ``reconstruct``: refit the consumers of removed channels by least squares on calibration
    data (and, with ``sparsity``, the weights each sparsified layer keeps). ``calibration``:
    inputs to fit and measure on (an .npz path, a dict, or any iterable of batches, see
    ``_calibration``; every 4th batch is held out for the fidelity figures);
    seeded random inputs by default. ``calib_mask`` names the input that marks real positions
    (1) and padding (0); by default an input called ``attention_mask`` is used, ``""`` turns
    it off. Padded positions are left out of fits, statistics and fidelity. Ratio 0 leaves
    the model unchanged.

    ``max_drop``: instead of pruning at ``ratio``, find the largest ratio (up to ``ratio``, or
    0.9 when it is 0) whose held-out fidelity drop stays within ``max_drop``, by bisection
    (``head_ratio`` and ``hidden_ratio`` keep their proportion to ``ratio``). The drop is
    1 - cosine, or with ``metric(graph) -> float`` (higher is better, e.g. accuracy on your own
    data) the original's metric minus the pruned model's. ``result.search`` lists what was
    tried.

    ``recipe``: the options as a ``Recipe``, a dict, or a TOML file (``sparsec.recipe``);
    keywords given beside it that differ from their defaults override its keys.
    ``result.recipe`` is the recipe that ran.
    """
    given = {k: v for k, v in locals().items() if k in RECIPE_KEYS}
    if recipe is not None:
        merged = merge_recipe(recipe, given)
        return prune(model, output, **merged.options(), input_shapes=input_shapes,
                     calibration=calibration, metric=metric, example_inputs=example_inputs,
                     scores=scores, log=log)
    if max_drop is not None:
        options = {k: v for k, v in given.items() if k != "max_drop"}
        return _search_ratio(model, output, max_drop, metric, {
            **options, "input_shapes": input_shapes, "calibration": calibration,
            "example_inputs": example_inputs, "scores": scores}, log, Recipe.of_keywords(given))
    if metric is not None:
        raise BadOptionError("metric is what max_drop bounds: give max_drop too")
    ratio = _check_ratio(ratio)
    head_ratio = None if head_ratio is None else _check_ratio(head_ratio)
    hidden_ratio = _check_ratio(hidden_ratio)
    layer_ratios = dict(layer_ratios or {})
    if criterion not in CRITERIA:
        raise BadOptionError(f"unknown criterion '{criterion}' (known: {', '.join(CRITERIA)})")
    if criterion in NEEDS_TORCH and scores is None:
        raise BadOptionError(f"criterion '{criterion}' needs gradients, which only a torch "
                             f"module gives: use sparsec.prune_module(module, ...)")
    round_to = 1 if round_to is None else round_to
    if int(round_to) < 1:
        raise BadOptionError(f"round_to must be a positive integer, got {round_to}")
    if output is not None:
        check_writable_file(output, model if isinstance(model, (str, os.PathLike)) else None)
    graph = load(model, input_shapes, example_inputs)
    _check_patterns(graph, layer_ratios, ignore)
    _check_structure(graph, remove_layers, remove_attention, fuse_ffn)
    kind, nm = _check_sparsity(sparsity, sparsity_pattern, sparsity_criterion, lamp)
    calib = _calibration(graph, calibration)
    if ((reconstruct or criterion in NEEDS_DATA) and ratio > 0 or remove_layers
            or remove_attention or fuse_ffn or (sparsity or kind == "nm") and (
                sparsity_criterion == "wanda" or reconstruct)) \
            and calibration is None:
        log("warning: fitting to random inputs; give calibration data (--calib) drawn from "
            "the real input distribution")
    passes: list = [RemoveDeadChannels()] if remove_dead else []
    if remove_layers:
        passes.append(RemoveLayers(int(remove_layers), replace_linear=bool(replace_linear)))
    if remove_attention:
        passes.append(RemoveAttention(int(remove_attention), between_ffns=bool(fuse_ffn)))
    if fuse_ffn:
        passes.append(FuseFFN(int(fuse_ffn)))
    if ratio > 0 or (head_ratio or 0) > 0 or hidden_ratio > 0 or any(
            r > 0 for r in layer_ratios.values()):
        passes.append(ChannelPrune(ratio, criterion=criterion, reconstruct=reconstruct,
                                   round_to=int(round_to), layer_ratios=layer_ratios,
                                   ignore=list(ignore), scores=scores,
                                   head_ratio=head_ratio, hidden_ratio=hidden_ratio,
                                   sensitivity=bool(sensitivity)))
    if sparsity > 0 or kind == "nm":
        passes.append(Sparsify(float(sparsity) or 1 - nm[0] / nm[1], sparsity_pattern,
                               sparsity_criterion, "lamp" if lamp else "uniform",
                               ignore=list(ignore), reconstruct=bool(reconstruct)))
    if reorder:
        passes.append(ReorderChannels())
    if graph.notes.get("normalize", {}).get("summary"):    # after the checks: an error stays
        log(f"load: {graph.notes['normalize']['summary']} (exact)")    # the only line
    manager = PassManager(passes, calib, log, mask=calib_mask)
    pruned, results = manager.run(graph)
    result = PruneResult(pruned, results, cost(graph), cost(pruned), manager.fidelity,
                         sample=calib[0] if calib else reference.random_inputs(graph, seed=0),
                         load=graph.notes, measured_on=manager.measured_on,
                         held_out=manager.held_out, recipe=Recipe.of_keywords({
                             **given, "ratio": ratio, "head_ratio": head_ratio,
                             "hidden_ratio": hidden_ratio, "round_to": int(round_to),
                             "layer_ratios": layer_ratios, "ignore": list(ignore)}))
    if not manager.held_out and any(not p.exact for p in passes):
        log("warning: one calibration sample: nothing to hold out, so the fidelity of this "
            "lossy pruning is not measured; give more calibration data (--calib)")
    elif (calibration is not None and manager.samples_held_out < FEW_SAMPLES
          and any(not p.exact for p in passes)):
        log(f"warning: fidelity measured on only {manager.samples_held_out} held-out "
            f"calibration samples: a rough figure, and only for data like the calibration "
            f"data; give more (--calib) for one you can rely on")
    if output is not None:
        atomic_write_bytes(output, to_onnx(pruned).SerializeToString())
        result.output = Path(output)
    return result


#: bisection steps of ``max_drop`` after the upper end (resolution: upper end / 2**steps)
SEARCH_STEPS = 5


def ratio_scaler(options: dict) -> tuple[float, Callable[[float], dict]]:
    """For a search over the ratio: its upper end (``options["ratio"]``, or 0.9 when that is
    0) and ``ratio -> options`` at that ratio, ``head_ratio`` and ``hidden_ratio`` keeping
    their proportion to it."""
    top = _check_ratio(options["ratio"]) or 0.9
    head = options["head_ratio"]
    head_share = None if head is None else _check_ratio(head) / top
    hidden_share = _check_ratio(options["hidden_ratio"]) / top

    def at(ratio: float) -> dict:
        return {**options, "ratio": ratio,
                "head_ratio": None if head_share is None else min(head_share * ratio, 0.95),
                "hidden_ratio": min(hidden_share * ratio, 0.95)}

    return top, at


def _search_ratio(model: ModelLike, output, max_drop, metric, options: dict,
                  log: Log, recipe: Recipe) -> PruneResult:
    """``prune(..., max_drop=...)``: bisection over the ratio (see ``prune``)."""
    try:
        max_drop = float(max_drop)
    except (TypeError, ValueError):
        raise BadOptionError(f"max_drop must be a number, got {max_drop!r}") from None
    if not 0.0 < max_drop < 1.0 and metric is None:
        raise BadOptionError(f"--max-drop is a drop in cosine, in (0, 1), got {max_drop:g}")
    top, at_ratio = ratio_scaler(options)
    if output is not None:
        check_writable_file(output, model if isinstance(model, (str, os.PathLike)) else None)
    graph = load(model, options.pop("input_shapes"), options.pop("example_inputs"))
    options["calibration"] = _calibration(graph, options["calibration"])
    base = metric(graph) if metric is not None else 1.0
    tried: dict[float, PruneResult] = {}

    def attempt(ratio: float) -> bool:
        res = prune(graph, **at_ratio(ratio))
        if not res.held_out:
            raise BadOptionError("--max-drop needs held-out data to measure the drop: give "
                                 "at least two calibration samples (--calib)")
        drop = base - (metric(res.graph) if metric is not None else res.fidelity.cosine)
        res.search = [{"ratio": ratio, "drop": drop, "within": drop <= max_drop}]
        tried[ratio] = res
        log(f"max-drop: ratio {ratio:.4f} -> drop {drop:.5f} "
            f"({'within' if drop <= max_drop else 'over'} {max_drop:g})")
        return drop <= max_drop

    lo, hi = 0.0, top
    if not attempt(hi):
        for _ in range(SEARCH_STEPS):
            mid = round((lo + hi) / 2, 6)
            if attempt(mid):
                lo = mid
            else:
                hi = mid
        if lo == 0.0:
            raise BadOptionError(f"no ratio keeps the drop within {max_drop:g} (the smallest "
                                 f"tried, {hi:.4f}, drops "
                                 f"{tried[hi].search[0]['drop']:.4f}); raise --max-drop")
        hi = lo
    result = tried[hi]
    result.search = [r.search[0] for _, r in sorted(tried.items())]
    result.recipe = recipe        # re-running it searches again, to the same ratio
    log(f"max-drop: chose ratio {hi:.4f} of {len(tried)} tried")
    if output is not None:
        atomic_write_bytes(output, to_onnx(result.graph).SerializeToString())
        result.output = Path(output)
    return result


# ----------------------------------------------------------------------------- compiling
def compile(model: ModelLike, output_dir: str | os.PathLike, *, target: str = "host",
            name: str | None = None, recipe=None,
            ratio: float = 0.0, criterion: str = "l2", reconstruct: bool = False,
            round_to: int | None = None, head_ratio: float | None = None,
            hidden_ratio: float = 0.0,
            remove_layers: int = 0, replace_linear: bool = False, remove_attention: int = 0,
            fuse_ffn: int = 0, sensitivity: bool = False, sparsity: float = 0.0,
            sparsity_pattern: str = "unstructured", sparsity_criterion: str = "magnitude",
            lamp: bool = False, reorder: bool = False,
            layer_ratios: dict[str, float] | None = None, ignore: Sequence[str] = (),
            input_shapes: InputShapes | str | None = None,
            calibration=None, calib_mask: str | None = None, max_drop: float | None = None,
            metric: Callable[[Graph], float] | None = None, remove_dead: bool = False,
            example_inputs: Sequence[Any] | None = None, command: Sequence[str] | None = None,
            tune: float = 0.0, precision: str | None = None, profile: bool = False,
            latency_budget: float | None = None, speedup: float | None = None,
            log: Log = _quiet) -> dict:
    """Prune, compile for ``target`` and write a package directory (see ``sparsec.package``);
    returns its manifest. ``name`` (a C identifier; default: from the directory name) names
    the C header, the static archive and its symbols. ``round_to`` defaults to the target's
    channel multiple (``TargetSpec.channel_multiple``).

    The package's reference pair is one calibration batch and ONNX Runtime's outputs for it on
    the pruned model. The library must reproduce them (within the tolerance ``validate``
    uses) or nothing is written (``ValidationError``): run here, or for a cross target under
    its emulator; without one the package is written unchecked, with a warning.

    ``tune`` > 0 first spends up to that many seconds timing the pruned model's kernels (see
    :func:`tune`); kernels tuned earlier for the target are built with their best knobs
    either way.

    ``profile`` (targets that run here) measures each kernel's share of a call on this CPU
    (``sparsec.profile``) into the manifest's ``profile``.

    ``latency_budget`` (ms) or ``speedup`` (x the dense model's speed), for targets that run
    here: instead of pruning at ``ratio``, find the least pruning (up to ``ratio``, or 0.9)
    whose latency, measured on this machine, is within the budget, by bisection over the
    ratio with the other options applied at each; with ``sensitivity``, per-group widths
    from a measured latency table and a knapsack on held-out fidelity lost per millisecond
    saved (``sparsec.latency``). The manifest's
    ``latency`` holds the asked, the measured (the package's own library) and the dense
    latency and every ratio tried; its recipe holds the ratio chosen.

    ``precision`` "bf16" lets kernels that round their inputs to bf16 run where they are
    faster (AMX tiles on CPUs that have them, sparse tensor cores for 2:4 weights on sm_80+);
    the default is the target's: fp32, or bf16 for ``x86-amx``. Such a package is checked
    with the bf16 tolerance."""
    from sparsec.deploy.header import check_name, default_name
    from sparsec.targets import resolve_target

    spec = resolve_target(target)
    name = check_name(name) if name is not None else default_name(Path(output_dir).name)
    if round_to is None and recipe is not None:
        round_to = as_recipe(recipe).round_to
    if round_to is None:
        round_to = spec.channel_multiple
    _check_ratio(ratio)
    precision = precision or spec.precision
    if precision not in PRECISIONS:
        raise BadOptionError(f"--precision takes {' or '.join(PRECISIONS)}, not '{precision}'")
    if profile and not (spec.runs_here and spec.device == "cpu"):
        raise BadOptionError(f"--profile measures on this machine's CPU; target "
                             f"'{spec.name}' does not run here")
    if tune < 0 or (tune > 0 and not (spec.runs_here and spec.device == "cpu")):
        raise BadOptionError(f"--tune takes a positive number of seconds, for this machine's "
                             f"CPU only (got {tune:g} for target '{spec.name}')")
    check_writable_dir(output_dir)
    check_toolchain(spec)
    options = dict(ratio=ratio, criterion=criterion, reconstruct=reconstruct,
                   round_to=round_to, head_ratio=head_ratio, hidden_ratio=hidden_ratio,
                   remove_layers=remove_layers,
                   replace_linear=replace_linear, remove_attention=remove_attention,
                   fuse_ffn=fuse_ffn, sensitivity=sensitivity, sparsity=sparsity,
                   sparsity_pattern=sparsity_pattern, sparsity_criterion=sparsity_criterion,
                   lamp=lamp, reorder=reorder, layer_ratios=layer_ratios, ignore=ignore,
                   calib_mask=calib_mask, max_drop=max_drop, remove_dead=remove_dead)
    budget = None
    if latency_budget is not None or speedup is not None:
        from sparsec import latency

        if metric is not None:
            raise BadOptionError("metric is what max_drop bounds, not a latency budget")
        if recipe is not None:
            options = merge_recipe(recipe, options).options()
        result, budget, dense_again = latency.budget_search(
            load(model, input_shapes, example_inputs),
            {**options, "calibration": calibration}, spec, latency_budget, speedup, log)
    else:
        result = prune(model, recipe=recipe, **options, input_shapes=input_shapes,
                       calibration=calibration, metric=metric, example_inputs=example_inputs,
                       log=log)
    graph = result.graph
    from sparsec.deploy.header import c_header
    from sparsec.targets.host import compile_onnx

    inputs, outputs = signature(graph, graph.inputs), signature(graph, graph.outputs)
    source = (str(model) if isinstance(model, (str, os.PathLike))
              else f"<{type(model).__name__}>")
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(staging_dir(output_dir))
        proto = to_onnx(graph)
        (tmp / MODEL).write_bytes(proto.SerializeToString())
        if tune > 0:
            from sparsec.targets import tuning

            tuning.tune(proto, spec, tune, log=log)
        prefix = f"{name}_"
        on_cpu = spec.device == "cpu"   # CUDA packages: no static archive yet
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        emulation = None
        if on_cpu:
            facts = compile_onnx(proto, spec, tmp / LIBRARY, log=log,
                                 static_lib=tmp / archive_name(name), system_lib_prefix=prefix,
                                 precision=precision)
            bf16 = uses_bf16(facts)
            if spec.amx_emulated_here and bf16:
                from sparsec.targets.kernels import amx

                # the same tile programs, runnable on this CPU
                log("building the AMX tile kernels with emulated tile ops for this CPU's check")
                emulation = scratch / "emulation.so"
                with amx.emulated():
                    compile_onnx(proto, resolve_target("host"), emulation, log=_quiet, tuned=False,
                                 precision="bf16")
        else:
            from sparsec.targets import cuda

            emulation = None if spec.runs_here else scratch / "emulation.so"
            facts = cuda.compile_onnx(proto, spec, tmp / LIBRARY, log, emulation_lib=emulation,
                                      precision=precision)
            bf16 = uses_bf16(facts)
        feeds = {s["name"]: result.sample[s["name"]] for s in inputs}
        expected = reference.run(proto, feeds)
        write_reference(tmp / "reference", inputs, outputs, feeds, expected)
        rtol, atol = tolerance(facts)
        if precision == "bf16" and not bf16:
            log("note: --precision bf16, but no kernel computes in bf16 for this model and "
                "target (bf16 kernels: AMX tiles on CPUs with AMX; sparse tensor cores for 2:4 "
                "weights with more than 8 rows, sm_80+); the package is fp32")
        about = f"{Path(source).name} compiled for {spec.name} ({facts['tvm_version']})"

        def write_header(rtol: float) -> None:
            (tmp / header_name(name)).write_text(c_header(
                name, prefix, inputs, outputs, atol, rtol, about, spec.device, tmp / LIBRARY))

        write_header(rtol)
        check, via = None, "native"
        try:
            runner = _load_runner(spec, tmp, name, inputs, outputs, log, facts.get("cuda"))
        except ToolchainError as e:  # e.g. no qemu: the package is still right, just unchecked
            if emulation is None:
                log(f"warning: reference pair not checked here ({e}); check it on the device "
                    f"(sparsec_check_reference)")
                runner = None
            else:   # no GPU or no AMX: check the same kernels' numerics on this CPU
                from sparsec.targets.host import load_library

                what, how, where = (
                    ("AMX code", "its tile programs are checked on this CPU with the tile ops "
                     "emulated", "an AMX machine") if on_cpu else
                    ("GPU code", "its schedules are checked on this CPU", "the GPU"))
                log(f"warning: the {what} is not run here ({e}); {how}, the binary on "
                    f"{where} with sparsec validate")
                runner = load_library(emulation, [s["name"] for s in inputs])
                runner.via = "amx-tiles-emulated-on-cpu" if on_cpu else "cuda-schedules-on-cpu"
        min_cosine = BF16_MIN_COSINE if bf16 else None
        if runner is not None:
            via = runner.via
            check = _compare(outputs, expected, runner.run(feeds), rtol, atol, min_cosine)
            log(f"reference check ({via}): max abs err {check.max_abs_err:.3g} vs ONNX Runtime"
                + (f" (bf16 kernels: cosine {min(o['cosine'] for o in check.outputs):.6f})"
                   if bf16 else ""))
            _raise_if_mismatch(check)
            if bf16:    # the device check: the binary must match at the fidelity found here
                rtol = device_rtol(check)
                write_header(rtol)
        if budget is not None:
            from sparsec.latency import time_ms

            budget["measured_ms"] = time_ms(runner.run, feeds)
            budget["dense_ms_after"] = dense_again()
            log(f"latency: asked {budget['budget_ms']:.4g} ms, the package measures "
                f"{budget['measured_ms']:.4g} ms (dense, timed again beside it: "
                f"{budget['dense_ms_after']:.4g} ms: "
                f"{budget['dense_ms_after'] / budget['measured_ms']:.2f}x faster)")
        measured = None
        if profile:
            from sparsec.profile import profile_model, summary

            measured = profile_model(proto)
            log(f"profile: {summary(measured)}")
        manifest = {
            "format": FORMAT,
            "name": name,
            "sparsec_version": version(),
            "versions": {dist: _dist_version(dist) for dist in
                         ("apache-tvm", "onnx", "onnxruntime", "numpy", "torch")},
            "target": {"name": spec.name, "tvm": spec.tvm_target, "triple": spec.triple},
            "command": list(command) if command is not None else ["sparsec.compile(...)"],
            "source": {"model": source, "sha256": sha256(model) if isinstance(
                model, (str, os.PathLike)) else None},
            "inputs": inputs,
            "outputs": outputs,
            "library": {"shared": LIBRARY, "static": archive_name(name) if on_cpu else None,
                        "header": header_name(name),
                        "system_lib_prefix": prefix if on_cpu else None},
            "reference": {"inputs": "reference/inputs.npz", "outputs": "reference/outputs.npz",
                          "inputs_bin": "reference/inputs.bin",
                          "outputs_bin": "reference/outputs.bin", "rtol": rtol, "atol": atol,
                          **({"min_cosine": min_cosine} if bf16 else {}),
                          "from": "calibration" if calibration is not None else "random",
                          "check": None if check is None else {
                              "ok": check.ok, "max_abs_err": check.max_abs_err, "via": via,
                              "cosine": min(o["cosine"] for o in check.outputs)}},
            "files": file_hashes(tmp),
            "prune": result.report(),
            "compile": {**facts, "precision": precision},
            **({"profile": measured} if measured is not None else {}),
            **({"latency": budget} if budget is not None else {}),
        }
        write_json(tmp / MANIFEST, seal(manifest))
    log(f"wrote {output_dir}")
    return manifest


def profile(model: ModelLike, input_shapes: InputShapes | str | None = None) -> dict:
    """Where a model's time goes on this CPU, kernel by kernel (``sparsec.profile``): a
    package directory (its pruned model, as compiled for the host) or any model."""
    from sparsec.profile import profile_model

    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        model = Package.load(model).path / MODEL
    return profile_model(to_onnx(load(model, input_shapes)))


def tune(model: ModelLike, *, target: str = "host", budget: float = 60.0,
         input_shapes: InputShapes | str | None = None, check: bool = True,
         log: Log = _quiet) -> list[dict]:
    """Time the schedule variants of every kernel ``model`` compiles to, within ``budget``
    seconds, and record the fastest in the tuning cache that ``compile`` reads (see
    ``sparsec/targets/tuning.py``). ``model`` may be a package directory (its pruned model is
    tuned). Only this machine's CPU can be tuned. With ``check`` the whole model is then
    timed with and without the new records, which compile uses only if it got faster.
    Returns one record per kernel tuned, and the whole-model verdict."""
    from sparsec.targets import resolve_target, tuning

    spec = resolve_target(target)
    if budget <= 0:
        raise BadOptionError(f"tuning budget must be positive, got {budget}")
    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        model = Path(model) / MODEL
        if not model.is_file():
            raise BadOptionError(f"{model.parent} is not a sparsec package (no {MODEL})")
    proto = to_onnx(load(model, input_shapes))
    return tuning.tune(proto, spec, budget, log=log, check=check)


def check_toolchain(spec) -> None:
    """The programs ``spec`` links with must be installed; fails before any heavy work."""
    import shutil

    from sparsec.targets import CROSS_PACKAGES

    for tool in (spec.tool("g++"), spec.tool("ar")):
        if shutil.which(tool) is None:
            package = CROSS_PACKAGES.get(spec.triple or "", "g++ and binutils")
            raise ToolchainError(f"target {spec.name} needs {tool}, which is not installed "
                                 f"(Debian/Ubuntu: apt install {package})")
    if spec.device == "cuda":
        from sparsec.targets.cuda import nvcc

        nvcc()


# ----------------------------------------------------------------------------- running
#: default tolerance of a compiled library against ONNX Runtime: max|y - ref| <= ATOL + RTOL *
#: max|ref| per output (the reference check in the package and its C header use the same)
RTOL, ATOL = 1e-4, 1e-5
#: the tolerance of a library with bf16 kernels (AMX, sparse tensor cores): inputs rounded to
#: 8 mantissa bits. Deep networks lose more than that through bf16 (torch's own bf16 autocast:
#: 17 % of max|y| on an untrained MobileNetV2, cosine 0.987), so an output also passes with
#: cosine >= BF16_MIN_COSINE; the package then records max(RTOL_BF16, BF16_MARGIN x the error
#: measured here) for the device's check of the reference pair.
RTOL_BF16, ATOL_BF16 = 3e-2, 1e-3
BF16_MIN_COSINE = 0.99
BF16_MARGIN = 1.5


def uses_bf16(facts: dict) -> bool:
    """Whether a kernel of the compiled library computes in bf16 (its decision says
    ``precision``)."""
    return any(d.get("precision") == "bf16" for d in facts.get("decisions", []))


def tolerance(facts: dict) -> tuple[float, float]:
    """(rtol, atol) a compiled library is checked with: looser when a kernel computes in bf16."""
    return (RTOL_BF16, ATOL_BF16) if uses_bf16(facts) else (RTOL, ATOL)


def _load_runner(spec, directory: Path, name: str, inputs: list[dict], outputs: list[dict],
                 log: Log = _quiet, cuda: dict | None = None):
    """What runs a package's library here: the library itself in this process (on the GPU
    for a CUDA target, ``cuda`` its facts), or, for a cross CPU target, a program built for
    the target under its emulator. ``ToolchainError`` if nothing here can run it."""
    if spec.runs_here:
        from sparsec.targets.host import load_library

        return load_library(directory / LIBRARY, [s["name"] for s in inputs], cuda)
    if spec.native or spec.device != "cpu":
        raise ToolchainError(f"target {spec.name} does not run on this machine: "
                             f"{spec.why_not_here}")
    from sparsec.deploy.emulate import EmulatedRunner

    return EmulatedRunner(spec, directory, name, inputs, outputs, log)


def _runner(pkg: Package):
    from sparsec.targets import resolve_target

    spec = resolve_target(pkg.manifest["target"]["name"])
    check_elf(pkg.path / LIBRARY)
    try:
        return _load_runner(spec, pkg.path, pkg.name, pkg.inputs, pkg.outputs,
                            cuda=pkg.manifest["compile"].get("cuda"))
    except SparsecError:
        raise
    except Exception as e:
        raise _library_failed(pkg, e) from None


def _run_package(pkg: Package, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The package's library on checked feeds; a library that fails on inputs matching its
    manifest (another model's library, re-hashed into it) is refused as an invalid package."""
    runner = _runner(pkg)
    try:
        return runner.run(feeds)
    except SparsecError:
        raise
    except Exception as e:
        raise _library_failed(pkg, e) from None


def _library_failed(pkg: Package, e: Exception) -> InvalidModelError:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return InvalidModelError(f"package {pkg.path}: its {LIBRARY} does not run as its manifest "
                             f"describes ({first}); compile the package again")


def run(package_dir: str | os.PathLike, inputs: dict[str, np.ndarray] | str | os.PathLike
        ) -> dict[str, np.ndarray]:
    """Run a compiled package on ``inputs`` (dict or .npz path); outputs keyed by name."""
    pkg = Package.load(package_dir)
    feeds = reference.check_inputs(
        inputs if isinstance(inputs, dict) else pkg.read_inputs(inputs), pkg.inputs)
    outs = _run_package(pkg, feeds)
    return {spec["name"]: out for spec, out in zip(pkg.outputs, outs)}


@dataclass
class ValidationReport:
    ok: bool
    outputs: list[dict] = field(default_factory=list)
    rtol: float = RTOL
    atol: float = ATOL
    min_cosine: float | None = None

    @property
    def max_abs_err(self) -> float:
        return max((o["max_abs_err"] for o in self.outputs), default=0.0)


def device_rtol(check: ValidationReport) -> float:
    """The rtol a bf16 package records for the device's check of its reference pair: its
    own, or wider, so that BF16_MARGIN x the error measured here passes and no more."""
    return max([check.rtol] + [(BF16_MARGIN * o["max_abs_err"] - check.atol) / o["peak"]
                               for o in check.outputs if o["peak"] > 0])


def _compare(outputs: list[dict], expected: list[np.ndarray], actual: list[np.ndarray],
             rtol: float, atol: float, min_cosine: float | None = None) -> ValidationReport:
    """Per output: ok when max|y - ref| <= atol + rtol * max|ref|, or (bf16 packages) when
    the cosine similarity is at least ``min_cosine``."""
    report = ValidationReport(ok=True, rtol=rtol, atol=atol, min_cosine=min_cosine)
    for spec, ref, out in zip(outputs, expected, actual):
        fid = reference.compare([ref], [out])
        ref_abs = np.abs(np.asarray(ref, dtype=np.float64))
        peak = float(ref_abs[np.isfinite(ref_abs)].max(initial=0.0))
        bound = atol + rtol * peak
        ok = fid.max_abs_err <= bound or (min_cosine is not None and fid.cosine >= min_cosine)
        report.ok &= ok
        report.outputs.append({"name": spec["name"], "max_abs_err": fid.max_abs_err,
                               "bound": bound, "peak": peak, "cosine": fid.cosine, "ok": ok})
    return report


def _raise_if_mismatch(report: ValidationReport) -> None:
    if not report.ok:
        worst = max(report.outputs, key=lambda o: o["max_abs_err"] - o["bound"])
        why = (f"max abs err {worst['max_abs_err']:.3g} > bound {worst['bound']:.3g}")
        if report.min_cosine is not None:
            why += (f" and cosine {worst['cosine']:.4f} < {report.min_cosine} (bf16 kernels: "
                    f"a target without them, e.g. x86-avx512, keeps fp32)")
        raise ValidationError(f"output '{worst['name']}' differs from ONNX Runtime: {why}")


def validate(package_dir: str | os.PathLike, inputs=None, *, rtol: float | None = None,
             atol: float | None = None, seed: int = 0, check: bool = False
             ) -> ValidationReport:
    """Compiled library vs ONNX Runtime on the package's pruned ONNX model.

    An output matches when max|lib - ort| <= atol + rtol * max|ort| (by default the
    package's own tolerance: its manifest's ``reference``), or, for a package with bf16
    kernels, when its cosine similarity is at least the recorded ``min_cosine``. With
    ``check=True`` a mismatch
    raises ``ValidationError`` (the CLI's non-zero exit)."""
    import onnx

    pkg = Package.load(package_dir)
    recorded = pkg.manifest.get("reference", {})
    rtol = recorded.get("rtol", RTOL) if rtol is None else rtol
    atol = recorded.get("atol", ATOL) if atol is None else atol
    min_cosine = recorded.get("min_cosine")
    model = onnx.load(str(pkg.path / MODEL))
    if inputs is None:
        feeds = reference.random_feeds(pkg.inputs, seed)
    else:
        feeds = reference.check_inputs(
            inputs if isinstance(inputs, dict) else pkg.read_inputs(inputs), pkg.inputs)
    report = _compare(pkg.outputs, reference.run(model, feeds), _run_package(pkg, feeds), rtol,
                      atol, min_cosine)
    if check:
        _raise_if_mismatch(report)
    return report


# ----------------------------------------------------------------------------- torch modules
def _created_bias(module, name: str) -> str | None:
    """``conv.bias`` for ``conv.weight__bias``, the bias reconstruction gives a bias-less layer."""
    if not name.endswith("__bias"):
        return None
    owner = name[: -len("__bias")].rpartition(".")[0]
    try:
        has_slot = "bias" in module.get_submodule(owner)._parameters
    except AttributeError:
        return None
    return f"{owner}.bias" if has_slot else None


def prune_module(module, example_inputs: Sequence[Any], *, recipe=None, ratio: float = 0.0,
                 criterion: str = "l2", reconstruct: bool = False, round_to: int | None = None,
                 head_ratio: float | None = None, hidden_ratio: float = 0.0,
                 sensitivity: bool = False, remove_layers: int = 0,
                 layer_ratios: dict[str, float] | None = None, ignore: Sequence[str] = (),
                 calibration=None, calib_mask: str | None = None,
                 max_drop: float | None = None, metric=None, remove_dead: bool = False,
                 loss_fn=None, log: Log = _quiet):
    """Prune a ``torch.nn.Module``: returns ``(pruned_module, PruneResult)``.

    The module is captured with the FX frontend (``sparsec.frontends.fx``), so the IR's weights
    carry the module's own parameter and buffer names; the pruned (and, with ``reconstruct``,
    refit) arrays are written back into a deep copy of the module, and layer attributes
    (``out_channels``, ``in_features``, ``groups``, ``num_features``) are made to match their
    weights. The result runs, trains, and computes what the pruned IR computes. Calibration
    batches are dicts keyed by the forward arguments' names, or tensors / tuples in argument
    order (a DataLoader works). The input module is not modified.

    ``criterion="taylor"`` ranks channels by first-order Taylor importance from the module's
    gradients on the calibration batches (the fit share of them, see ``PassContext``);
    ``loss_fn(output) -> scalar`` is the loss to differentiate, by default the cross-entropy
    against the model's own predictions. ``remove_layers`` deletes the chosen layers from their
    ``ModuleList``. The pruned module is checked against the pruned graph in ONNX Runtime on the
    example inputs (``ValidationError`` if its code cannot follow the new sizes).
    """
    from sparsec.frontends.fx import capture_fx
    from sparsec.passes.criteria import taylor_scores
    from sparsec.passes.manager import PassContext

    if recipe is not None:      # the recipe's values, the keywords given beside it on top
        given = {k: v for k, v in locals().items() if k in RECIPE_KEYS}
        merged = merge_recipe(recipe, given).options()
        unsupported = sorted(k for k, v in merged.items() if k not in given
                             and v != getattr(Recipe(), k))
        if unsupported:
            raise BadOptionError(f"prune_module does not take recipe key '{unsupported[0]}'")
        return prune_module(module, example_inputs, **{k: merged[k] for k in given},
                            calibration=calibration, metric=metric, loss_fn=loss_fn,
                            log=log)
    graph = capture_fx(module, example_inputs)
    scores = None
    if criterion in NEEDS_TORCH and ratio + (head_ratio or 0) + sum(
            (layer_ratios or {}).values()) > 0:
        if remove_dead:
            raise BadOptionError("criterion 'taylor' scores the captured module: do not "
                                 "combine it with remove_dead")
        calib = _calibration(graph, calibration)
        calibration = calib if calibration is not None else None  # an iterator is read once
        groups = [g for g in DependencyGraph(graph).groups if g.prunable]
        scores = taylor_scores(module, graph, groups, PassContext.split(calib).fit, loss_fn)
    result = prune(graph, ratio=ratio, criterion=criterion, reconstruct=reconstruct,
                   round_to=round_to, head_ratio=head_ratio, hidden_ratio=hidden_ratio,
                   sensitivity=sensitivity,
                   remove_layers=remove_layers,
                   layer_ratios=layer_ratios, ignore=ignore, calibration=calibration,
                   calib_mask=calib_mask, max_drop=max_drop, metric=metric,
                   remove_dead=remove_dead, scores=scores, log=log)
    maps = [m for p in result.passes for m in p.details.get("output_maps", [])]
    if maps:
        raise BadOptionError(
            f"the module returns its hidden stream ('{maps[0]['output']}'), so hidden_ratio "
            f"would need an output map the module does not have: prune the ONNX export "
            f"(sparsec.prune), or a module whose head reads the stream")
    pruned = write_back(module, result.graph, drop_layers=bool(remove_layers))
    _check_write_back(pruned, result.graph, example_inputs)
    return pruned, result


def _check_write_back(pruned, graph: Graph, example_inputs: Sequence[Any]) -> None:
    """The pruned module must compute what the pruned graph computes (ONNX Runtime) on the
    example inputs; a module whose code hard-wires a size the weights no longer have fails."""
    import torch

    from sparsec.errors import ValidationError
    from sparsec.frontends.torch import first_tensor

    feeds = {name: np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
             for name, x in zip(graph.inputs, example_inputs)}
    want = reference.run(graph, feeds)[0]
    try:
        with torch.no_grad():
            got = first_tensor(pruned(*example_inputs)).detach().cpu().numpy()
    except Exception as e:  # noqa: BLE001 - any failure means the module cannot take the plan
        raise ValidationError(f"the pruned module does not run: {str(e).splitlines()[0]}") \
            from None
    bound = 1e-4 * max(float(np.abs(want).max(initial=0.0)), 1.0)
    if got.shape != want.shape or float(np.abs(got - want).max()) > bound:
        raise ValidationError("the pruned module does not compute what the pruned graph "
                              "computes (its code fixes a size or structure the pruning "
                              "changed)")


def write_back(module, graph: Graph, drop_layers: bool = False):
    """A deep copy of ``module`` holding ``graph``'s weights (matched by state_dict name);
    with ``drop_layers``, layers whose weights all left the graph leave their ModuleList."""
    import copy

    import torch

    new = copy.deepcopy(module)
    if drop_layers:
        _drop_removed_layers(new, graph)
    # tied parameters (GPT-2's lm_head is its token embedding) go by any of their names, and
    # stay one tensor
    state = {**dict(new.named_parameters(remove_duplicate=False)), **dict(new.named_buffers())}
    aliases: dict[int, list[str]] = {}
    for name, p in new.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for name, arr in graph.initializers.items():
        target = name if name in state else _created_bias(new, name)
        if target is None:
            continue                                   # a constant the lowering introduced
        value = torch.from_numpy(np.array(arr)).to(
            state[target].dtype if target in state else torch.float32)
        owner_name, _, leaf = target.rpartition(".")
        if leaf not in new.get_submodule(owner_name)._parameters:
            new.get_submodule(owner_name)._buffers[leaf] = value
            continue
        param = torch.nn.Parameter(value)
        for alias in aliases.get(id(state.get(target)), [target]):   # keep ties tied
            owner_name, _, leaf = alias.rpartition(".")
            setattr(new.get_submodule(owner_name), leaf, param)
    groups = {n.inputs[1]: int(n.attr("group", 1)) for n in graph.nodes if n.op_type == "Conv"}
    for name, m in new.named_modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            m.groups = groups.get(f"{name}.weight", m.groups)
            m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif isinstance(m, torch.nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.num_features = (m.running_mean if m.running_mean is not None else m.weight).shape[0]
        elif isinstance(m, torch.nn.GroupNorm) and m.weight is not None:
            per_group = m.num_channels // m.num_groups
            m.num_channels = m.weight.shape[0]
            m.num_groups = m.num_channels // per_group
        elif isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, torch.nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):   # transformers' GPT-2 linear
            m.nf = m.weight.shape[1]
    for m in new.modules():
        _heads_follow_weights(m)
        _hidden_follows_weights(m)
    return new


def _hidden_follows_weights(module) -> None:
    """A Hugging Face model's ``config.hidden_size`` follows its input embedding's width, so
    ``save_pretrained`` then ``from_pretrained`` gives the pruned model back."""
    config = getattr(module, "config", None)
    get = getattr(module, "get_input_embeddings", None)
    if config is None or get is None or not hasattr(config, "hidden_size"):
        return
    try:
        emb = get()
    except (NotImplementedError, AttributeError):
        return
    if emb is not None and getattr(emb, "embedding_dim", None):
        config.hidden_size = int(emb.embedding_dim)


def _drop_removed_layers(module, graph: Graph) -> None:
    """Layer removal, written back: an entry of a ``ModuleList`` none of whose parameters is
    in the graph any more (and that had some) is deleted from its list."""
    import torch

    for list_name, seq in list(module.named_modules()):
        if not isinstance(seq, torch.nn.ModuleList):
            continue
        keep = []
        for i, layer in enumerate(seq):
            names = [f"{list_name}.{i}.{p}" for p, _ in layer.named_parameters()]
            if names and not any(n in graph.initializers for n in names):
                continue
            keep.append(layer)
        if len(keep) < len(seq):
            owner_name, _, leaf = list_name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            setattr(owner, leaf, torch.nn.ModuleList(keep))
            _renumber_layers(module, keep, len(seq),
                             [i for i, layer in enumerate(seq) if layer in keep])


def _renumber_layers(module, kept: list, old_count: int, kept_index: list[int]) -> None:
    """After layers left a list: ``layer_idx`` attributes (transformers' KV-cache slots) count
    from 0 again, and a ``config`` that counted the old layers counts the new ones."""
    for new, layer in enumerate(kept):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new
    configs = {id(c): c for m in module.modules() if (c := getattr(m, "config", None))
               is not None and getattr(c, "num_hidden_layers", None) == old_count}
    for c in configs.values():
        c.num_hidden_layers = len(kept)
        types = getattr(c, "layer_types", None)
        if isinstance(types, list) and len(types) == old_count:
            c.layer_types = [types[i] for i in kept_index]


def _out_features(layer) -> int | None:
    w = getattr(layer, "weight", None)
    if w is None:
        return None
    return w.shape[1] if type(layer).__name__ == "Conv1D" else w.shape[0]


def _heads_follow_weights(m) -> None:
    """Attention modules (transformers' naming): head counts follow the projections' widths.
    Their forward passes size heads by ``head_dim`` (views with -1), so these attributes are
    bookkeeping, except GPT-2's ``split_size`` which splits the fused QKV projection."""
    head_dim = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        return
    q = next((getattr(m, n) for n in ("q_proj", "query", "q") if hasattr(m, n)), None)
    k = next((getattr(m, n) for n in ("k_proj", "key", "k") if hasattr(m, n)), None)
    if hasattr(m, "c_attn") and hasattr(m, "split_size"):             # fused QKV (GPT-2)
        width = _out_features(m.c_attn) // 3
        m.split_size = width
        q_heads, kv_heads = width // head_dim, None
    elif q is not None:
        q_heads = _out_features(q) // head_dim
        kv_heads = _out_features(k) // head_dim if k is not None else None
        if hasattr(m, "all_head_size"):
            m.all_head_size = q_heads * head_dim
    else:
        return
    for attr in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(m, attr, None), int):
            setattr(m, attr, q_heads)
    if kv_heads is not None and isinstance(getattr(m, "num_key_value_heads", None), int):
        m.num_key_value_heads = kv_heads

