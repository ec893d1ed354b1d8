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
 * A package compiled with --dynamic runs at any shape within its header's ranges: pass each
 * call's input shapes to sparsec_run_shaped, which returns the output shapes:
 *
 *   int64_t shape[2] = {1, 7};                        (batch 1, 7 tokens)
 *   int64_t out_shape[3];
 *   sparsec_input in[2] = {{ids, sizeof ids, shape}, {mask, sizeof mask, shape}};
 *   sparsec_output out[1] = {{y, sizeof y, out_shape}};   (y: NAME_OUTPUT0_MAX_NUMEL floats)
 *   int rc = sparsec_run_shaped(m, in, out);          (SPARSEC_ERROR_SHAPE: outside the ranges)
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
 * sparsec_run_sized takes buffer sizes. 4: tensor specs give every axis's least and largest
 * size (dynamic shapes), sparsec_run_shaped takes shapes per call. Headers generated for
 * versions 2 and 3 still open (their tensors have fixed shapes). */
#define SPARSEC_API_VERSION 4

/* What the run functions return. Every error also sets sparsec_last_error. */
#define SPARSEC_OK 0
#define SPARSEC_ERROR (-1)         /* any other error: NULLs, a failed run, a bad input value */
#define SPARSEC_ERROR_SHAPE (-2)   /* an input shape outside the spec's sizes (a dynamic dim
                                    * outside its range, a fixed axis changed, a wrong rank),
                                    * or two inputs that disagree on a dynamic dim */
#define SPARSEC_ERROR_BUFFER (-3)  /* a buffer smaller than its tensor: an input's bytes, or
                                    * an output's room; also an input of the wrong size in
                                    * sparsec_run_sized */

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
  /* api_version >= 4 (NULL and 0 in older headers: the shape is fixed): */
  const int64_t* min_shape;  /* per axis the least size; equal to max_shape on a fixed axis */
  const int64_t* max_shape;  /* per axis the largest size */
  const char* const* dims;   /* NULL, or per axis the name of its dynamic dim (NULL on a fixed
                              * axis; an output axis that varies with no dim of its own) */
  size_t max_nbytes;         /* bytes at max_shape: a buffer that fits every call */
} sparsec_tensor_spec;

/* A call's input for sparsec_run_shaped: dense, row-major, `shape` has the spec's ndim sizes. */
typedef struct {
  const void* data;
  size_t nbytes;           /* the bytes data holds: at least the shape's */
  const int64_t* shape;
} sparsec_input;

/* A call's output: `data` has room for `nbytes` bytes; sparsec_run_shaped writes the result
 * there and its sizes (the spec's ndim) to `shape`. */
typedef struct {
  void* data;
  size_t nbytes;
  int64_t* shape;
} sparsec_output;

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

/* Run once at the spec's shapes (a dynamic model: the sizes its header describes, those of the
 * reference pair): inputs[i] holds spec->inputs[i].nbytes bytes, outputs[i] receives
 * spec->outputs[i].nbytes bytes (host memory, also for a CUDA model: the copies to and from
 * the GPU are made here). Returns SPARSEC_OK (0) on success, a SPARSEC_ERROR* status (< 0) on
 * error: an index input with a value outside its spec's range is an error (nothing runs). */
int sparsec_run(sparsec_model* model, const void* const* inputs, void* const* outputs);

/* sparsec_run with the size in bytes of every buffer: an input must hold exactly
 * spec->inputs[i].nbytes bytes, an output at least spec->outputs[i].nbytes; anything else is an
 * error before anything runs (sparsec_run cannot tell a short buffer from a right one). NULL
 * arrays or buffers are errors in both. */
int sparsec_run_sized(sparsec_model* model, const void* const* inputs,
                      const size_t* input_bytes, void* const* outputs,
                      const size_t* output_bytes);

/* Run once at the shapes given: inputs[i].shape within spec->inputs[i].min_shape and
 * max_shape on every axis, inputs agreeing on every dynamic dim they share; every buffer at
 * least the size of its tensor. Writes each output's shape to outputs[i].shape. A shape
 * outside the spec is SPARSEC_ERROR_SHAPE and a short input SPARSEC_ERROR_BUFFER, before
 * anything runs; an output without room for its result is SPARSEC_ERROR_BUFFER with no output
 * written (max_nbytes is always enough). Takes fixed-shape models too (their one shape). */
int sparsec_run_shaped(sparsec_model* model, const sparsec_input* inputs,
                       sparsec_output* outputs);

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
