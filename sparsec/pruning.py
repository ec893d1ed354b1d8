"""Pruning: the options (a ``Recipe``, or keywords) checked against the graph, built into the
list of passes and run by the pass manager (``sparsec/passes/``); the result is a
:class:`PruneResult`. ``max_drop`` searches the ratio by bisection. Calibration data in any
form a user has is turned into model-sized feeds here (``_calibration``).
"""

from __future__ import annotations

import inspect as pyinspect
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sparsec import reference
from sparsec.analysis.cost import Cost, cost
from sparsec.analysis.depgraph import DependencyGraph
from sparsec.dynamic_prune import calibration_at_one_size, carry_back, dynamic_dims
from sparsec.errors import BadOptionError, DynamicShapeError
from sparsec.frontends.external_data import save_onnx
from sparsec.frontends.onnx import InputShapes
from sparsec.ir.graph import Graph
from sparsec.loading import Log, ModelLike, _quiet, load
from sparsec.package import check_writable_file, read_calibration
from sparsec.passes.channel_prune import ChannelPrune
from sparsec.passes.criteria import CRITERIA, NEEDS_DATA, NEEDS_TORCH
from sparsec.passes.dead_channels import RemoveDeadChannels
from sparsec.passes.ffn_fusion import FuseFFN, fusible_runs
from sparsec.passes.layer_removal import RemoveAttention, RemoveLayers, find_blocks, find_layers
from sparsec.passes.manager import FEW_SAMPLES, PassManager, PassResult
from sparsec.passes.reorder import ReorderChannels, weight_matrices
from sparsec.passes.sparsify import CRITERIA as SPARSITY_CRITERIA
from sparsec.passes.sparsify import Sparsify, parse_pattern
from sparsec.recipe import Recipe
from sparsec.reference import signature

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
    #: with a latency budget (``prune``): the search's record (``sparsec.latency``)
    latency: dict | None = None
    #: with ``eval_tokens``: {"before", "after": perplexity, "tokens": tokens predicted}
    perplexity: dict | None = None
    #: a model with dynamic dims: the pruned model with them (``sparsec.dynamic_prune``);
    #: ``graph`` is the pruned graph at the one size it was pruned at
    onnx: Any = None
    #: with ``hf_config``: the pruned model's Hugging Face config written beside ``output``
    hf_config: Path | None = None

    def report(self) -> dict:
        out = {"before": self.before.as_dict(), "after": self.after.as_dict(),
               "fidelity": {**self.fidelity.as_dict(), "measured_on": self.measured_on,
                            "held_out": self.held_out},
               "passes": [p.as_dict() for p in self.passes], "load": self.load}
        if self.search:
            out["search"] = self.search
        if self.latency is not None:
            out["latency"] = self.latency
        if self.recipe is not None:
            out["recipe"] = self.recipe.to_dict()
        if self.perplexity is not None:
            out["perplexity"] = self.perplexity
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
    sig = signature(graph, graph.inputs)
    batches = (read_calibration(calibration, sig)
               if isinstance(calibration, (str, os.PathLike)) else _batches(graph, calibration, sig))
    for i, feeds in enumerate(batches):     # token ids within their tables (ORT refuses others)
        try:
            reference.check_ranges(feeds, sig)
        except BadOptionError as e:
            raise BadOptionError(f"calibration sample {i}: {e}") from None
    return batches


def _batches(graph: Graph, calibration, sig: list[dict]) -> list[dict[str, np.ndarray]]:
    """In-memory calibration (``_calibration``) as model-sized feeds, each checked."""
    if isinstance(calibration, dict):
        calibration = [calibration]
    specs = {s["name"]: s for s in sig}
    batches = []
    for i, item in enumerate(calibration):
        if not isinstance(item, dict):
            items = list(item) if isinstance(item, (tuple, list)) else [item]
            if len(items) < len(graph.inputs):
                raise BadOptionError(f"a calibration batch has {len(items)} item(s), the model "
                                     f"takes {len(graph.inputs)} input(s)")
            item = dict(zip(graph.inputs, items))
        try:
            batches.extend(_chunks(graph, item, specs))
        except BadOptionError as e:
            raise BadOptionError(f"calibration batch {i}: {e}") from None
    if not batches:
        raise BadOptionError("the calibration data is empty")
    return batches


