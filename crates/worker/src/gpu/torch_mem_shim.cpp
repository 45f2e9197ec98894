// Allocator statistics and cache control that tch does not expose (tch-rs#896): a thin C ABI
// over at::accelerator, which needs no CUDA headers and reads zero on a machine without CUDA.
// Every entry point catches everything: a C++ exception must never cross into Rust.

#include <ATen/Context.h>
#include <ATen/DeviceAccelerator.h>
#include <c10/core/Allocator.h>
#include <cstdint>
#include <cstring>
#include <dlfcn.h>
#include <string>

extern "C" {

// 1: stats written; 0: no CUDA; -1: error.
int tms_device_stats(int device, int64_t* allocated, int64_t* reserved, int64_t* peak_allocated,
                     int64_t* num_ooms) {
  try {
    if (!at::hasCUDA()) return 0;
    auto stats = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[aggregate].current;
    *reserved = stats.reserved_bytes[aggregate].current;
    *peak_allocated = stats.allocated_bytes[aggregate].peak;
    *num_ooms = stats.num_ooms;
    return 1;
  } catch (...) {
    return -1;
  }
}

int tms_reset_peak(int device) {
  try {
    if (!at::hasCUDA()) return 0;
    at::accelerator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 1;
  } catch (...) {
    return -1;
  }
}

int tms_empty_cache() {
  try {
    if (!at::hasCUDA()) return 0;
    at::accelerator::emptyCache();
    return 1;
  } catch (...) {
    return -1;
  }
}

// 1: free/total written; 0: no CUDA; -1: error.
int tms_memory_info(int device, int64_t* free_bytes, int64_t* total_bytes) {
  try {
    if (!at::hasCUDA()) return 0;
    auto info = at::accelerator::getMemoryInfo(static_cast<c10::DeviceIndex>(device));
    *free_bytes = static_cast<int64_t>(info.first);
    *total_bytes = static_cast<int64_t>(info.second);
    return 1;
  } catch (...) {
    return -1;
  }
}

// What the CUDA runtime itself says, looked up by name in the process (libtorch loads cudart
// as a dependency), so no CUDA headers are needed and a CPU-only machine reads "absent".

// Loads libtorch's CUDA library (from the directory libtorch_cpu was loaded from) when the
// NVIDIA driver's libcuda.so.1 can be opened: 1 loaded, 2 no driver (nothing loaded), -1 the
// load failed (dlerror's text in `message`, NUL-terminated, at most `len` bytes). The binary
// does not link libtorch_cuda, so a CPU host never maps it nor the CUDA libraries it needs
// (about 2.5 GB, most of a start's time). Its static initialisers register the CUDA hooks and
// kernels; getCUDAHooks() caches its answer on first use, so this must run before anything
// asks libtorch about CUDA.
int tms_load_torch_cuda(char* message, int len) {
  if (len <= 0) return -1;
  message[0] = '\0';
  void* driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (driver == nullptr) return 2;
  // The driver stays loaded: cudart would load it again at its first call.
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&at::globalContext), &info) == 0 ||
      info.dli_fname == nullptr) {
    std::strncpy(message, "cannot find where libtorch_cpu was loaded from",
                 static_cast<size_t>(len) - 1);
    message[len - 1] = '\0';
    return -1;
  }
  std::string dir(info.dli_fname);
  auto slash = dir.rfind('/');
  dir = slash == std::string::npos ? std::string(".") : dir.substr(0, slash);
  std::string path = dir + "/libtorch_cuda.so";
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* error = dlerror();
    std::strncpy(message, error != nullptr ? error : path.c_str(), static_cast<size_t>(len) - 1);
    message[len - 1] = '\0';
    return -1;
  }
  return 1;
}

// Whether libtorch's CUDA library is loaded in this process: 1 yes, 0 no.
int tms_torch_cuda_linked() {
  void* handle = dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) return 0;
  dlclose(handle);
  return 1;
}

// The CUDA runtime's version (13000 for 13.0); 0 if cudart is not loaded, -1 on error.
int tms_cuda_runtime_version() {
  using Fn = int (*)(int*);
  auto fn = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, "cudaRuntimeGetVersion"));
  if (fn == nullptr) return 0;
  int version = 0;
  return fn(&version) == 0 ? version : -1;
}

// cudaGetDeviceCount's error code (0 = success, count written); -2 if cudart is not loaded.
// The error's text goes to `message` (NUL-terminated, at most `len` bytes).
int tms_cuda_device_count(int* count, char* message, int len) {
  using CountFn = int (*)(int*);
  using TextFn = const char* (*)(int);
  auto count_fn = reinterpret_cast<CountFn>(dlsym(RTLD_DEFAULT, "cudaGetDeviceCount"));
  auto text_fn = reinterpret_cast<TextFn>(dlsym(RTLD_DEFAULT, "cudaGetErrorString"));
  if (count_fn == nullptr || len <= 0) return -2;
  int status = count_fn(count);
  message[0] = '\0';
  if (status != 0 && text_fn != nullptr) {
    const char* text = text_fn(status);
    if (text != nullptr) {
      std::strncpy(message, text, static_cast<size_t>(len) - 1);
      message[len - 1] = '\0';
    }
  }
  return status;
}

// The PCI address of CUDA device `device` into `out` (NUL-terminated); 1 written, 0 not.
int tms_cuda_pci_bus_id(int device, char* out, int len) {
  using Fn = int (*)(char*, int, int);
  auto fn = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, "cudaDeviceGetPCIBusId"));
  if (fn == nullptr || len <= 0) return 0;
  out[0] = '\0';
  return fn(out, len, device) == 0 ? 1 : 0;
}

}  // extern "C"
