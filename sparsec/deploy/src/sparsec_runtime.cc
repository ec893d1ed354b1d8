/*
 * The C API of sparsec.h over the TVM runtime: a package's library (model.so, or the statically
 * linked libNAME.a) holds a Relax VM executable; this loads it, keeps one aligned tensor per
 * input (on the GPU for a CUDA model), and copies the caller's buffers in and the results out.
 */
#include "sparsec.h"

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/runtime/c_backend_api.h>

#include <dlfcn.h>
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

thread_local std::string last_error;

int fail(const std::string& message, int status = SPARSEC_ERROR) {
  last_error = message;
  return status;
}

DLDataType to_dl(sparsec_dtype dtype) {
  switch (dtype) {
    case SPARSEC_FLOAT32: return {kDLFloat, 32, 1};
    case SPARSEC_FLOAT16: return {kDLFloat, 16, 1};
    case SPARSEC_FLOAT64: return {kDLFloat, 64, 1};
    case SPARSEC_INT64: return {kDLInt, 64, 1};
    case SPARSEC_INT32: return {kDLInt, 32, 1};
    case SPARSEC_INT8: return {kDLInt, 8, 1};
    case SPARSEC_UINT8: return {kDLUInt, 8, 1};
    case SPARSEC_BOOL: return {kDLBool, 8, 1};
  }
  return {kDLFloat, 32, 1};
}

/* 64-byte aligned host memory: the kernels assume TVM's alignment for their arguments. */
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = (tvm::ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, bytes ? bytes : 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

void collect(const tvm::ffi::Any& value, std::vector<tvm::ffi::Tensor>* out) {
  if (auto tensor = value.as<tvm::ffi::Tensor>()) {
    out->push_back(*tensor);
  } else if (auto items = value.as<tvm::ffi::Array<tvm::ffi::Any>>()) {
    for (const tvm::ffi::Any& item : *items) collect(item, out);
  } else {
    throw std::runtime_error("the model returned something other than tensors");
  }
}

bool read_file(const char* path, size_t bytes, std::vector<char>* data) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return fail(std::string("cannot open ") + path), false;
  if (static_cast<size_t>(f.tellg()) != bytes) {
    return fail(std::string(path) + " has " + std::to_string(static_cast<long long>(f.tellg())) +
                " bytes, the model's spec needs " + std::to_string(bytes)), false;
  }
  data->resize(bytes);
  f.seekg(0);
  f.read(data->data(), static_cast<std::streamsize>(bytes));
  return static_cast<bool>(f) || (fail(std::string("cannot read ") + path), false);
}

double as_double(const char* p, sparsec_dtype dtype) {
  switch (dtype) {
    case SPARSEC_FLOAT32: { float v; std::memcpy(&v, p, 4); return v; }
    case SPARSEC_FLOAT64: { double v; std::memcpy(&v, p, 8); return v; }
    case SPARSEC_INT64: { int64_t v; std::memcpy(&v, p, 8); return static_cast<double>(v); }
    case SPARSEC_INT32: { int32_t v; std::memcpy(&v, p, 4); return v; }
    case SPARSEC_INT8: return static_cast<int8_t>(*p);
    case SPARSEC_UINT8: case SPARSEC_BOOL: return static_cast<uint8_t>(*p);
    case SPARSEC_FLOAT16: break;  // compared bitwise below
  }
  return 0.0;
}

size_t element_size(sparsec_dtype dtype) {
  DLDataType dl = to_dl(dtype);
  return (dl.bits * dl.lanes + 7) / 8;
}

/* The first value of an index input outside its spec's range, as an error message ("" if
 * all are inside); `nbytes`: the bytes of this call's tensor. */