def _chunks(graph: Graph, item: dict, specs: dict[str, dict]) -> list[dict[str, np.ndarray]]:
    """One calibration item as feeds of the model's static shapes: a batch larger than the
    model's (a DataLoader of 32 for a model captured at batch 1) is cut into model batches,
    each checked as an ``--calib`` file's arrays are (``reference.cast_input``: no NaN, no
    7.5 for an integer input)."""
    parts: dict[str, list[np.ndarray]] = {}
    for name in graph.inputs:
        if name not in item:
            raise BadOptionError(f"a calibration batch has no input '{name}' "
                                 f"(has: {', '.join(item) or '-'})")
        value = item[name]
        if hasattr(value, "detach"):                   # a torch tensor
            value = value.detach().cpu().numpy()
        want = graph.shape(name)
        arr = np.asarray(value)
        if arr.shape == want:
            parts[name] = [reference.cast_input(name, arr, specs[name])]
        elif (arr.ndim == len(want) and arr.shape[1:] == want[1:] and want[0] > 0
              and arr.shape[0] % want[0] == 0):
            parts[name] = [reference.cast_input(name, a, specs[name])
                           for a in np.split(arr, arr.shape[0] // want[0])]
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
    if criterion == "sparsegpt" and (kind == "block" or lamp):
        raise BadOptionError(f"sparsity criterion sparsegpt chooses unstructured and N:M masks: "
                             f"{'lamp' if lamp else f'pattern {pattern}'} does not go with it")
    if kind == "nm" and lamp:
        raise BadOptionError("lamp allocation applies to unstructured and block patterns, "
                             "not N:M")
    return kind, nums


def prune(model: ModelLike, output: str | os.PathLike | None = None, *, recipe=None,
          ratio: float = 0.0,
          criterion: str = "l2", reconstruct: bool = False, round_to: int | None = None,
          head_ratio: float | None = None, hidden_ratio: float = 0.0, rotate: bool = False,
          remove_layers: int = 0, replace_linear: bool = False,
          remove_attention: int = 0, fuse_ffn: int = 0, sensitivity: bool = False,
          sparsity: float = 0.0, sparsity_pattern: str = "unstructured",
          sparsity_criterion: str = "magnitude", lamp: bool = False, reorder: bool = False,
          layer_ratios: dict[str, float] | None = None, ignore: Sequence[str] = (),
          input_shapes: InputShapes | str | None = None,
          calibration=None, calib_mask: str | None = None, max_drop: float | None = None,
          metric: Callable[[Graph], float] | None = None, remove_dead: bool = False,
          example_inputs: Sequence[Any] | None = None, scores=None, eval_tokens=None,
          latency_budget: float | None = None, speedup: float | None = None,
          target: str = "host", hf_config: str | os.PathLike | None = None,
          log: Log = _quiet) -> PruneResult:
    """Prune the least important channels of every channel group; optionally write ONNX.

    ``layer_ratios`` {glob over group source weights: ratio} overrides the ratio per group;
    ``head_ratio`` is the ratio for attention-head groups (default: ``ratio``);
    ``hidden_ratio`` cuts hidden widths, the residual streams under LayerNorms that
    ``ratio`` leaves whole (lossy even for empty channels: the norms' statistics change);
    ``rotate`` first rotates each such stream to its principal directions on the calibration
    data and cuts the weakest directions instead of channels (SliceGPT; RMS and pre-norm
    LayerNorm streams, the others are cut as they are: ``sparsec.passes.rotate``);
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
    ``sparsity_criterion`` (``"magnitude"``, ``"wanda"``, or ``"sparsegpt"``, which also
    updates the weights that stay by SparseGPT's second-order rule; unstructured and N:M), the
    same share in every layer or, with ``lamp``, layer-adaptive (see
    ``sparsec.passes.sparsify``);
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

    ``eval_tokens``: for a causal language model (token ids in, logits out), evaluation text
    as token ids (sequences, a 2-D array of rows, or an .npy / .npz file of them): the result's
    ``perplexity`` is the model's before and after pruning (``sparsec.evaluate.perplexity``,
    windows of the model's sequence length), and the report shows it.

    ``latency_budget`` (ms) or ``speedup``: instead of pruning at ``ratio``, the least pruning
    whose latency, built and measured on ``target`` (one that runs here), meets the budget,
    as ``compile`` finds it (``sparsec.latency``; ``round_to`` then defaults to the target's
    channel multiple); ``result.latency`` records the search.

    ``recipe``: the options as a ``Recipe``, a dict, or a TOML file (``sparsec.recipe``);
    keywords given beside it that differ from their defaults override its keys.
    ``result.recipe`` is the recipe that ran.

    ``hf_config``: the model's Hugging Face ``config.json`` (a model exported with
    torch.onnx): the pruned model's config, with its head counts, intermediate and hidden
    size and layer count, is written as ``config.json`` beside ``output``
    (``sparsec.hf_config``; ``result.hf_config``). Nothing is written when the config cannot
    describe the pruned weights.
    """
    if hf_config is not None:
        from sparsec import hf_config as companion

        args = {k: v for k, v in locals().items() if k not in ("hf_config", "companion")}
        if output is not None:
            check_writable_file(output, model if isinstance(model, (str, os.PathLike)) else None)
        config = companion.read(hf_config, output)
        result = prune(**{**args, "output": None})
        config = companion.pruned_config(config, result.graph, companion.source(model), log)
        _write(result, output)
        result.hf_config = companion.write(config, output)
        return result
    given = {k: v for k, v in locals().items() if k in RECIPE_KEYS}
    if recipe is not None:
        merged = merge_recipe(recipe, given)
        return prune(model, output, **merged.options(), input_shapes=input_shapes,
                     calibration=calibration, metric=metric, example_inputs=example_inputs,
                     scores=scores, eval_tokens=eval_tokens, latency_budget=latency_budget,
                     speedup=speedup, target=target, log=log)
    if latency_budget is not None or speedup is not None:
        return _to_budget(model, output, given, latency_budget, speedup, target, metric,
                          scores, input_shapes, calibration, example_inputs, log, eval_tokens)
    if max_drop is not None:
        options = {k: v for k, v in given.items() if k != "max_drop"}
        return _search_ratio(model, output, max_drop, metric, {
            **options, "input_shapes": input_shapes, "calibration": calibration,
            "example_inputs": example_inputs, "scores": scores}, log, Recipe.of_keywords(given),
            eval_tokens)
    if metric is not None:
        raise BadOptionError("metric is what max_drop bounds: give max_drop too")
    ratio = _check_ratio(ratio)
    head_ratio = None if head_ratio is None else _check_ratio(head_ratio)
    hidden_ratio = _check_ratio(hidden_ratio)
    if rotate and not hidden_ratio:
        raise BadOptionError("--rotate rotates the hidden width before cutting it: give "
                             "--hidden-ratio too")
    layer_ratios = dict(layer_ratios or {})
    if criterion not in CRITERIA:
        raise BadOptionError(f"unknown criterion '{criterion}' (known: {', '.join(CRITERIA)})")
    if criterion in NEEDS_TORCH and scores is None:
        raise BadOptionError(f"criterion '{criterion}' needs gradients, which only a torch "
                             f"module gives: use sparsec.prune_module(module, ...)")
    round_to = 1 if round_to is None else round_to
    if int(round_to) < 1:
        raise BadOptionError(f"round_to must be a positive integer, got {round_to}")
    graph, dynamic, calibration, calib_mask = _load_to_prune(
        model, output, input_shapes, example_inputs, calibration, calib_mask)
    fixed_by_user = input_shapes is not None
    before_ppl = _perplexity(graph, eval_tokens)       # checks the model and tokens first
    _check_patterns(graph, layer_ratios, ignore)
    _check_structure(graph, remove_layers, remove_attention, fuse_ffn)
    kind, nm = _check_sparsity(sparsity, sparsity_pattern, sparsity_criterion, lamp)
    calib = _calibration(graph, calibration)
    if ((reconstruct or criterion in NEEDS_DATA) and ratio > 0 or remove_layers or rotate
            or remove_attention or fuse_ffn or (sparsity or kind == "nm") and (
                sparsity_criterion in ("wanda", "sparsegpt") or reconstruct)) \
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
                                   sensitivity=bool(sensitivity), rotate=bool(rotate)))
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
    if before_ppl is not None:
        result.perplexity = _perplexity_pair(before_ppl, pruned, eval_tokens, log)
    if not manager.held_out and any(not p.exact for p in passes):
        log("warning: one calibration sample: nothing to hold out, so the fidelity of this "
            "lossy pruning is not measured; give more calibration data (--calib)")
    elif (calibration is not None and manager.samples_held_out < FEW_SAMPLES
          and any(not p.exact for p in passes)):
        log(f"warning: fidelity measured on only {manager.samples_held_out} held-out "
            f"calibration samples: a rough figure, and only for data like the calibration "
            f"data; give more (--calib) for one you can rely on")
    if dynamic is not None:
        try:
            result.onnx = carry_back(dynamic[0], graph, pruned, result.sample)
        except DynamicShapeError:
            if not fixed_by_user:
                raise
            log("note: the pruned model has the fixed shapes of --input-shapes (the passes "
                "cannot be carried back into the model's dynamic dims)")
    _write(result, output)
    return result


