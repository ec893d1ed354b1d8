"""Kernel strategy registry for the CPU back end.

For each heavy Relax op the code generator asks every registered strategy for that op whether it
matches (static shapes, constant weights, supported layout...). Each match comes with an
estimated run time, ``macs / (peak_macs_per_s * efficiency)``; the fastest estimate wins, and
``fallback`` (legalize + generic schedule) always matches with a low efficiency. So the rule a
user can be told is: "a hand-scheduled kernel when one fits, else the generic schedule", with the
numbers recorded per op in the compile report.

``efficiency`` values are measured fractions of one-core AVX2 FMA peak on znver3 (2 threads):
dense_packed ~0.55 on 32x768x3072, conv2d_nchw_packed ~0.4 on 3x3 64->64 @56x56, the generic
schedule ~0.02 on the same GEMM; depthwise_nchw does 9 MACs per output element and moves the
activation (~20-45 GB/s on MobileNetV2's layers), so its fraction of FMA peak is ~0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

FALLBACK = "fallback"


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy: which Relax op it serves and how well it runs."""

    name: str
    op: str  # Relax op name, e.g. "relax.matmul" (several: "relax.matmul|relax.nn.conv2d")
    efficiency: float  # fraction of peak FMA throughput, for the cost rule
    description: str
    device: str = "cpu"  # where its kernels run (the CPU back end, or targets/cuda.py)


