"""The C API's cost per call against the Python runner, on one dynamic package: a small BERT
(2 layers, hidden 32: the kernels take microseconds, so the call's own cost shows) compiled
with ``--dynamic batch_size=1..4,sequence_length=1..64``, run at 1 x 16 tokens by a C program
(``sparsec_run_shaped``; also at the header's own size, 3 x 33, beside ``sparsec_run``) and by
``sparsec.run``'s runner (the TVM VM from Python), alternating in rounds; median microseconds
per call.

Run from the repo root:  PYTHONPATH=. python benchmarks/capi_overhead.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROGRAM = r"""
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "bert.h"

static int64_t ids[BERT_INPUT0_MAX_NUMEL], mask[BERT_INPUT1_MAX_NUMEL];
static float y[BERT_OUTPUT0_MAX_NUMEL];

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char** argv) {
  /* argv[1]: model.so, argv[2]: calls; prints microseconds per call */
  int calls = atoi(argv[2]);
  int64_t shape[2] = {1, 16}, out_shape[3];
  sparsec_input in[2] = {{ids, sizeof ids, shape}, {mask, sizeof mask, shape}};
  sparsec_output out[1] = {{y, sizeof y, out_shape}};
  const void* fixed_in[2] = {ids, mask};
  void* fixed_out[1] = {y};
  for (int i = 0; i < BERT_INPUT0_MAX_NUMEL; ++i) ids[i] = i % 100, mask[i] = 1;
  sparsec_model* m = sparsec_open(&bert_spec, argv[1]);
  if (!m) { fprintf(stderr, "%s\n", sparsec_last_error()); return 1; }
  double us[3];
  for (int k = 0; k < 3; ++k) {   /* shaped 1x16, shaped 3x33, sparsec_run (3x33) */
    if (k == 1) shape[0] = 3, shape[1] = 33;
    for (int i = 0; i < 20; ++i) {
      if (k < 2) sparsec_run_shaped(m, in, out); else sparsec_run(m, fixed_in, fixed_out);
    }
    double t = now();
    for (int i = 0; i < calls; ++i) {
      int rc = k < 2 ? sparsec_run_shaped(m, in, out) : sparsec_run(m, fixed_in, fixed_out);
      if (rc != 0) { fprintf(stderr, "%s\n", sparsec_last_error()); return 1; }
    }
    us[k] = (now() - t) / calls * 1e6;
  }
  printf("%.2f %.2f %.2f\n", us[0], us[1], us[2]);
  sparsec_close(m);
  return 0;
}
"""


TEXT = ("us per call: C sparsec_run_shaped 1x16 {:.1f}, 3x33 {:.1f}; C sparsec_run 3x33 {:.1f}; "
        "Python runner 1x16 {:.1f}, 3x33 {:.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", "2")

    import sparsec
    from sparsec.package import LIBRARY
    from sparsec.targets.backend import load_library
    from test_dynamic import export_bert

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        export_bert(work / "bert.onnx")
        pkg = work / "bert"
        sparsec.compile(work / "bert.onnx", pkg, name="bert",
                        dynamic={"batch_size": (1, 4), "sequence_length": (1, 64)})
        rt = work / "rt"
        subprocess.run([sys.executable, "-m", "sparsec", "runtime", "-o", str(rt)], check=True,
                       capture_output=True)
        (work / "bench.c").write_text(PROGRAM)
        inc = ["-I", str(rt / "include"), "-I", str(pkg)]
        exe = str(work / "bench")
        subprocess.run(["gcc", "-O2", "-std=c99", "-c", str(work / "bench.c"), "-o",
                        str(work / "bench.o"), *inc], check=True)
        subprocess.run(["g++", "-O2", "-std=c++17", "-c", str(rt / "src" / "sparsec_runtime.cc"),
                        "-o", str(work / "capi.o"), *inc], check=True)
        subprocess.run(["g++", str(work / "bench.o"), str(work / "capi.o"), "-L",
                        str(rt / "lib"), "-ltvm_runtime", "-ltvm_ffi",
                        f"-Wl,-rpath,{rt / 'lib'}", "-o", exe], check=True)
        runner = load_library(pkg / LIBRARY, ["input_ids", "mask"])
        feeds = [{"input_ids": (np.arange(b * s) % 100).astype(np.int64).reshape(b, s),
                  "mask": np.ones((b, s), np.int64)} for b, s in ((1, 16), (3, 33))]
        rows = []
        for _ in range(args.rounds):
            c = [float(v) for v in subprocess.run(
                [exe, str(pkg / LIBRARY), str(args.calls)], check=True, capture_output=True,
                text=True).stdout.split()]
            py = []
            for f in feeds:
                for _ in range(20):
                    runner.run(f)
                t = time.perf_counter()
                for _ in range(args.calls):
                    runner.run(f)
                py.append((time.perf_counter() - t) / args.calls * 1e6)
            rows.append([*c, *py])
            print(TEXT.format(*rows[-1]), flush=True)
        med = np.median(np.array(rows), axis=0)
        print(f"median of {args.rounds} rounds x {args.calls} calls: " + TEXT.format(*med))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
