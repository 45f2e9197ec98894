//! libtorch's CUDA caching-allocator statistics (allocated, reserved, peak) and cache control,
//! through the C++ shim built by `build.rs`. All read zero / `None` without CUDA.

// The only unsafe code in the crate: calls into the shim's C ABI, which catches every C++
// exception and only writes through the pointers it is given.
#![allow(unsafe_code)]

extern "C" {
    fn tms_device_stats(
        device: i32,
        allocated: *mut i64,
        reserved: *mut i64,
        peak_allocated: *mut i64,
        num_ooms: *mut i64,
    ) -> i32;
    fn tms_reset_peak(device: i32) -> i32;
    fn tms_empty_cache() -> i32;
}

/// One device's allocator counters, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocatorStats {
    /// Held by live tensors.
    pub allocated: u64,
    /// Held by the caching allocator (allocated plus cached).
    pub reserved: u64,
    /// Highest `allocated` since the last reset.
    pub peak_allocated: u64,
    /// Out-of-memory failures seen by the allocator.
    pub num_ooms: u64,
}

/// The counters of `device`; `None` without CUDA.
pub fn stats(device: usize) -> Option<AllocatorStats> {
    let (mut allocated, mut reserved, mut peak, mut ooms) = (0i64, 0i64, 0i64, 0i64);
    let device = i32::try_from(device).ok()?;
    // SAFETY: the shim writes only through these four valid, exclusive pointers and catches
    // every C++ exception.
    let status =
        unsafe { tms_device_stats(device, &mut allocated, &mut reserved, &mut peak, &mut ooms) };
    let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
    (status == 1).then(|| AllocatorStats {
        allocated: unsigned(allocated),
        reserved: unsigned(reserved),
        peak_allocated: unsigned(peak),
        num_ooms: unsigned(ooms),
    })
}

/// Resets `device`'s peak counter; `false` without CUDA.
pub fn reset_peak(device: usize) -> bool {
    let Ok(device) = i32::try_from(device) else {
        return false;
    };
    // SAFETY: no pointers; the shim catches every C++ exception.
    unsafe { tms_reset_peak(device) == 1 }
}

/// Returns cached, unused blocks to the driver (for other processes); `false` without CUDA.
pub fn empty_cache() -> bool {
    // SAFETY: no arguments; the shim catches every C++ exception.
    unsafe { tms_empty_cache() == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_cuda_the_shim_reads_nothing_and_does_not_throw() {
        if tch::Cuda::is_available() {
            assert!(stats(0).is_some());
        } else {
            assert_eq!(stats(0), None);
            assert!(!reset_peak(0));
            assert!(!empty_cache());
        }
    }
}