std::string out_of_range(const sparsec_tensor_spec& spec, const void* data, size_t nbytes) {
  if (spec.dtype == SPARSEC_FLOAT32 || spec.dtype == SPARSEC_FLOAT64) {
    /* NaN: ONNX Runtime propagates it, compiled kernels may drop it (ReLU): refused, as by
     * `sparsec run` */
    const char* p = static_cast<const char*>(data);
    size_t size = element_size(spec.dtype);
    for (size_t k = 0; k < nbytes; k += size) {
      if (std::isnan(as_double(p + k, spec.dtype))) {
        return "input " + std::string(spec.name) + " holds NaN at element " +
               std::to_string(k / size);
      }
    }
  }
  if (spec.range == nullptr) return "";
  const char* p = static_cast<const char*>(data);
  size_t size = element_size(spec.dtype);
  for (size_t k = 0; k < nbytes; k += size) {
    double v = as_double(p + k, spec.dtype);
    if (v < static_cast<double>(spec.range[0]) || v > static_cast<double>(spec.range[1])) {
      return "input " + std::string(spec.name) + " holds " +
             std::to_string(static_cast<long long>(v)) + " at element " +
             std::to_string(k / size) + ", outside [" + std::to_string(spec.range[0]) + ", " +
             std::to_string(spec.range[1]) + "], the rows of the table it indexes";
    }
  }
  return "";
}

/* SHA-256 (FIPS 180-4) of a file, as lowercase hex ("" if it cannot be read). */
std::string sha256_hex(const char* path) {
  static const uint32_t k[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
      0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
      0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
      0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
      0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
      0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
      0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
      0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
      0xc67178f2};
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
  auto block = [&](const unsigned char* p) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      w[i] = (uint32_t(p[4 * i]) << 24) | (uint32_t(p[4 * i + 1]) << 16) |
             (uint32_t(p[4 * i + 2]) << 8) | uint32_t(p[4 * i + 3]);
    }
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], x = h[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = x + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      x = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += x;
  };
  std::ifstream file(path, std::ios::binary);
  if (!file) return "";
  std::vector<unsigned char> buf(1 << 16);
  uint64_t total = 0;
  size_t used = 0;  // bytes of buf not yet hashed (< 64 between reads)
  while (file) {
    file.read(reinterpret_cast<char*>(buf.data() + used), static_cast<std::streamsize>(buf.size() - used));
    size_t got = static_cast<size_t>(file.gcount());
    total += got;
    used += got;
    size_t whole = used / 64 * 64;
    for (size_t off = 0; off < whole; off += 64) block(buf.data() + off);
    std::memmove(buf.data(), buf.data() + whole, used - whole);
    used -= whole;
  }
  unsigned char tail[128] = {0};
  std::memcpy(tail, buf.data(), used);
  tail[used] = 0x80;
  size_t len = used + 1 + 8 <= 64 ? 64 : 128;
  uint64_t bits = total * 8;
  for (int i = 0; i < 8; ++i) tail[len - 1 - i] = static_cast<unsigned char>(bits >> (8 * i));
  for (size_t off = 0; off < len; off += 64) block(tail + off);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (uint32_t v : h) {
    for (int shift = 28; shift >= 0; shift -= 4) out += hex[(v >> shift) & 0xf];
  }
  return out;
}

/* The package's model.so before the loader maps it: the spec's size and SHA-256 (headers of
 * API version 3), else the ELF tables inside the file. A truncated or foreign library is an
 * error here, not a SIGBUS or a wrong model later. */
bool check_library(const sparsec_model_spec* spec, const char* path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return fail(std::string("cannot open ") + path), false;
  int64_t size = static_cast<int64_t>(f.tellg());
  if (spec->api_version >= 3 && spec->library_bytes > 0) {
    if (size != spec->library_bytes) {
      return fail(std::string(path) + " has " + std::to_string(size) + " bytes, the model's " +
                  "spec says " + std::to_string(spec->library_bytes) +
                  " (an incomplete copy, or another model's library)"), false;
    }
    if (spec->library_sha256 != nullptr && sha256_hex(path) != spec->library_sha256) {
      return fail(std::string(path) + " is not the library this header was generated for " +
                  "(its SHA-256 differs)"), false;
    }
    return true;
  }
  unsigned char e[64] = {0};
  f.seekg(0);
  f.read(reinterpret_cast<char*>(e), 64);
  bool wide = e[4] == 2;
  auto field = [&](int at, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | e[at + i];  // little-endian ELF
    return v;
  };
  bool ok = f.gcount() >= 52 && std::memcmp(e, "\177ELF", 4) == 0 && e[5] == 1;
  if (ok) {
    uint64_t phoff = wide ? field(32, 8) : field(28, 4), shoff = wide ? field(40, 8) : field(32, 4);
    int at = wide ? 54 : 42;
    uint64_t phsize = field(at, 2), phnum = field(at + 2, 2);
    uint64_t shsize = field(at + 4, 2), shnum = field(at + 6, 2);
    uint64_t n = static_cast<uint64_t>(size);
    ok = phoff + phnum * phsize <= n && shoff + shnum * shsize <= n;
  }
  if (!ok) {
    return fail(std::string(path) + " is not a complete shared library (" +
                std::to_string(size) + " bytes): copy the package again"), false;
  }
  return true;
}

}  // namespace

