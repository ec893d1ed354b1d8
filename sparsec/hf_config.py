"""A pruned ONNX model's companion Hugging Face config (``prune --hf-config config.json``).

The ONNX route prunes an exported model; the config that came with it (``config.json``) still
describes the model before pruning. Given that config, sparsec writes the pruned model's beside
the pruned ONNX file, the way ``prune_module`` rewrites a torch model's (``torch_writeback``):

1. the model the config describes is built on the meta device (no weights are made);
2. its parameters are found among the pruned graph's initializers: by name (torch.onnx keeps
   the module path, under any wrapper's prefix: ``lm.model.layers.0.mlp.up_proj.weight``),
   or, for the weights the exporter transposed and renamed (``val_105``), through the
   module path torch.onnx records in the input model's node metadata; each takes its pruned
   shape, a weight matrix turned the way its torch layer holds it
   (``reorder.weight_matrices`` says which ONNX axis is the output);
3. layers none of whose parameters are left are removed (``num_hidden_layers`` follows),
   attention modules count their heads from their projections, and the config states the
   head counts, ``head_dim``, intermediate and hidden size (``_config_follows_sizes``);
4. a model built from the new config must have the pruned shapes for every parameter found,
   else nothing is written (``OutputError``). Sizes that differ between layers (sensitivity
   or per-layer ratios) cannot be stated by transformers' configs, which hold one value for
   all layers: they are written per layer under ``sparsec_layer_sizes`` and the standard
   keys keep the values before pruning (a warning says so).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from sparsec.errors import BadOptionError, OutputError
from sparsec.ir.graph import Graph

#: the file written beside the pruned ONNX model
FILENAME = "config.json"


def read(path: str | os.PathLike, output: str | os.PathLike | None):
    """The ``transformers`` config in ``path``, checked before any pruning: a readable
    config of a model type transformers knows, an output to write beside that is not the
    input config itself."""
    p = Path(path)
    if output is None:
        raise BadOptionError("--hf-config writes the pruned model's config beside the pruned "
                             "ONNX file: give an output path")
    if not p.is_file():
        raise BadOptionError(f"--hf-config {p}: no such file")
    target = companion_path(output)
    if target.exists() and target.samefile(p):
        raise BadOptionError(f"--hf-config {p}: the pruned model's config would overwrite it "
                             f"(write the pruned model to another directory)")
    try:
        import transformers

        with open(p) as f:
            data = json.load(f)
        return transformers.AutoConfig.for_model(**data)
    except ImportError:
        raise BadOptionError("--hf-config needs the transformers package") from None
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadOptionError(f"--hf-config {p}: not a Hugging Face config ({first})") from None


def source(model):
    """The input ONNX model without its weights (for its node metadata), or None."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)) and Path(model).is_file():
        try:
            return onnx.load(str(model), load_external_data=False)
        except Exception:  # noqa: BLE001 - loading already checked the model; names only
            return None
    return None


def companion_path(output: str | os.PathLike) -> Path:
    return Path(output).parent / FILENAME


def pruned_config(config, graph: Graph, source=None, log=lambda msg: None):
    """A copy of ``config`` describing ``graph``'s weights (module docstring); ``source``: the
    exported ONNX model before pruning (its node metadata names the modules, ``_match``)."""
    import copy

    import torch

    from sparsec.passes.reorder import weight_matrices
    from sparsec.torch_writeback import (_config_follows_sizes, _drop_removed_layers,
                                         _heads_follow_weights)

    config = copy.deepcopy(config)
    with torch.device("meta"):
        model = _build(config)
    names = _match(model, graph, source)
    if not any(p.ndim == 2 for n, p in model.named_parameters() if n in names):
        raise OutputError("--hf-config: no weight of the pruned model is named after a "
                          "parameter of the config's model (export it with torch.onnx, which "
                          "keeps module paths as initializer names)")
    axes = weight_matrices(graph)
    shapes = {}
    for name, param in list(model.named_parameters()):
        if name not in names:
            continue
        shape = tuple(graph.shape(names[name]))
        if len(shape) == 2 and _transposed(model, name, param, names[name], shape, axes):
            shape = shape[::-1]
        if len(shape) != param.ndim:
            raise OutputError(f"--hf-config: {names[name]} is {list(shape)} in the pruned model "
                              f"but {name} has {param.ndim} dimensions in the config's model")
        shapes[name] = shape
        _resize(model, name, shape)
    # a layer is gone when none of its parameters is left; a vector shared with other
    # parameters does not count (equal norm weights, all ones in a fresh model, are one
    # initializer after export, read by every layer still there)
    users = Counter(names.values())
    left = {n for n, p in model.named_parameters()
            if n in names and (p.ndim == 2 or users[names[n]] == 1)}
    _drop_removed_layers(model, SimpleNamespace(initializers=left))
    for m in model.modules():
        _heads_follow_weights(m)
    hidden = _hidden_size(model, shapes)
    if hidden is not None and hasattr(model.config, "hidden_size"):
        model.config.hidden_size = hidden
    uneven = _config_follows_sizes(model)
    out = model.config
    if uneven:
        out.sparsec_layer_sizes = uneven
        log(f"warning: {FILENAME}: the pruned layers differ in "
            f"{', '.join(sorted(uneven))}, which a transformers config states once for all "
            f"layers: the per-layer sizes are under sparsec_layer_sizes")
        return out
    with torch.device("meta"):
        fresh = dict(_build(copy.deepcopy(out)).named_parameters())
    kept = dict(model.named_parameters())
    for name in sorted(shapes):
        if name not in kept:           # its layer was removed
            continue
        got = tuple(fresh[name].shape) if name in fresh else "absent"
        if got != tuple(kept[name].shape):
            raise OutputError(f"--hf-config: the config cannot describe the pruned weights "
                              f"({name}: {list(kept[name].shape)} in the pruned model, "
                              f"{got} from the config); nothing written")
    return out


