/*
 * sparsec.h: the C API of a model compiled by sparsec.
 *
 * A package written by `sparsec compile ... --name NAME -o DIR` holds NAME.h (this model's
 * shapes, dtypes and NAME_spec), the shared library model.so and the static archive libNAME.a.
 * Open the model with the spec and either the path of model.so, or NULL when libNAME.a is linked
 * into the program (whole-archive: CMake's sparsec_add_model does that). The TVM runtime
 * (libtvm_runtime + libtvm_ffi, `sparsec runtime`) is the only other dependency.
 *
 *   sparsec_model* m = sparsec_open(&NAME_spec, NULL);
 *   if (!m) { fprintf(stderr, "%s\n", sparsec_last_error()); return 1; }
 *   const void* in[NAME_NUM_INPUTS] = {x};  void* out[NAME_NUM_OUTPUTS] = {y};
 *   if (sparsec_run(m, in, out) != 0) ...
 *   sparsec_close(m);
 *
 * Buffers are dense, row-major, in the shapes and dtypes of the spec. The number of threads is
 * the TVM runtime's: TVM_NUM_THREADS in the environment, else TVM's default, which on x86 is
 * half the logical CPUs (it assumes 2-way SMT): set TVM_NUM_THREADS to the core count.
 */
#ifndef SPARSEC_H_
#define SPARSEC_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 3: the spec names the size and SHA-256 of model.so (sparsec_open checks them), and
 * sparsec_run_sized takes buffer sizes. Headers generated for version 2 still open. */
#define SPARSEC_API_VERSION 3

/* model headers define their specs as static data: no warning where a file does not use one */
#if defined(__GNUC__) || defined(__clang__)
#define SPARSEC_UNUSED __attribute__((unused))
#else
#define SPARSEC_UNUSED
#endif

typedef enum {
  SPARSEC_FLOAT32 = 0,
  SPARSEC_FLOAT16 = 1,
  SPARSEC_FLOAT64 = 2,
  SPARSEC_INT64 = 3,
  SPARSEC_INT32 = 4,
  SPARSEC_INT8 = 5,
  SPARSEC_UINT8 = 6,
  SPARSEC_BOOL = 7
} sparsec_dtype;

typedef struct {
  const char* name;      /* the ONNX input/output name */
  sparsec_dtype dtype;
  int ndim;
  const int64_t* shape;
  size_t nbytes;         /* product of the shape times the element size */
  const int64_t* range;  /* NULL, or {lo, hi}: the values an index input may hold (token ids:
                          * [-rows, rows - 1] of the table it indexes); sparsec_run refuses
                          * others */
} sparsec_tensor_spec;

typedef struct {
  int api_version;                  /* SPARSEC_API_VERSION the header was generated for */
  const char* name;                 /* the model name given to `sparsec compile --name` */
  const char* system_lib_prefix;    /* symbol prefix of the static archive */
  int num_inputs;
  const sparsec_tensor_spec* inputs;
  int num_outputs;
  const sparsec_tensor_spec* outputs;
  double atol, rtol;                /* reference check: |y - ref| <= atol + rtol * max|ref| */
  int device_type;                  /* where the kernels run: 1 the CPU, 2 a CUDA GPU (DLPack's
                                     * kDLCPU / kDLCUDA); a CUDA model opens from its model.so,
                                     * with the package's kernels.fatbin beside it, and needs
                                     * libtvm_runtime_cuda.so beside libtvm_runtime.so */
  /* api_version >= 3: */
  int64_t library_bytes;            /* size of the package's model.so */
  const char* library_sha256;       /* its SHA-256 (hex): sparsec_open refuses another file */
} sparsec_model_spec;

typedef struct sparsec_model sparsec_model;

/* Open a model: `library` is the path of the package's model.so, or NULL for the statically
 * linked archive. Returns NULL on error (see sparsec_last_error): a model.so whose size or
 * SHA-256 is not the one in the spec (a truncated copy, another model's library) is refused
 * before it is loaded. */
sparsec_model* sparsec_open(const sparsec_model_spec* spec, const char* library);

/* Run once: inputs[i] holds spec->inputs[i].nbytes bytes, outputs[i] receives
 * spec->outputs[i].nbytes bytes (host memory, also for a CUDA model: the copies to and from
 * the GPU are made here). Returns 0 on success, nonzero on error: an index input with a value
 * outside its spec's range is an error (nothing runs). */
int sparsec_run(sparsec_model* model, const void* const* inputs, void* const* outputs);

/* sparsec_run with the size in bytes of every buffer: an input must hold exactly
 * spec->inputs[i].nbytes bytes, an output at least spec->outputs[i].nbytes; anything else is an
 * error before anything runs (sparsec_run cannot tell a short buffer from a right one). NULL
 * arrays or buffers are errors in both. */
int sparsec_run_sized(sparsec_model* model, const void* const* inputs,
                      const size_t* input_bytes, void* const* outputs,
                      const size_t* output_bytes);

/* Run the package's reference pair (reference/inputs.bin, reference/outputs.bin: the inputs and
 * the outputs ONNX Runtime gave for them, raw and concatenated in order) and compare with the
 * spec's tolerance. Returns 0 when every output matches, 1 when one does not, -1 on error.
 * `max_abs_err` (may be NULL) receives the largest difference over all outputs. */
int sparsec_check_reference(sparsec_model* model, const char* inputs_bin,
                            const char* outputs_bin, double* max_abs_err);

void sparsec_close(sparsec_model* model);

/* The message of the last error on this thread ("" if none). */
const char* sparsec_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* SPARSEC_H_ */