/* The Relax VM's executable loader registers itself when libtvm_runtime is loaded. A program
 * that loads its model from model.so calls nothing in that library directly, so a linker with
 * --as-needed would drop it; this reference keeps it. */
extern "C" __attribute__((used)) void* const sparsec_needs_tvm_runtime =
    reinterpret_cast<void*>(&TVMBackendAllocWorkspace);

struct sparsec_model {
  const sparsec_model_spec* spec;
  tvm::ffi::Module vm;
  tvm::ffi::Function main;
  std::vector<tvm::ffi::Tensor> inputs;
  bool on_gpu;
};

namespace {

/* A CUDA model's library holds its kernels as CUDA source: a CUDA-enabled TVM runtime loads it
 * through libtvm_runtime_cuda.so, which compiles the source with the global function
 * tvm_callback_cuda_compile. Here that function answers with the package's kernels.fatbin
 * (nvcc's build of that source for the target's GPU, made when the package was compiled), so
 * the device needs no compiler. */
bool prepare_cuda(const char* library) {
  Dl_info self;
  if (dladdr(reinterpret_cast<void*>(&TVMBackendAllocWorkspace), &self) == 0) {
    return fail("cannot locate libtvm_runtime.so"), false;
  }
  std::string dir(self.dli_fname);
  dir = dir.substr(0, dir.find_last_of('/') + 1);
  if (dlopen((dir + "libtvm_runtime_cuda.so").c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    return fail(std::string("cannot load the TVM CUDA runtime: ") + dlerror()), false;
  }
  std::string lib(library);
  std::string path = lib.substr(0, lib.find_last_of('/') + 1) + "kernels.fatbin";
  std::ifstream f(path, std::ios::binary);
  if (!f) return fail("cannot open " + path + " (a CUDA package's kernels)"), false;
  std::string fatbin((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  tvm::ffi::Function::SetGlobal(
      "tvm_callback_cuda_compile",
      tvm::ffi::Function::FromPacked([fatbin](tvm::ffi::PackedArgs, tvm::ffi::Any* rv) {
        *rv = tvm::ffi::Bytes(fatbin.data(), fatbin.size());
      }),
      true);
  return true;
}

// Linux hands a process the AMX tile state only on request (kernel 5.16+); code that
// touches a tile register without it dies with SIGILL. Asked once per process, before any
// model runs; on CPUs or kernels without AMX the request fails harmlessly.
void request_amx() {
#if defined(__linux__) && defined(__x86_64__)
  static const long granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                      18 /* XFEATURE_XTILEDATA */);
  (void)granted;
#endif
}

tvm::ffi::Function global(const char* name) {
  return tvm::ffi::Function::GetGlobalRequired(name);
}

}  // namespace

extern "C" {

sparsec_model* sparsec_open(const sparsec_model_spec* spec, const char* library) {
  last_error.clear();
  if (spec == nullptr) return fail("sparsec_open: spec is NULL"), nullptr;
  if (spec->api_version < 2 || spec->api_version > SPARSEC_API_VERSION) {
    return fail("the model header was generated for sparsec C API version " +
                std::to_string(spec->api_version) + ", this runtime implements 2 to " +
                std::to_string(SPARSEC_API_VERSION)), nullptr;
  }
  if (spec->num_inputs < 0 || spec->num_outputs < 0 ||
      (spec->num_inputs > 0 && spec->inputs == nullptr) ||
      (spec->num_outputs > 0 && spec->outputs == nullptr)) {
    return fail("sparsec_open: the spec's tensor lists are invalid"), nullptr;
  }
  if (library != nullptr && !check_library(spec, library)) return nullptr;
  bool on_gpu = spec->device_type == kDLCUDA;
  if (on_gpu && library == nullptr) {
    return fail("a CUDA model opens from its model.so (there is no static archive)"), nullptr;
  }
  if (spec->device_type != kDLCPU && !on_gpu) {
    return fail("device type " + std::to_string(spec->device_type) + " is not supported"),
           nullptr;
  }
  if (!on_gpu) request_amx();
  try {
    if (on_gpu && !prepare_cuda(library)) return nullptr;
    tvm::ffi::Module lib =
        library != nullptr
            ? tvm::ffi::Module::LoadFromFile(library)
            : tvm::ffi::Function::GetGlobalRequired("ffi.SystemLib")(
                  std::string(spec->system_lib_prefix)).cast<tvm::ffi::Module>();
    auto load = lib->GetFunction("vm_load_executable", true);
    if (!load.has_value()) {
      return fail(library ? std::string(library) + " holds no sparsec model"
                          : "no model with prefix '" + std::string(spec->system_lib_prefix) +
                                "' is linked in (link lib" + spec->name +
                                ".a whole-archive)"), nullptr;
    }
    tvm::ffi::Module vm = (*load)().cast<tvm::ffi::Module>();
    // device type, device id, allocator (2: pooled) for the kernels' device and for the host
    vm->GetFunction("vm_initialization").value()(spec->device_type, 0, 2,
                                                 static_cast<int>(kDLCPU), 0, 2);
    auto model = new sparsec_model{spec, vm, vm->GetFunction("main").value(), {}, on_gpu};
    DLDevice cpu{kDLCPU, 0}, gpu{kDLCUDA, 0};
    for (int i = 0; i < spec->num_inputs; ++i) {
      const sparsec_tensor_spec& in = spec->inputs[i];
      std::vector<int64_t> shape(in.shape, in.shape + in.ndim);
      model->inputs.push_back(
          on_gpu ? global("runtime.TVMTensorAllocWithScope")(
                       tvm::ffi::Shape(shape), to_dl(in.dtype), gpu,
                       tvm::ffi::Optional<tvm::ffi::String>()).cast<tvm::ffi::Tensor>()
                 : tvm::ffi::Tensor::FromNDAlloc(AlignedAlloc(), tvm::ffi::Shape(shape),
                                                 to_dl(in.dtype), cpu));
    }
    return model;
  } catch (const std::exception& e) {
    return fail(e.what()), nullptr;
  }
}

int sparsec_run(sparsec_model* model, const void* const* inputs, void* const* outputs) {
  return sparsec_run_sized(model, inputs, nullptr, outputs, nullptr);
}

int sparsec_run_sized(sparsec_model* model, const void* const* inputs,
                      const size_t* input_bytes, void* const* outputs,
                      const size_t* output_bytes) {
  last_error.clear();
  if (model == nullptr) return fail("sparsec_run: model is NULL");
  const sparsec_model_spec* spec = model->spec;
  if (inputs == nullptr && spec->num_inputs > 0) return fail("sparsec_run: inputs is NULL");
  if (outputs == nullptr) return fail("sparsec_run: outputs is NULL");
  std::vector<sparsec_input> ins(spec->num_inputs);
  std::vector<sparsec_output> outs(spec->num_outputs);
  std::vector<std::vector<int64_t>> out_shapes(spec->num_outputs);
  for (int i = 0; i < spec->num_inputs; ++i) {
    const sparsec_tensor_spec& in = spec->inputs[i];
    if (input_bytes != nullptr && input_bytes[i] != in.nbytes) {
      return fail("sparsec_run: input " + std::string(in.name) + " has " +
                  std::to_string(input_bytes[i]) + " bytes, the spec " + std::to_string(in.nbytes),
                  SPARSEC_ERROR_BUFFER);
    }
    ins[i] = {inputs[i], in.nbytes, in.shape};
  }
  for (int i = 0; i < spec->num_outputs; ++i) {
    const sparsec_tensor_spec& out = spec->outputs[i];
    if (output_bytes != nullptr && output_bytes[i] < out.nbytes) {
      return fail("sparsec_run: output " + std::string(out.name) + " has room for " +
                  std::to_string(output_bytes[i]) + " bytes, it needs " +
                  std::to_string(out.nbytes), SPARSEC_ERROR_BUFFER);
    }
    out_shapes[i].resize(out.ndim > 0 ? out.ndim : 1);
    outs[i] = {outputs[i], out.nbytes, out_shapes[i].data()};
  }
  return sparsec_run_shaped(model, ins.data(), outs.data());
}

namespace {

std::string shape_text(const int64_t* shape, int ndim) {
  std::string s = "[";
  for (int k = 0; k < ndim; ++k) s += (k ? ", " : "") + std::to_string(shape[k]);
  return s + "]";
}

/* The bytes of a tensor of `spec`'s dtype at `shape`. */
size_t bytes_at(const sparsec_tensor_spec& spec, const int64_t* shape) {
  size_t n = element_size(spec.dtype);
  for (int k = 0; k < spec.ndim; ++k) n *= static_cast<size_t>(shape[k]);
  return n;
}

/* Every input's shape within its spec's sizes, the inputs agreeing on every dynamic dim, and
 * every buffer holding its shape's bytes: SPARSEC_OK, or the status of the first that is
 * not. */
int check_inputs(const sparsec_model_spec* spec, const sparsec_input* inputs) {
  std::vector<std::pair<std::string, std::string>> seen;  // dim name -> "7 (input_ids axis 1)"
  std::vector<int64_t> sizes;
  for (int i = 0; i < spec->num_inputs; ++i) {
    const sparsec_tensor_spec& in = spec->inputs[i];
    const std::string name(in.name);
    if (inputs[i].data == nullptr) return fail("sparsec_run: input " + name + " is NULL");
    if (inputs[i].shape == nullptr && in.ndim > 0) {
      return fail("sparsec_run: the shape of input " + name + " is NULL");
    }
    bool dynamic = spec->api_version >= 4 && in.min_shape != nullptr && in.max_shape != nullptr;
    for (int k = 0; k < in.ndim; ++k) {
      int64_t n = inputs[i].shape[k];
      int64_t lo = dynamic ? in.min_shape[k] : in.shape[k];
      int64_t hi = dynamic ? in.max_shape[k] : in.shape[k];
      const char* dim = dynamic && in.dims != nullptr ? in.dims[k] : nullptr;
      std::string where = name + " axis " + std::to_string(k);
      if (n < lo || n > hi) {
        return fail("input " + name + " has shape " + shape_text(inputs[i].shape, in.ndim) + ": " +
                    (dim != nullptr ? std::string(dim) + " = " + std::to_string(n) + " (axis " +
                                          std::to_string(k) + ") is outside the range " +
                                          std::to_string(lo) + ".." + std::to_string(hi) +
                                          " the model was compiled for"
                     : lo == hi ? "axis " + std::to_string(k) + " is fixed at " + std::to_string(lo)
                                : "axis " + std::to_string(k) + " is outside " +
                                      std::to_string(lo) + ".." + std::to_string(hi)),
                    SPARSEC_ERROR_SHAPE);
      }
      if (dim == nullptr) continue;
      std::string here = std::to_string(n) + " (" + where + ")";
      bool known = false;
      for (size_t j = 0; j < seen.size(); ++j) {
        if (seen[j].first != dim) continue;
        known = true;
        if (sizes[j] != n) {
          return fail("inputs disagree on " + std::string(dim) + ": " + seen[j].second + " and " +
                      here, SPARSEC_ERROR_SHAPE);
        }
      }
      if (!known) seen.emplace_back(dim, here), sizes.push_back(n);
    }
    size_t need = bytes_at(in, inputs[i].shape);
    if (inputs[i].nbytes < need) {
      return fail("input " + name + " holds " + std::to_string(inputs[i].nbytes) + " bytes, " +
                  "its shape " + shape_text(inputs[i].shape, in.ndim) + " needs " +
                  std::to_string(need), SPARSEC_ERROR_BUFFER);
    }
  }
  return SPARSEC_OK;
}

}  // namespace

int sparsec_run_shaped(sparsec_model* model, const sparsec_input* inputs,
                       sparsec_output* outputs) {
  last_error.clear();
  if (model == nullptr) return fail("sparsec_run: model is NULL");
  const sparsec_model_spec* spec = model->spec;
  if (inputs == nullptr && spec->num_inputs > 0) return fail("sparsec_run: inputs is NULL");
  if (outputs == nullptr) return fail("sparsec_run: outputs is NULL");
  int status = check_inputs(spec, inputs);
  if (status != SPARSEC_OK) return status;
  for (int i = 0; i < spec->num_outputs; ++i) {
    const std::string name(spec->outputs[i].name);
    if (outputs[i].data == nullptr) return fail("sparsec_run: output " + name + " is NULL");
    if (outputs[i].shape == nullptr) {
      return fail("sparsec_run: the shape of output " + name + " is NULL");
    }
  }
  try {
    std::vector<tvm::ffi::AnyView> args;
    for (int i = 0; i < spec->num_inputs; ++i) {
      size_t bytes = bytes_at(spec->inputs[i], inputs[i].shape);
      std::string bad = out_of_range(spec->inputs[i], inputs[i].data, bytes);
      if (!bad.empty()) return fail(bad);
    }
    DLDevice cpu{kDLCPU, 0}, gpu{kDLCUDA, 0};
    for (int i = 0; i < spec->num_inputs; ++i) {
      const sparsec_tensor_spec& in = spec->inputs[i];
      tvm::ffi::Tensor& t = model->inputs[i];
      std::vector<int64_t> shape(inputs[i].shape, inputs[i].shape + in.ndim);
      if (!std::equal(shape.begin(), shape.end(), t.shape().begin())) {
        // another size than the last call's: a tensor of this one (kept for the next call)
        t = model->on_gpu ? global("runtime.TVMTensorAllocWithScope")(
                                tvm::ffi::Shape(shape), to_dl(in.dtype), gpu,
                                tvm::ffi::Optional<tvm::ffi::String>()).cast<tvm::ffi::Tensor>()
                          : tvm::ffi::Tensor::FromNDAlloc(AlignedAlloc(), tvm::ffi::Shape(shape),
                                                          to_dl(in.dtype), cpu);
      }
      size_t bytes = bytes_at(in, inputs[i].shape);
      if (model->on_gpu) {
        global("runtime.TVMTensorCopyFromBytes")(t, const_cast<void*>(inputs[i].data),
                                                static_cast<int64_t>(bytes));
      } else {
        std::memcpy(t.data_ptr(), inputs[i].data, bytes);
      }
      args.emplace_back(t);
    }
    tvm::ffi::Any result;
    model->main.CallPacked(args.data(), static_cast<int>(args.size()), &result);
    std::vector<tvm::ffi::Tensor> outs;
    collect(result, &outs);
    if (static_cast<int>(outs.size()) != spec->num_outputs) {
      return fail("the model returned " + std::to_string(outs.size()) + " outputs, its spec has " +
                  std::to_string(spec->num_outputs));
    }
    for (int i = 0; i < spec->num_outputs; ++i) {   // every output fits before any is written
      const sparsec_tensor_spec& o = spec->outputs[i];
      size_t bytes = tvm::ffi::GetDataSize(outs[i]);
      if (outs[i].ndim() != o.ndim) {
        return fail("output " + std::string(o.name) + " has " + std::to_string(outs[i].ndim()) +
                    " axes, its spec " + std::to_string(o.ndim));
      }
      if (bytes > outputs[i].nbytes) {
        std::vector<int64_t> got(outs[i].shape().begin(), outs[i].shape().end());
        return fail("output " + std::string(o.name) + " has room for " +
                    std::to_string(outputs[i].nbytes) + " bytes, its result " +
                    shape_text(got.data(), o.ndim) + " needs " + std::to_string(bytes),
                    SPARSEC_ERROR_BUFFER);
      }
    }
    for (int i = 0; i < spec->num_outputs; ++i) {
      size_t bytes = tvm::ffi::GetDataSize(outs[i]);
      if (model->on_gpu) {
        global("runtime.TVMTensorCopyToBytes")(outs[i], outputs[i].data,
                                               static_cast<int64_t>(bytes));
      } else {
        std::memcpy(outputs[i].data, outs[i].data_ptr(), bytes);
      }
      for (int k = 0; k < spec->outputs[i].ndim; ++k) outputs[i].shape[k] = outs[i].shape()[k];
    }
    return SPARSEC_OK;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

/* |out - ref|, where NaN and infinities match only the same value in the reference: any
   other NaN or infinity is an infinite error (std::max(err, NaN) would keep err). */
static double element_error(double out, double ref) {
  if (std::isnan(ref) || std::isnan(out)) return std::isnan(ref) && std::isnan(out) ? 0.0 : INFINITY;
  if (std::isinf(ref) || std::isinf(out)) return out == ref ? 0.0 : INFINITY;
  return std::fabs(out - ref);
}

int sparsec_check_reference(sparsec_model* model, const char* inputs_bin,
                            const char* outputs_bin, double* max_abs_err) {
  last_error.clear();
  if (model == nullptr) return fail("sparsec_check_reference: model is NULL");
  if (inputs_bin == nullptr || outputs_bin == nullptr) {
    return fail("sparsec_check_reference: a reference file path is NULL");
  }
  const sparsec_model_spec* spec = model->spec;
  size_t in_bytes = 0, out_bytes = 0;
  for (int i = 0; i < spec->num_inputs; ++i) in_bytes += spec->inputs[i].nbytes;
  for (int i = 0; i < spec->num_outputs; ++i) out_bytes += spec->outputs[i].nbytes;
  std::vector<char> x, want, got(out_bytes);
  if (!read_file(inputs_bin, in_bytes, &x) || !read_file(outputs_bin, out_bytes, &want)) return -1;
  std::vector<const void*> ins;
  std::vector<void*> outs;
  for (int i = 0, at = 0; i < spec->num_inputs; at += spec->inputs[i++].nbytes) {
    ins.push_back(x.data() + at);
  }
  for (int i = 0, at = 0; i < spec->num_outputs; at += spec->outputs[i++].nbytes) {
    outs.push_back(got.data() + at);
  }
  if (sparsec_run(model, ins.data(), outs.data()) != 0) return -1;
  bool ok = true;
  double worst = 0.0;
  std::string report;
  for (int i = 0; i < spec->num_outputs; ++i) {
    const sparsec_tensor_spec& o = spec->outputs[i];
    const char* a = static_cast<const char*>(outs[i]);
    const char* b = want.data() + (a - got.data());
    size_t size = element_size(o.dtype);
    double err = 0.0, peak = 0.0;
    for (size_t k = 0; k < o.nbytes; k += size) {
      if (o.dtype == SPARSEC_FLOAT16) {
        err = std::max(err, std::memcmp(a + k, b + k, 2) == 0 ? 0.0 : INFINITY);
        continue;
      }
      double ref = as_double(b + k, o.dtype), out = as_double(a + k, o.dtype);
      if (std::isfinite(ref)) peak = std::max(peak, std::fabs(ref));
      err = std::max(err, element_error(out, ref));
    }
    double bound = spec->atol + spec->rtol * peak;
    worst = std::max(worst, err);
    if (!(err <= bound)) {
      ok = false;
      report += std::string(report.empty() ? "" : "; ") + "output " + o.name + ": max abs err " +
                std::to_string(err) + " > bound " + std::to_string(bound);
    }
  }
  if (max_abs_err != nullptr) *max_abs_err = worst;
  if (!ok) last_error = report;
  return ok ? 0 : 1;
}

void sparsec_close(sparsec_model* model) { delete model; }

const char* sparsec_last_error(void) { return last_error.c_str(); }

}  // extern "C"
