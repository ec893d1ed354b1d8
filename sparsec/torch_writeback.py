"""Torch modules: ``prune_module`` captures a ``torch.nn.Module`` with the FX frontend, prunes
the graph (``sparsec.pruning``) and writes the pruned weights back into a copy of the module,
layer attributes and head counts made to follow them (``write_back``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sparsec import reference
from sparsec.analysis.depgraph import DependencyGraph
from sparsec.errors import BadOptionError
from sparsec.ir.graph import Graph
from sparsec.loading import Log, _quiet
from sparsec.passes.criteria import NEEDS_TORCH
from sparsec.pruning import RECIPE_KEYS, _calibration, merge_recipe, prune
from sparsec.recipe import Recipe


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
                 loss_fn=None, eval_tokens=None, log: Log = _quiet):
    """Prune a ``torch.nn.Module``: returns ``(pruned_module, PruneResult)``.

    The module is captured with the FX frontend (``sparsec.frontends.fx``), so the IR's weights
    carry the module's own parameter and buffer names; the pruned (and, with ``reconstruct``,
    refit) arrays are written back into a deep copy of the module, and layer attributes
    (``out_channels``, ``in_features``, ``groups``, ``num_features``) are made to match their
    weights. The result runs, trains, and computes what the pruned IR computes. Calibration
    batches are dicts keyed by the forward arguments' names, or tensors / tuples in argument
    order (a DataLoader works). The input module is not modified, and shares no memory with
    the pruned one; ``result.graph``'s weights are the pruned module's own memory, read-only
    (a billion-parameter model's pruned weights are not held twice).

    ``criterion="taylor"`` ranks channels by first-order Taylor importance from the module's
    gradients on the calibration batches (the fit share of them, see ``PassContext``);
    ``loss_fn(output) -> scalar`` is the loss to differentiate, by default the cross-entropy
    against the model's own predictions. ``remove_layers`` deletes the chosen layers from their
    ``ModuleList``. The pruned module is checked against the pruned graph in ONNX Runtime on the
    example inputs (``ValidationError`` if its code cannot follow the new sizes).

    A Hugging Face causal LM (Llama, Mistral, Qwen2, GPT-2 and alike) can be passed as it is
    (its KV cache is off while it is captured). The returned model's config follows its
    weights: head counts, ``head_dim``, the intermediate size, ``num_hidden_layers``, and the
    layers left count from 0 (``layer_idx``, their KV-cache slots), so ``save_pretrained`` then
    ``from_pretrained`` gives it back and ``generate`` works. transformers states each size once
    for all layers: where the pruned layers differ (``sensitivity``, ``layer_ratios``) or the
    config has no word for it (GPT-2 with fewer heads), ``save_pretrained`` raises
    ``OutputError`` saying so, and nothing is written (``torch.save`` still works).
    ``eval_tokens`` (token ids) puts the model's perplexity before and after pruning into the
    result (see ``sparsec.prune``).
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
                            eval_tokens=eval_tokens, log=log)
    config = getattr(module, "config", None)
    cached = getattr(config, "use_cache", None) is True
    if cached:                # a KV cache among the outputs cannot be captured: off meanwhile
        config.use_cache = False
    try:
        graph = capture_fx(module, example_inputs)
    finally:
        if cached:
            config.use_cache = True
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
                   remove_dead=remove_dead, scores=scores, eval_tokens=eval_tokens, log=log)
    maps = [m for p in result.passes for m in p.details.get("output_maps", [])]
    if maps:
        raise BadOptionError(
            f"the module returns its hidden stream ('{maps[0]['output']}'), so hidden_ratio "
            f"would need an output map the module does not have: prune the ONNX export "
            f"(sparsec.prune), or a module whose head reads the stream")
    pruned = write_back(module, result.graph, drop_layers=bool(remove_layers), log=log)
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


