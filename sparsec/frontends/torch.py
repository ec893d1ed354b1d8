"""PyTorch frontend: ``capture(module, example_inputs)`` -> sparsec Graph.

The module is captured with ``torch.export`` and lowered by torch's own ONNX exporter (the
dynamo exporter, which consumes the ExportedProgram); the ONNX frontend then produces the IR.
One lowering path means the analysis and passes are written once. The exporter names
initializers after the module's parameters (``layer1.0.conv1.weight``), so a pruning plan on the
graph names the module's parameters too.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Sequence

from sparsec.errors import InvalidModelError
from sparsec.frontends.onnx import load_onnx
from sparsec.ir.graph import Graph


@contextlib.contextmanager
def _eval_mode(module):
    """Eval mode for the capture; afterwards every submodule gets back its *own* mode
    (``module.train(was)`` would force one mode on all of them)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, was_training in modes:
            m.training = was_training


def first_tensor(out):
    """A module's main output tensor: ``.logits`` of a transformers output, else the first
    tensor of a tuple/list, else ``out`` itself."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    return out


def export_onnx(module, example_inputs: Sequence[Any], input_names: Sequence[str] | None = None):
    """torch.export + the dynamo ONNX exporter -> ``onnx.ModelProto`` (module left untouched)."""
    import torch

    args = tuple(example_inputs)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with _eval_mode(module), torch.no_grad():
        try:
            ep = torch.export.export(module, args)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidModelError(f"torch.export could not capture the module: {first}") from None
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(ep, args, dynamo=True, optimize=True, verbose=False,
                                        input_names=list(input_names) if input_names else None)
    return program.model_proto


def capture(module, example_inputs: Sequence[Any],
            input_names: Sequence[str] | None = None) -> Graph:
    """Capture a ``torch.nn.Module`` at the shapes of ``example_inputs`` as a sparsec Graph."""
    return load_onnx(export_onnx(module, example_inputs, input_names))
