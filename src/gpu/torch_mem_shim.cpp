// Allocator statistics and cache control that tch does not expose (tch-rs#896): a thin C ABI
// over at::accelerator, which needs no CUDA headers and reads zero on a machine without CUDA.
// Every entry point catches everything: a C++ exception must never cross into Rust.

#include <ATen/Context.h>
#include <ATen/DeviceAccelerator.h>
#include <c10/core/Allocator.h>
#include <cstdint>

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

}  // extern "C"
