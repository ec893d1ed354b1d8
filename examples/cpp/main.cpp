// Runs the digits model linked into this program (sparsec_add_model in CMakeLists.txt) on the
// reference input of its package and checks the outputs against ONNX Runtime's.
//
//   digits_check PACKAGE_DIR    (the directory holding reference/inputs.bin and outputs.bin)
#include <cstdio>
#include <string>
#include <vector>

#include "digits.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s PACKAGE_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];

  // NULL: the model is linked in statically (libdigits.a); pass ".../model.so" to load it instead
  sparsec_model* model = sparsec_open(&digits_spec, nullptr);
  if (model == nullptr) {
    std::fprintf(stderr, "cannot open the model: %s\n", sparsec_last_error());
    return 1;
  }

  double err = 0.0;
  int status = sparsec_check_reference(model, (dir + "/reference/inputs.bin").c_str(),
                                       (dir + "/reference/outputs.bin").c_str(), &err);
  if (status < 0) {
    std::fprintf(stderr, "reference check failed to run: %s\n", sparsec_last_error());
    sparsec_close(model);
    return 1;
  }
  std::printf("reference check: max abs err %.3g -> %s\n", err,
              status == 0 ? "ok" : sparsec_last_error());

  // one plain inference: an all-zero image, the logits of its classes
  std::vector<float> image(DIGITS_INPUT0_NUMEL, 0.0f), logits(DIGITS_OUTPUT0_NUMEL);
  const void* inputs[DIGITS_NUM_INPUTS] = {image.data()};
  void* outputs[DIGITS_NUM_OUTPUTS] = {logits.data()};
  if (sparsec_run(model, inputs, outputs) != 0) {
    std::fprintf(stderr, "run failed: %s\n", sparsec_last_error());
    sparsec_close(model);
    return 1;
  }
  int best = 0;
  for (int k = 1; k < DIGITS_OUTPUT0_NUMEL; ++k) best = logits[k] > logits[best] ? k : best;
  std::printf("blank image -> class %d\n", best);

  sparsec_close(model);
  return status == 0 ? 0 : 1;
}