def write(config, output: str | os.PathLike) -> Path:
    """``config`` as ``config.json`` beside ``output``, atomically."""
    path = companion_path(output)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        config.to_json_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def _build(config):
    import transformers

    arch = next(iter(getattr(config, "architectures", None) or []), None)
    cls = getattr(transformers, arch, None) if arch else None
    try:
        if cls is not None:
            return cls(config)
        return transformers.AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - any refusal to build is the user's config
        raise BadOptionError(f"--hf-config: transformers cannot build a model from it "
                             f"({str(e).strip().splitlines()[0] if str(e).strip() else e})"
                             ) from None


def _match(model, graph: Graph, source=None) -> dict[str, str]:
    """Parameter name -> the initializer of ``graph`` that holds it: one named after it
    (itself, or under a wrapper's prefix), else, in the exported ``source`` model, the weight
    (2-D) or bias (1-D) of a node whose torch.onnx metadata names the module that ran it
    (``pkg.torch.onnx.name_scopes``: the exporter renames weights it transposes)."""
    params = [name for name, _ in model.named_parameters()]
    by_suffix: dict[str, set[str]] = {}

    def add(path: str, init: str) -> None:
        parts = path.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), set()).add(init)

    for init in graph.initializers:
        add(init, init)
    for path, init in _scoped_weights(source, set(graph.initializers)):
        add(path, init)
    out = {}
    for name in params:
        found = by_suffix.get(name, set())
        if len(found) == 1:
            out[name] = next(iter(found))
    return out


def _scoped_weights(source, names: set[str]):
    """(module path + ".weight" / ".bias", initializer) from the nodes of an ONNX model
    exported by torch.onnx that read an initializer still in ``names``."""
    import ast

    if source is None:
        return
    dims = {t.name: len(t.dims) for t in source.graph.initializer}
    for node in source.graph.node:
        meta = {m.key: m.value for m in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        if not scopes:
            continue
        try:
            scopes = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            continue
        module = next((s for s in reversed(scopes[:-1]) if s), None)   # the last is the op
        if module is None:
            continue
        for init in node.input:
            if init in names and dims.get(init) in (1, 2):
                yield f"{module}.{'weight' if dims[init] == 2 else 'bias'}", init


def _owner(model, name: str):
    owner, _, leaf = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), leaf


def _transposed(model, name: str, param, init: str, shape, axes) -> bool:
    """Whether the ONNX weight ``init`` holds the torch parameter ``name`` transposed: the
    ONNX output axis against the torch layer's (Linear and Embedding: 0, GPT-2's Conv1D: 1),
    or by the shapes before pruning where the graph does not say."""
    module, leaf = _owner(model, name)
    if init in axes and leaf == "weight":
        torch_out = 1 if type(module).__name__ == "Conv1D" else 0
        return axes[init][0] != torch_out
    return tuple(param.shape) != tuple(shape) and tuple(param.shape) == tuple(shape[::-1])


def _resize(model, name: str, shape) -> None:
    """The meta parameter ``name`` takes ``shape``; a layer's size attributes follow."""
    import torch

    module, leaf = _owner(model, name)
    setattr(module, leaf, torch.nn.Parameter(torch.empty(shape, device="meta"),
                                             requires_grad=False))
    if leaf == "weight" and isinstance(module, torch.nn.Linear):
        module.out_features, module.in_features = shape
    elif leaf == "weight" and isinstance(module, torch.nn.Embedding):
        module.num_embeddings, module.embedding_dim = shape


def _hidden_size(model, shapes: dict) -> int | None:
    """The width of the input embedding, where its weight was found."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if get is not None else None
    except (NotImplementedError, AttributeError):
        return None
    for name, module in model.named_modules():
        if module is emb and f"{name}.weight" in shapes:
            return int(shapes[f"{name}.weight"][1])
    return None