def write_back(module, graph: Graph, drop_layers: bool = False, log: Log = _quiet):
    """A deep copy of ``module`` holding ``graph``'s weights (matched by state_dict name);
    with ``drop_layers``, layers whose weights all left the graph leave their ModuleList.
    Hugging Face models inside it get a config that describes the new sizes
    (``_configs_follow_weights``), or a ``save_pretrained`` that says why none can."""
    import copy

    import torch

    # the weights the graph gives are not copied only to be replaced (memory at scale)
    memo = {id(p): torch.nn.Parameter(torch.empty(0), requires_grad=p.requires_grad)
            for name, p in module.named_parameters(remove_duplicate=False)
            if name in graph.initializers}
    new = copy.deepcopy(module, memo)
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
        value = _owned(arr).to(
            state[target].dtype if target in state else torch.float32)
        owner_name, _, leaf = target.rpartition(".")
        if leaf not in new.get_submodule(owner_name)._parameters:
            new.get_submodule(owner_name)._buffers[leaf] = value
            continue
        param = torch.nn.Parameter(value)
        for alias in aliases.get(id(state.get(target)), [target]):   # keep ties tied
            owner_name, _, leaf = alias.rpartition(".")
            setattr(new.get_submodule(owner_name), leaf, param)
    if drop_layers:     # after the weights: the names are the graph's, from before renumbering
        _drop_removed_layers(new, graph)
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
    for problem in _configs_follow_weights(new):
        log(f"warning: {problem}")
    return new


def _owned(arr: np.ndarray):
    """An initializer as a tensor the pruned module may own: an array a pass made (writeable)
    is taken as it is, and from then on is read-only on the graph's side (the graph views the
    pruned module's weights, as a captured graph views the input module's, so a
    billion-parameter model's pruned weights are not held twice); a read-only one (a view of
    the input module's memory, which the pruned module must not share) is copied."""
    import torch

    if not arr.flags.writeable:
        return torch.from_numpy(np.array(arr))
    tensor = torch.from_numpy(arr)
    arr.flags.writeable = False
    return tensor


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


def _head_counts(m) -> tuple[int, int | None, int] | None:
    """(query heads, key/value heads or None, head_dim) of an attention module (transformers'
    naming), read from its projections' widths; None for any other module."""
    head_dim = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        return None
    q = next((getattr(m, n) for n in ("q_proj", "query", "q") if hasattr(m, n)), None)
    k = next((getattr(m, n) for n in ("k_proj", "key", "k") if hasattr(m, n)), None)
    if hasattr(m, "c_attn") and hasattr(m, "split_size"):             # fused QKV (GPT-2)
        return _out_features(m.c_attn) // 3 // head_dim, None, head_dim
    if q is None:
        return None
    return (_out_features(q) // head_dim,
            _out_features(k) // head_dim if k is not None else None, head_dim)


def _heads_follow_weights(m) -> None:
    """Attention modules (transformers' naming): head counts follow the projections' widths.
    Their forward passes size heads by ``head_dim`` (views with -1), so these attributes are
    bookkeeping, except GPT-2's ``split_size`` which splits the fused QKV projection."""
    counts = _head_counts(m)
    if counts is None:
        return
    q_heads, kv_heads, head_dim = counts
    if hasattr(m, "c_attn") and hasattr(m, "split_size"):
        m.split_size = q_heads * head_dim
    elif hasattr(m, "all_head_size"):
        m.all_head_size = q_heads * head_dim
    for attr in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(m, attr, None), int):
            setattr(m, attr, q_heads)
    if kv_heads is not None and isinstance(getattr(m, "num_key_value_heads", None), int):
        m.num_key_value_heads = kv_heads


#: an FFN's first projection (transformers' naming): its width is the intermediate size
_FFN_IN = ("up_proj", "c_fc", "fc1")


def _layer_sizes(model) -> dict[str, list[int]]:
    """Per decoder layer, in order: the sizes a Hugging Face config states once for all (an
    MLP's own ``intermediate_size`` attribute is set to its width on the way)."""
    sizes: dict[str, list[int]] = {"num_attention_heads": [], "num_key_value_heads": [],
                                   "head_dim": [], "intermediate_size": []}
    for m in model.modules():
        if (counts := _head_counts(m)) is not None:
            for key, value in zip(("num_attention_heads", "num_key_value_heads", "head_dim"),
                                  counts):
                if value is not None:
                    sizes[key].append(value)
        ffn_in = next((getattr(m, n) for n in _FFN_IN if hasattr(m, n)), None)
        if ffn_in is not None and (width := _out_features(ffn_in)) is not None:
            sizes["intermediate_size"].append(int(width))
            if isinstance(getattr(m, "intermediate_size", None), int):
                m.intermediate_size = int(width)
    return sizes