def _write(result: PruneResult, output) -> None:
    """The pruned model as ``output`` (nothing when it is None)."""
    if output is None:
        return
    if result.onnx is not None:         # the dynamic model, its dims kept
        save_onnx(result.onnx, output)
    else:
        _save(result.graph, output)
    result.output = Path(output)


def _save(graph: Graph, output) -> None:
    """``graph`` as an ONNX file, its weights written from where they are (no model copy)."""
    proto, weights = reference.skeleton(graph)
    save_onnx(proto, output, weights=weights)


def _load_to_prune(model: ModelLike, output, input_shapes, example_inputs, calibration,
                   calib_mask, fixed_shape_for: str | None = None):
    """The graph to prune (the output path checked first), with ``(graph, dynamic dims or
    None, calibration, calib_mask)``: a model with dynamic dims and no ``input_shapes`` is
    loaded at its calibration data's size, the padding of shorter samples masked (refused
    when ``fixed_shape_for`` names what needs one fixed shape)."""
    if output is not None:
        check_writable_file(output, model if isinstance(model, (str, os.PathLike)) else None)
    dynamic = dynamic_dims(model) if example_inputs is None else None
    if dynamic is not None and input_shapes is None and fixed_shape_for:
        raise DynamicShapeError(f"{fixed_shape_for} is measured at one shape: give the "
                                f"model's dynamic dims a size with --input-shapes")
    if dynamic is not None and input_shapes is None:   # pruned at the calibration data's size
        calibration, input_shapes, padding = calibration_at_one_size(*dynamic, calibration,
                                                                     calib_mask)
        calib_mask = padding or calib_mask
    return load(model, input_shapes, example_inputs), dynamic, calibration, calib_mask


