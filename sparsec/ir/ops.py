"""The core op set: which operators the IR accepts and how the dependency analysis reads each.

Ops follow ONNX semantics (default domain). Each op has a *kind* that tells the dependency
analysis how the axes of its inputs and outputs line up (see ``sparsec.analysis.depgraph``):

* ``unary``     output axis i is input-0 axis i (same shape), other inputs are scalars/options
* ``broadcast`` numpy broadcasting between all inputs and the output
* ``conv``, ``gemm``, ``matmul``   weight ops: they start and end channel groups; a MatMul of
  two activations (attention) passes its batch axes through: those are the *heads*
* ``expand``    broadcast axes of size 1; the others pass through
* ``channel_norm``  per-channel normalization over axis 1 with per-channel parameters (BN, IN)
* ``axis_norm`` normalization over trailing axes (LayerNorm, ...): the normalized axes are coupled
  through statistics, so they cannot be pruned exactly
* ``group_norm``  statistics over blocks of C/G channels: channels go a whole group at a time
* ``depth_to_space``  (pixel shuffle) CRD mode maps each output channel to a block of r*r
  input channels; DCR mode interleaves them (frozen)
* ``resize``    axes that keep their size (N, C) pass through; rescaled axes do not
* ``pool``      N and C preserved, spatial axes change
* ``reduce``    kept axes pass through, reduced axes are consumed
* ``softmax``   the softmax axis is coupled through the normalizer, other axes pass through
* ``reshape``   axes are matched by size segments; only 1:1 segments pass through
* ``transpose`` axes permuted
* ``pad``       unpadded axes pass through
* ``gather``    non-indexed axes pass through; an index that is a constant ``arange`` (exporters
  write flatten this way) is an identity on the indexed axis
* ``concat``, ``split``, ``slice``   the axis they cut maps to offset ranges of the other side
* ``shape``     reads the shape of its input at run time
* ``opaque``    accepted by the IR and the back ends, but the dependency analysis has no rule yet:
  every axis it touches is frozen (never pruned wrongly)

An op that is not in this table is unsupported: loading a model that uses it fails with a list of
every such op at once.
"""

from __future__ import annotations

_KINDS: dict[str, tuple[str, ...]] = {
    "unary": (
        "Abs", "Acos", "Asin", "Atan", "Cast", "Ceil", "Celu", "Clip", "Cos", "Dropout", "Elu",
        "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN",
        "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu",
        "Sigmoid", "Sign", "Sin", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
    ),
    "broadcast": (
        "Add", "And", "BitShift", "Div", "Equal", "Greater", "GreaterOrEqual", "Less",
        "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow", "PRelu", "Sub", "Sum",
        "Where", "Xor",
    ),
    "conv": ("Conv",),
    "gemm": ("Gemm",),
    "matmul": ("MatMul",),
    "channel_norm": ("BatchNormalization", "InstanceNormalization"),
    "axis_norm": ("LayerNormalization", "RMSNormalization", "LpNormalization",
                  "MeanVarianceNormalization"),
    "group_norm": ("GroupNormalization",),
    "depth_to_space": ("DepthToSpace",),
    "resize": ("Resize", "Upsample"),
    "expand": ("Expand",),
    "pool": ("AveragePool", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "LpPool",
             "MaxPool"),
    "reduce": ("ArgMax", "ArgMin", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
               "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
               "ReduceSumSquare"),
    "softmax": ("Softmax", "LogSoftmax", "Hardmax"),
    "reshape": ("Flatten", "Reshape", "Squeeze", "Unsqueeze"),
    "transpose": ("Transpose",),
    "pad": ("Pad",),
    "gather": ("Gather",),
    "concat": ("Concat",),
    "split": ("Split",),
    "slice": ("Slice",),
    "shape": ("Shape", "Size"),
    "opaque": (
        "ConstantOfShape", "CumSum", "Einsum", "GatherElements",
        "GatherND", "Range", "ScatterElements", "ScatterND", "SpaceToDepth", "Tile",
        "TopK", "Trilu",
    ),
}

OP_KIND: dict[str, str] = {op: kind for kind, ops in _KINDS.items() for op in ops}
CORE_OPS: frozenset[str] = frozenset(OP_KIND)


def op_kind(op_type: str) -> str:
    """Dependency-analysis kind of a core op (``KeyError`` for ops outside the core set)."""
    return OP_KIND[op_type]


def is_supported(op_type: str, domain: str = "") -> bool:
    return domain in ("", "ai.onnx") and op_type in CORE_OPS