STRATEGIES: tuple[StrategyInfo, ...] = (
    StrategyInfo("dense_packed", "relax.matmul", 0.55,
                 "constant W packed [N/16,K,16]; 4x16 register tile; N panels in parallel"),
    StrategyInfo("bsr_dense", "relax.matmul", 0.40,
                 "constant W with 16x1 zero blocks (16 output channels x 1 input): each 16-wide "
                 "panel keeps its nonzero rows (ELL-padded), indirect X load; dense_packed's "
                 "4x16 tile over L <= K rows"),
    StrategyInfo("dense_amx_bf16", "relax.matmul", 4.0,
                 "AMX targets only (x86-amx): X rounded to bf16 per call, constant W packed in "
                 "bf16 pairs [N/16,K/32,16,32]; 2x2 (or 1x3) blocks of 16x16 fp32 tiles, "
                 "tdpbf16ps over K; lossy (bf16 inputs, fp32 sums). Its efficiency is against "
                 "the AVX2 fp32 peak: one core's tiles do 16x those multiply-adds per cycle"),
    StrategyInfo("sparse_amx_bf16", "relax.matmul", 4.0,
                 "AMX targets, one row tile (M <= 16: batch-1, decoding): dense_amx_bf16's tile "
                 "program with W compressed as in SparAMX (per tile row a 32-bit mask and the "
                 "kept bf16 values), expanded per K step with masked expand loads (vpexpandw). "
                 "Offered when it reads <= 3/4 of the dense bf16 bytes; its estimate scales "
                 "with the bytes read (the regime is memory-bound)"),
    StrategyInfo("conv2d_amx_bf16", "relax.nn.conv2d", 4.0,
                 "AMX targets only: an NCHW conv (groups 1, any kernel, stride, padding, "
                 "dilation) as a GEMM, W [OC, IC*KH*KW] in bf16 as the A tiles, a per-call "
                 "im2col stage of X in bf16 pairs as the B tiles; dense_amx_bf16's tile program "
                 "per image; lossy (bf16 inputs, fp32 sums)"),
    StrategyInfo("batch_matmul_amx_bf16", "relax.matmul", 4.0,
                 "AMX targets only: a matmul of two run-time tensors (attention) on AMX tiles: "
                 "per call A in bf16 rows and B (or B^T) as bf16 pair words, then "
                 "dense_amx_bf16's tile program per batch entry; any N; lossy"),
    StrategyInfo("batch_matmul", "relax.matmul", 0.35,
                 "matmul of two run-time tensors (attention's Q @ K^T, P @ V), same batch dims, "
                 "any M, N: B read in place along N (N a multiple of 8) or packed a panel at a "
                 "time (B^T, or a zero-padded last panel), dense_packed's rows x 16 tile (M "
                 "padded to a 4-6 row tile); (batch, N panel, M tile) in parallel"),
    StrategyInfo("conv2d_nchw_packed", "relax.nn.conv2d", 0.40,
                 "NCHW groups=1, constant W packed [OC/16,IC,KH,KW,16]; (T pixels x 16 oc) "
                 "register tile; (n, oc-block, oh) in parallel. Small maps whose output width "
                 "is whole 16/8-lane vectors: width-vectorized variant, W packed "
                 "[OC/t,IC,KH,KW,t], (t oc x rows x OW) tile, stride phases for stride > 1"),
    StrategyInfo("conv1x1_nchw", "relax.nn.conv2d", 0.45,
                 "pointwise NCHW conv as a GEMM vectorized along the pixels: W packed "
                 "[OC/t,IC,t], (6 oc x 16 pixels) register tile, whole-vector NCHW write-back"),
    StrategyInfo("bsr_conv1x1", "relax.nn.conv2d", 0.40,
                 "pointwise NCHW conv with 16x1 (or 4x1) zero blocks: W packed in 4-channel "
                 "panels keeping their nonzero input channels (ELL), (4 oc x 16 pixels) tile "
                 "vectorized along the pixels, as in Fast Sparse ConvNets"),
    StrategyInfo("grouped_conv2d_nchw", "relax.nn.conv2d", 0.25,
                 "NCHW grouped conv (1 < groups, not depthwise multiplier 1), constant W packed "
                 "per group [G*ceil(OCg/L),ICg,KH,KW,L], L = 16/8/4 lanes inside one group: "
                 "conv2d_nchw_packed's (T pixels x L oc) tile reducing over the group's input "
                 "channels; (n, group block, oh) in parallel"),
    StrategyInfo("depthwise_nchw", "relax.nn.conv2d", 0.10,
                 "NCHW depthwise (groups = channels, multiplier 1), constant W[C,KH,KW]: one "
                 "channel's zero-padded plane (split into stride phases) per task, (rows x "
                 "8-lane vectors) register tile along the output width; bound by activation "
                 "traffic, so the efficiency is low by design"),
    StrategyInfo("dw_conv1x1_nchw", "relax.nn.conv2d", 0.10,
                 "a depthwise conv and the pointwise conv that alone reads it (MobileNetV2's "
                 "depthwise -> projection), one kernel: each task computes the depthwise "
                 "output of a few whole rows, every channel, into a buffer that stays in "
                 "cache, and runs conv1x1_nchw's tile on it. Not chosen by the cost rule: the "
                 "rewrite fuses planned pairs on maps of 28x28 and more"),
    StrategyInfo("inverted_residual_c16", "relax.nn.conv2d", 0.10,
                 "a whole inverted-residual block (1x1 expansion -> 3x3 depthwise -> 1x1 "
                 "projection) on a map of at most 14x14, one kernel: each core expands, "
                 "convolves and projects its share of the expanded channels in blocks of 16 "
                 "(8) channels, vectorized along channels, and the cores add their partial "
                 "projections. Not chosen by the cost rule: the rewrite fuses planned chains"),
    StrategyInfo("conv1x1_dw_conv1x1_nchw", "relax.nn.conv2d", 0.10,
                 "a whole inverted-residual block (MobileNetV2's 1x1 expansion -> depthwise "
                 "-> 1x1 projection), one kernel: dw_conv1x1_nchw where each task first "
                 "expands the input pixels its band of rows reads, a channel block at a "
                 "time, so no core reads the expanded activation another core wrote. Not "
                 "chosen by the cost rule: the rewrite fuses planned dw_conv1x1_nchw kernels "
                 "with the dense expansion that alone feeds them"),
    StrategyInfo("conv1x1_dw_nchw", "relax.nn.conv2d", 0.10,
                 "a pointwise conv and the depthwise conv that alone reads it (MobileNetV2's "
                 "expansion -> depthwise), one kernel: each task expands the input rows its "
                 "band of output rows reads, a channel block at a time, into a buffer that "
                 "stays in cache, and runs depthwise_nchw's tile on it. Not chosen by the cost "
                 "rule: the rewrite fuses planned pairs on maps of 56x56 and more whose "
                 "depthwise conv is not fused with its projection"),
    StrategyInfo("pool2d_nchw", "relax.nn.max_pool2d|relax.nn.avg_pool2d", 0.10,
                 "NCHW max / average pooling (ceil mode too; average pooling not dilated): "
                 "depthwise_nchw's kernel without weights, the plane padded with the lowest "
                 "float (max) or zeros (average; divided by the window, or by its taps inside "
                 "the input). 'MACs' = outputs x window taps"),
    StrategyInfo("softmax_rows", "relax.nn.softmax", 0.10,
                 "softmax over the last axis, rows of N >= 16 that are not whole 16-lane "
                 "vectors (attention over an odd sequence length): each row in 16-lane vector "
                 "code with an overlapping last vector instead of a scalar tail, a polynomial "
                 "exp; whole-vector rows stay on the generic row schedule. 'MACs' = elements"),
    StrategyInfo("nm_sparse_cuda", "relax.matmul", 0.10,
                 "CUDA, few rows (M <= 8): constant W compressed per output channel to its "
                 "nonzeros, K-major (int8 in-group offsets for N:M patterns, int16/int32 "
                 "indices else); one thread per channel gathers X. Chosen when it reads <= 3/4 "
                 "of the dense weight bytes (a bytes rule: the regime is memory-bound)",
                 device="cuda"),
    StrategyInfo("mma_sp_cuda", "relax.matmul", 2.0,
                 "CUDA sm_80+, more than 8 rows, --precision bf16: constant W with 2:4 zeros "
                 "along K on sparse tensor cores (mma.sp m16n8k32, bf16 inputs, fp32 sums): "
                 "W's kept values and metadata packed per lane at compile time, a warp per 16 "
                 "output channels x up to 32 tokens. Its efficiency is against the CPU peak "
                 "the rule assumes, as every CUDA strategy's: it beats DLight's dense "
                 "schedules",
                 device="cuda"),
    StrategyInfo("mma_cuda", "relax.matmul|relax.nn.conv2d", 1.0,
                 "CUDA sm_80+, --precision tf32 (the CUDA default) or bf16: a matmul by a "
                 "constant W, a groups-1 NCHW conv as an implicit GEMM (output pixels x "
                 "filter taps), or a matmul of two run-time tensors (attention: both rounded "
                 "per call, K^T read in place), on tensor cores (mma.sync m16n8k8 tf32 or m16n8k16 bf16, fp32 "
                 "sums): W rounded and laid out in A fragment order at compile time (one "
                 "128-bit load per lane and K step), X rounded in the kernel; a warp per 16 or "
                 "32 output channels x up to 32 tokens or pixels. Chosen for every dense "
                 "linear layer and conv (a sparse kernel first where W's zeros pay); lossy as "
                 "its precision",
                 device="cuda"),
    StrategyInfo(FALLBACK, "*", 0.02,
                 "LegalizeOps + FuseOps, then DLight rules (CPU: or a parallel+vectorize "
                 "schedule; CUDA: DLight's GPU rules, targets/cuda.py)"),
)