def _to_budget(model: ModelLike, output, options: dict, latency_budget, speedup, target: str,
               metric, scores, input_shapes, calibration, example_inputs,
               log: Log, eval_tokens=None) -> PruneResult:
    """``prune(..., latency_budget=...)``: ``sparsec.latency.budget_search`` on ``target``."""
    from sparsec import latency
    from sparsec.targets import resolve_target

    if metric is not None:
        raise BadOptionError("metric is what max_drop bounds, not a latency budget")
    if scores is not None:
        raise BadOptionError("a latency budget prunes by the ONNX route: scores (taylor) "
                             "are not taken")
    spec = resolve_target(target)
    if options.get("round_to") is None:
        options = {**options, "round_to": spec.channel_multiple}
    graph, _, calibration, _ = _load_to_prune(model, output, input_shapes, example_inputs,
                                              calibration, None, "a latency budget")
    before_ppl = _perplexity(graph, eval_tokens)
    result, record, _ = latency.budget_search(graph, {**options, "calibration": calibration},
                                              spec, latency_budget, speedup, log)
    result.latency = {**{k: v for k, v in record.items() if k != "table"},
                      "target": spec.name}
    if before_ppl is not None:
        result.perplexity = _perplexity_pair(before_ppl, result.graph, eval_tokens, log)
    _write(result, output)
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


def _perplexity(graph: Graph, eval_tokens):
    """The graph's perplexity on ``eval_tokens`` (None without them); BadOptionError if the
    model is no causal LM sparsec can feed them to."""
    if eval_tokens is None:
        return None
    from sparsec.evaluate import perplexity, read_token_ids

    try:
        return perplexity(graph, read_token_ids(eval_tokens))
    except BadOptionError as e:
        raise BadOptionError(f"eval tokens: {e}") from None


def _perplexity_pair(before, pruned: Graph, eval_tokens, log: Log) -> dict:
    from sparsec.evaluate import perplexity, read_token_ids

    after = perplexity(pruned, read_token_ids(eval_tokens))
    log(f"perplexity on {after.tokens} evaluation tokens: {before.perplexity:.4f} -> "
        f"{after.perplexity:.4f}")
    return {"before": before.perplexity, "after": after.perplexity, "tokens": after.tokens}


def _search_ratio(model: ModelLike, output, max_drop, metric, options: dict,
                  log: Log, recipe: Recipe, eval_tokens=None) -> PruneResult:
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
    before_ppl = _perplexity(graph, eval_tokens)
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
    if before_ppl is not None:
        result.perplexity = _perplexity_pair(before_ppl, result.graph, eval_tokens, log)
    _write(result, output)
    return result
