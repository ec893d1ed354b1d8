"""The Python API. The CLI is the same thing: each CLI flag is one keyword here.

    import sparsec
    g = sparsec.load("model.onnx")                      # or sparsec.capture(module, (x,))
    result = sparsec.prune(g, "small.onnx", ratio=0.3)  # pruned ONNX + per-pass report
    sparsec.compile("model.onnx", "build/model", target="host", ratio=0.3)
    sparsec.validate("build/model")                     # library vs ONNX Runtime

This module is the stable façade: the code lives in one module per step of the pipeline, and
every name is re-exported here, so ``sparsec.api.X`` keeps working wherever ``X`` moves.

    sparsec/loading.py          load, capture, inspect: any model form -> a Graph
    sparsec/pruning.py          prune (options -> passes -> PruneResult), max_drop search,
                                calibration data, recipe merging
    sparsec/compiling.py        compile (prune, build for a target, check, write the
                                package), tune, profile
    sparsec/running.py          run, validate: a package's library vs ONNX Runtime
    sparsec/remote.py           devices, and what run/validate/tune use with rpc=, key=:
                                remote devices through TVM's RPC tracker
    sparsec/torch_writeback.py  prune_module, write_back: pruned weights into a torch module
"""

from __future__ import annotations

from sparsec.analysis.cost import Cost
from sparsec.errors import (BadOptionError, InvalidModelError, SparsecError, ToolchainError,
                            ValidationError)
from sparsec.frontends.onnx import InputShapes
from sparsec.ir.graph import Graph
from sparsec.passes.manager import PassResult
from sparsec.recipe import Recipe

from sparsec.loading import Log, ModelLike, _quiet, capture, inspect, load
from sparsec.pruning import (RECIPE_KEYS, SEARCH_STEPS, PruneResult,
                             _calibration, _check_patterns, _check_ratio, _check_sparsity,
                             _check_structure, _chunks, _search_ratio, as_recipe,
                             merge_recipe, prune, ratio_scaler)
from sparsec.running import (ATOL, ATOL_BF16, ATOL_TF32, BF16_MARGIN, BF16_MIN_COSINE,
                             RTOL, RTOL_BF16, RTOL_TF32, TF32_MIN_COSINE, ValidationReport,
                             _compare, _library_failed, _load_runner, _raise_if_mismatch,
                             _run_package, _runner, device_rtol, kernel_precision, run,
                             tolerance, uses_bf16, validate)
from sparsec.compiling import (_dist_version, check_toolchain, compile,
                               profile, tune, version)
from sparsec.remote import devices
from sparsec.torch_writeback import (_check_write_back, _created_bias,
                                     _drop_removed_layers, _heads_follow_weights,
                                     _hidden_follows_weights, _out_features,
                                     _renumber_layers, prune_module, write_back)

__all__ = [
    # loading
    "load", "capture", "inspect", "Log", "ModelLike",
    # pruning
    "prune", "PruneResult", "Recipe", "as_recipe", "merge_recipe", "ratio_scaler",
    "RECIPE_KEYS", "SEARCH_STEPS",
    # compiling
    "compile", "tune", "profile", "check_toolchain", "version",
    # running
    "run", "validate", "devices", "ValidationReport", "uses_bf16", "tolerance", "device_rtol",
    "RTOL", "ATOL", "RTOL_BF16", "ATOL_BF16", "BF16_MIN_COSINE", "BF16_MARGIN",
    "RTOL_TF32", "ATOL_TF32", "TF32_MIN_COSINE", "kernel_precision",
    # torch modules
    "prune_module", "write_back",
    # types and errors the API's signatures name
    "Graph", "InputShapes", "Cost", "PassResult", "SparsecError", "BadOptionError",
    "InvalidModelError", "ToolchainError", "ValidationError",
]
