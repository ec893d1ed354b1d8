"""A self-contained GPU check of CUDA packages, for a machine with an NVIDIA GPU, nvcc and g++
but no TVM compiler and no network (the device machines lent here: apache-tvm's compiler library
alone is larger than what may travel there). Everything is compiled here; there only the C API
is built, against the TVM runtime, and run.

Here:   PYTHONPATH=. python benchmarks/gpu_check.py DIR [--target cuda-sm90]
There:  bash DIR/run.sh   (prints, and writes $OUT/gpu_check.txt when OUT is set)

DIR holds ``rt/`` (``sparsec runtime --target T``: libtvm_runtime, libtvm_ffi,
libtvm_runtime_cuda, headers, the C API source), ``pkgs/NAME/`` (the packages: the digits CNN
and MLP, and a 768 -> 3072 linear layer dense / 2:4 / 80 % at batch 1, 2:4 at batch 8, and
dense / 2:4 at 128 rows, where the 2:4 layer runs on sparse tensor cores, ``mma_sp_cuda``),
``check.c`` and ``run.sh``. Dense layers and convolutions run on tensor cores (``mma_cuda``,
tf32 by default), the 128-row dense layer in bf16 too; each package's name ends in the
precision asked (a sparse layer on ``nm_sparse_cuda`` stays exact fp32). Per package the program runs the reference pair (ONNX Runtime's outputs, computed
here) on the GPU and times ``sparsec_run`` (host buffers in and out, so the copies are
counted).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

CHECK = r"""
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include MODEL_H

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char** argv) {
  char lib[4096], in[4096], out[4096];
  const sparsec_model_spec* spec = &SPEC;
  double err = -1;
  if (argc != 2) return 2;
  snprintf(lib, sizeof lib, "%s/model.so", argv[1]);
  snprintf(in, sizeof in, "%s/reference/inputs.bin", argv[1]);
  snprintf(out, sizeof out, "%s/reference/outputs.bin", argv[1]);
  sparsec_model* m = sparsec_open(spec, lib);
  if (m == NULL) { printf("%s: open failed: %s\n", spec->name, sparsec_last_error()); return 1; }
  int status = sparsec_check_reference(m, in, out, &err);
  printf("%s: reference check %s, max abs err %g %s\n", spec->name,
         status == 0 ? "ok" : "FAILED", err, sparsec_last_error());
  /* time sparsec_run on the reference inputs */
  FILE* f = fopen(in, "rb");
  const void* ins[16];
  void* outs[16];
  size_t at = 0;
  char* x = malloc(1 << 26);
  if (f == NULL || x == NULL) return 1;
  size_t got = fread(x, 1, 1 << 26, f);
  fclose(f);
  for (int i = 0; i < spec->num_inputs; ++i) { ins[i] = x + at; at += spec->inputs[i].nbytes; }
  for (int i = 0; i < spec->num_outputs; ++i) outs[i] = malloc(spec->outputs[i].nbytes);
  if (got != at) return 1;
  for (int i = 0; i < 10; ++i) sparsec_run(m, ins, outs);
  int n = 0;
  double start = now();
  while (now() - start < 1.0 || n < 20) { sparsec_run(m, ins, outs); ++n; }
  printf("%s: sparsec_run %.4f ms (mean of %d, host copies included)\n", spec->name,
         (now() - start) / n * 1e3, n);
  sparsec_close(m);
  return status != 0;
}
"""

RUN = r"""#!/bin/bash
# Build the C API against the TVM runtime in rt/ and check every package in pkgs/ on the GPU.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
log="${OUT:-$here}/gpu_check.txt"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}"
mkdir -p "$here/build"
nvidia-smi -L 2>&1 | tee "$log"
g++ -std=c++17 -O2 -c "$here/rt/src/sparsec_runtime.cc" -I "$here/rt/include" \
    -o "$here/build/capi.o" || exit 1
for pkg in "$here"/pkgs/*/; do
  name="$(basename "$pkg")"
  gcc -std=c99 -O2 -c "$here/check.c" -I "$here/rt/include" -I "$pkg" \
      -DMODEL_H="\"$name.h\"" -DSPEC="${name}_spec" -o "$here/build/$name.o" &&
  g++ "$here/build/$name.o" "$here/build/capi.o" -ldl -L "$here/rt/lib" -ltvm_runtime \
      -ltvm_ffi -Wl,-rpath,"$here/rt/lib" -o "$here/build/$name" &&
  "$here/build/$name" "$pkg" 2>&1 | tee -a "$log"
done
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--target", default="cuda-sm90")
    args = ap.parse_args(argv)

    import onnx

    from bench_cuda import linear_layer
    from sparsec import api
    from sparsec.deploy.runtime import build_runtime

    out: Path = args.dir
    if out.exists():
        shutil.rmtree(out)
    (out / "pkgs").mkdir(parents=True)
    build_runtime(args.target, out / "rt")
    models = {"digits_cnn": REPO / "examples" / "digits_cnn.onnx",
              "digits_mlp": REPO / "examples" / "digits_mlp.onnx"}
    for m, keep in ((1, "dense"), (1, "2:4"), (1, "80%"), (8, "2:4"), (128, "dense"),
                    (128, "2:4")):
        name = f"linear_m{m}_{keep.replace(':', 'of').replace('%', 'pct')}"
        path = out / f"{name}.onnx"
        onnx.save(linear_layer(m, 768, 3072, keep), str(path))
        models[name] = path
    # precisions per model (default: the target's, tf32, on tensor cores): the 128-row dense
    # layer in bf16 too, beside the 128-row 2:4 layer in bf16 on the sparse tensor cores
    # (mma_sp_cuda). No fp32 copies (bench_cuda.py compares fp32 / tf32 / bf16 where TVM
    # runs beside the GPU): the directory stays under 64 MiB, what may travel to a device.
    precisions = {"linear_m128_dense": ("tf32", "bf16"), "linear_m128_2of4": ("bf16",)}
    for base, path in models.items():
        for precision in precisions.get(base, ("tf32",)):
            name = f"{base}_{precision}"
            manifest = api.compile(path, out / "pkgs" / name, target=args.target, name=name,
                                   precision=precision)
            print(f"{name}: {manifest['compile']['kernels']}, {manifest['compile']['precision']}"
                  f", checked here via {manifest['reference']['check']['via']}")
    for path in out.glob("*.onnx"):
        path.unlink()
    (out / "check.c").write_text(CHECK)
    (out / "run.sh").write_text(RUN)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB); on the GPU machine: bash {out}/run.sh")
    if size > 64 * 2**20:
        print("warning: over 64 MiB, more than a device session may carry")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