def _configs_follow_weights(module) -> list[str]:
    """Every Hugging Face model in ``module`` gets a config that builds a model of its own
    weights' shapes: head counts, ``head_dim`` and the intermediate size, each where all layers
    agree (transformers' Llama, Mistral, Qwen2 and GPT-2 configs state one value for every
    layer). Checked by building the model from the config on the meta device; where the config
    cannot say it (sizes that differ between layers, GPT-2 with fewer heads), the model's
    ``save_pretrained`` raises ``OutputError`` with the reason instead of writing a checkpoint
    ``from_pretrained`` cannot load. Returns those reasons."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    inner = {id(c) for m in module.modules() if isinstance(m, PreTrainedModel)
             for c in m.modules() if c is not m}
    problems = []
    for hf in module.modules():
        if not isinstance(hf, PreTrainedModel) or id(hf) in inner:
            continue
        uneven = _config_follows_sizes(hf)
        mismatch = _config_mismatch(hf) or _config_invalid(hf.config)
        if mismatch is None:
            continue
        name = type(hf).__name__
        if uneven:
            key, values = next(iter(uneven.items()))
            reason = (f"{name}'s config states one {key} for all layers, but the pruned layers "
                      f"have {values}: prune with one ratio everywhere (no sensitivity or "
                      f"layer_ratios) to save it with save_pretrained, or save the module with "
                      f"torch.save")
        else:
            reason = (f"{name}'s config cannot describe the pruned weights ({mismatch}): save "
                      f"the module with torch.save")
        _refuse_save(hf, reason)
        problems.append(f"save_pretrained refused: {reason}")
    return problems


def _config_follows_sizes(hf) -> dict[str, list[int]]:
    """``hf.config`` states the head counts, ``head_dim`` and intermediate size of ``hf``'s
    layers where they all agree; returns the sizes that differ between layers (per layer)."""
    config, sizes = hf.config, _layer_sizes(hf)
    uneven = {k: v for k, v in sizes.items() if len(set(v)) > 1}
    for key, values in sizes.items():
        if not values or key in uneven:
            continue
        if key == "intermediate_size" and not hasattr(config, key):
            key = "n_inner" if hasattr(config, "n_inner") else key     # GPT-2
        implied = config.hidden_size // max(sizes["num_attention_heads"][:1] or [1])
        if hasattr(config, key) or key == "head_dim" and values[0] != implied:
            setattr(config, key, values[0])
    return uneven


def _config_mismatch(hf) -> str | None:
    """How a model built from ``hf.config`` (on the meta device) differs from ``hf``'s
    weights, or None; None too when the model cannot be built that way."""
    import copy

    import torch

    try:
        with torch.device("meta"):
            fresh = type(hf)(copy.deepcopy(hf.config))
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta goes unchecked
        return None
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    for key in sorted(want.keys() | got.keys()):
        if want.get(key) != got.get(key):
            return (f"{key}: {want.get(key, 'absent')} in the pruned model, "
                    f"{got.get(key, 'absent')} from the config")
    return None


def _config_invalid(config) -> str | None:
    """Why transformers would refuse to write ``config`` (its own ``validate``, which
    ``save_pretrained`` calls: e.g. Llama's hidden size must be a multiple of the head count,
    even with ``head_dim`` stated), or None."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return None
    try:
        validate()
    except Exception as e:  # noqa: BLE001 - any refusal is a reason not to write
        cause = e.__cause__ or e
        lines = str(cause).strip().splitlines()
        return lines[-1].strip() if lines else type(cause).__name__
    return None


def _refuse_save(hf, reason: str) -> None:
    """``hf.save_pretrained`` raises ``OutputError(reason)`` (and writes nothing)."""
    from sparsec.errors import OutputError

    def save_pretrained(*args, **kwargs):
        raise OutputError(f"save_pretrained: {reason}")

    hf.save_pretrained = save_pretrained