BY_NAME: dict[str, StrategyInfo] = {s.name: s for s in STRATEGIES}

#: Assumed per-core throughput for the estimate: 2 FMA units x 8 fp32 lanes x ~3 GHz (AVX2).
PEAK_MACS_PER_CORE = 2 * 8 * 3.0e9


def estimate_seconds(strategy: str, macs: int, cores: int) -> float:
    """The cost rule: estimated run time of ``macs`` multiply-adds under ``strategy``."""
    return macs / (PEAK_MACS_PER_CORE * max(cores, 1) * BY_NAME[strategy].efficiency)


def choose(op: str, macs: int, cores: int, candidates: dict[str, int]) -> tuple[str, dict]:
    """Pick the strategy with the lowest estimate among the matched ``candidates``
    ({strategy: MACs it would do: a sparse kernel skips the zeros}) and the fallback (``macs``,
    the op's dense count).

    Returns the name and an explanation dict ``{"candidates": {name: est_ms}, "chosen": name}``.
    """
    est = {FALLBACK: estimate_seconds(FALLBACK, macs, cores) * 1e3}
    for name, work in candidates.items():
        if op in BY_NAME[name].op.split("|"):
            est[name] = estimate_seconds(name, work, cores) * 1e3
    chosen = min(est, key=est.__getitem__)
    return chosen, {"candidates": {k: round(v, 4) for k, v in est.items()}, "chosen": chosen}


__all__ = ["BY_NAME", "FALLBACK", "STRATEGIES", "StrategyInfo", "choose", "estimate_seconds"]
