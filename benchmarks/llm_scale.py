"""LLM scale: a Llama-architecture model of TinyLlama's shape (22 layers, hidden 2048, 32 heads,
4 KV heads, FFN 5632, vocabulary 32000: about 1.1 B parameters; random weights, built from a
``transformers.LlamaConfig``) pruned on this machine, with peak memory and wall time per run:

* ``onnx-structured``   25 % of the FFN channels and half the attention heads (16 of 32, 2 of 4
                        KV heads), with reconstruction, through the ONNX route (the model
                        exported to an .onnx file with external data, ``sparsec.prune`` writing
                        the pruned one with external data). Heads go by half, not by a
                        quarter: transformers' LlamaConfig refuses 24 heads on a hidden size
                        of 2048 (not a multiple), so a 25 % head cut could not round-trip;
* ``module-structured`` the same through ``sparsec.prune_module`` on the ``LlamaForCausalLM``,
                        then ``save_pretrained`` + ``from_pretrained``: the logits must be equal;
* ``onnx-sparsegpt50``  SparseGPT, 50 % unstructured, every linear weight (ONNX route);
* ``onnx-sparsegpt24``  SparseGPT, 2:4.

Each run is its own process; its peak resident memory is the kernel's figure for that process
(``os.wait4``'s ``ru_maxrss``); a watchdog kills a run above ``--max-rss-gib``, 15.5 by
default (the machine is shared), the export's is reported apart. Calibration is random token ids
(``--seqs`` sequences of ``--seq-len`` tokens, one per batch; the issue's set is 128 x 512:
``--full``); a quarter is held out for the fidelity prune reports (meaningless on random
weights: this benchmark measures cost, quality is measured on all-MiniLM-L6-v2). ``--layers``
builds fewer decoder layers for a quick check.

Run from the repo root:  PYTHONPATH=. python benchmarks/llm_scale.py --layers 2 [--full]
(``SPARSEC_CALIBRATION_BYTES=N`` in the environment: recorded with each run).
Writes benchmarks/results/llm_scale.json and .md (``--no-publish``: print only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))   # zoo

#: ``SPARSEC_CALIBRATION_BYTES`` (``sparsec.layerwise``), recorded with a run that had it
BUDGET = "SPARSEC_CALIBRATION_BYTES"
RUNS = ("onnx-structured", "module-structured", "onnx-sparsegpt50", "onnx-sparsegpt24")
#: the structured cut of both routes (module docstring)
STRUCTURED = dict(ratio=0.25, head_ratio=0.5, reconstruct=True)
RUN_ORDER = ("export",) + RUNS
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
             tie_word_embeddings=False)


def build(layers: int):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, **SHAPE)
    cfg.use_cache = False
    return transformers.LlamaForCausalLM(cfg).eval()


def calibration(n: int, length: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(1, SHAPE["vocab_size"], size=(1, length)).astype(np.int64)
            for _ in range(n)]


def child(run: str, args) -> dict:
    """One measured run in this process; returns its figures."""
    import torch
    from zoo import Logits      # tests/zoo.py: a causal LM -> its logits

    torch.set_num_threads(os.cpu_count() or 1)
    import sparsec

    out, times = {}, {}
    work = Path(args.work)
    calib = calibration(args.seqs, args.seq_len)
    start = time.perf_counter()

    def log(msg: str) -> None:      # progress, with the time since the run began, to stderr
        print(f"[{run} {time.perf_counter() - start:7.1f} s] {msg}", file=sys.stderr, flush=True)
    if run == "export":
        lm = build(args.layers)
        times["build_s"] = time.perf_counter() - start
        out["params"] = sum(p.numel() for p in lm.parameters())
        t = time.perf_counter()
        with torch.no_grad():
            torch.onnx.export(Logits(lm).eval(), (torch.from_numpy(calib[0]),), str(work / "llama.onnx"),
                              dynamo=True, external_data=True, input_names=["input_ids"],
                              optimize=True, verbose=False)
        times["export_s"] = time.perf_counter() - t
        out["onnx_bytes"] = sum(f.stat().st_size for f in work.iterdir()
                                if f.name.startswith("llama.onnx"))
    elif run == "module-structured":
        lm = build(args.layers)
        times["build_s"] = time.perf_counter() - start
        t = time.perf_counter()
        ids = torch.from_numpy(calib[0])
        pruned, result = sparsec.prune_module(
            lm, (ids,), **STRUCTURED,
            calibration=[{"input_ids": torch.from_numpy(c)} for c in calib], log=log)
        times["prune_s"] = time.perf_counter() - t
        out["params"], out["params_after"] = (sum(p.numel() for p in m.parameters())
                                              for m in (lm, pruned))
        out["holdout_cosine"] = result.fidelity.cosine
        del lm
        t = time.perf_counter()
        pruned.save_pretrained(work / "hf")
        import transformers

        back = transformers.AutoModelForCausalLM.from_pretrained(work / "hf").eval()
        times["roundtrip_s"] = time.perf_counter() - t
        with torch.no_grad():
            out["roundtrip_equal"] = bool(torch.equal(back(ids).logits, pruned(ids).logits))
        cfg = back.config
        out["config"] = {k: getattr(cfg, k) for k in (
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "head_dim")}
    else:
        options = {"onnx-structured": STRUCTURED,
                   "onnx-sparsegpt50": dict(sparsity=0.5, sparsity_criterion="sparsegpt"),
                   "onnx-sparsegpt24": dict(sparsity_pattern="2:4",
                                            sparsity_criterion="sparsegpt")}[run]
        pruned = work / f"{run}.onnx"
        result = sparsec.prune(work / "llama.onnx", pruned,
                               calibration=[{"input_ids": c} for c in calib], log=log,
                               **options)
        times["prune_s"] = time.perf_counter() - start
        out["params"], out["params_after"] = result.before.params, result.after.params
        out["holdout_cosine"] = result.fidelity.cosine
        out["onnx_bytes"] = sum(f.stat().st_size for f in work.iterdir()
                                if f.name.startswith(pruned.name))
        refit = [r for p in result.passes for key in ("refit", "reconstructed")
                 for r in (p.details.get(key) or []) if isinstance(r, dict) and "held_bytes" in r]
        if refit:       # calibration tensors in memory at any one layer (layerwise.Walk)
            out["calibration_held_mib"] = round(max(r["held_bytes"] for r in refit) / 2**20, 1)
    out.update({k: round(v, 1) for k, v in times.items()})
    return out


def _rss_gib(pid: int) -> float:
    """Resident memory of ``pid`` now, in GiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def measure(run: str, args) -> dict:
    """``run`` in a child process: its figures, wall time and peak RSS."""
    cmd = [sys.executable, __file__, "--child", run, "--work", args.work, "--layers",
           str(args.layers), "--seqs", str(args.seqs), "--seq-len", str(args.seq_len)]
    env = {**os.environ, "SPARSEC_EXTERNAL_DATA_BYTES": "0"}    # the ONNX route, external data
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout.read().splitlines()))
    reader.start()
    stopped, shown = None, 0.0
    while True:     # a watchdog: this machine is shared, stay under the cap
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = _rss_gib(proc.pid)
        if rss > args.max_rss_gib and not stopped:
            proc.kill()
            stopped = f"killed above {args.max_rss_gib} GiB"
        if time.perf_counter() - shown >= 30:      # resident memory over time, to stderr
            shown = time.perf_counter()
            print(f"[{run} {shown - start:7.1f} s] RSS {rss:.2f} GiB", file=sys.stderr,
                  flush=True)
        time.sleep(0.5)
    reader.join()
    row = {"run": run, "layers": args.layers, "calibration": f"{args.seqs} x {args.seq_len}",
           **({"calibration_bytes": int(os.environ[BUDGET])} if os.environ.get(BUDGET) else {}),
           "wall_s": round(time.perf_counter() - start, 1),
           "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2),
           "exit": os.waitstatus_to_exitcode(status)}
    if stopped:
        row["stopped"] = stopped
    for line in lines:
        if line.startswith("RESULT "):
            row.update(json.loads(line[7:]))
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--seqs", type=int, default=8, help="calibration sequences (default 8)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    ap.add_argument("--full", action="store_true", help="the issue's set: 128 x 512 tokens")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {RUNS}")
    ap.add_argument("--work", help="scratch directory (default: a temporary one)")
    ap.add_argument("--max-rss-gib", type=float, default=15.5,
                    help="kill a run whose resident memory passes this (default 15.5)")
    ap.add_argument("--no-publish", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.full:
        args.seqs, args.seq_len = 128, 512
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return 0
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        ap.error(f"unknown run(s) {', '.join(unknown)}")
    with tempfile.TemporaryDirectory(prefix="llm-scale-") as tmp:
        args.work = args.work or tmp
        Path(args.work).mkdir(parents=True, exist_ok=True)
        rows = []
        if any(r.startswith("onnx") for r in runs):
            rows.append(measure("export", args))
        rows += [measure(r, args) for r in runs]
    if not args.no_publish:
        from bench_host import RESULTS, publish

        old = RESULTS / "llm_scale.json"     # runs of other sizes stay beside these
        key = ("run", "layers", "calibration", "calibration_bytes")
        rows += [r for r in (json.loads(old.read_text()) if old.exists() else [])
                 if not any(all(r.get(k) == n.get(k) for k in key) for n in rows)]
        rows.sort(key=lambda r: (r["layers"], r["calibration"], RUN_ORDER.index(r["run"]),
                                 r.get("calibration_bytes", 0)))
        publish("llm_scale", rows, table(rows))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


def table(rows: list[dict]) -> str:
    lines = ["Llama of TinyLlama's shape (hidden 2048, 32 heads, 4 KV heads, FFN 5632, vocabulary "
             "32000), random weights, on this 2-core machine; each run its own process (peak "
             "RSS from the kernel). Calibration: random token ids, one sequence per batch. "
             "Structured: 25 % of the FFN channels and half the heads, with reconstruction; "
             "SparseGPT on every linear weight. Held-out cosines are meaningless on random "
             "weights.", "",
             "| run | layers | calibration | wall s | peak RSS GiB | prune s | details |",
             "|---|---:|---|---:|---:|---:|---|"]
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in (
            "run", "layers", "calibration", "calibration_bytes", "wall_s", "peak_rss_gib",
            "prune_s", "exit")}
        calib = r["calibration"] + (f", {BUDGET} {r['calibration_bytes'] / 2**30:g} GiB"
                                    if "calibration_bytes" in r else "")
        lines.append(f"| {r['run']} | {r['layers']} | {calib} | {r['wall_s']} | "
                     f"{r['peak_rss_gib']} | {r.get('prune_s', '')} | "
                     f"{json.dumps(extra)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
