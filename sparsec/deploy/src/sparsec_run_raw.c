/*
 * sparsec_run_raw MODEL.so INPUTS.bin OUTPUTS.bin: run a package's model once on raw inputs
 * (the arrays concatenated in signature order, as reference/inputs.bin) and write the raw
 * outputs. sparsec builds it per model, with -DSPARSEC_MODEL_HEADER='"NAME.h"' and
 * -DSPARSEC_MODEL_SPEC=NAME_spec, to check cross-compiled packages under an emulator.
 */
#include <stdio.h>
#include <stdlib.h>

#include SPARSEC_MODEL_HEADER

static char* read_all(const char* path, size_t bytes) {
  char* data = malloc(bytes + 1);
  FILE* f = fopen(path, "rb");
  size_t got = f ? fread(data, 1, bytes + 1, f) : 0;
  if (f) fclose(f);
  if (!f || got != bytes) {
    fprintf(stderr, "%s: expected %zu bytes\n", path, bytes);
    exit(3);
  }
  return data;
}

int main(int argc, char** argv) {
  const sparsec_model_spec* spec = &SPARSEC_MODEL_SPEC;
  size_t in_bytes = 0, out_bytes = 0, at = 0;
  int i;
  if (argc != 4) {
    fprintf(stderr, "usage: %s MODEL.so INPUTS.bin OUTPUTS.bin\n", argv[0]);
    return 2;
  }
  for (i = 0; i < spec->num_inputs; ++i) in_bytes += spec->inputs[i].nbytes;
  for (i = 0; i < spec->num_outputs; ++i) out_bytes += spec->outputs[i].nbytes;
  char* x = read_all(argv[2], in_bytes);
  char* y = malloc(out_bytes + 1);
  const void** ins = malloc(sizeof(void*) * (spec->num_inputs + 1));
  void** outs = malloc(sizeof(void*) * (spec->num_outputs + 1));
  for (i = 0; i < spec->num_inputs; at += spec->inputs[i++].nbytes) ins[i] = x + at;
  for (at = 0, i = 0; i < spec->num_outputs; at += spec->outputs[i++].nbytes) outs[i] = y + at;

  sparsec_model* model = sparsec_open(spec, argv[1]);
  if (model == NULL || sparsec_run(model, ins, outs) != 0) {
    fprintf(stderr, "%s\n", sparsec_last_error());
    return 4;
  }
  FILE* f = fopen(argv[3], "wb");
  if (!f || fwrite(y, 1, out_bytes, f) != out_bytes) {
    fprintf(stderr, "cannot write %s\n", argv[3]);
    return 3;
  }
  fclose(f);
  sparsec_close(model);
  free(x), free(y), free(ins), free(outs);
  return 0;
}
