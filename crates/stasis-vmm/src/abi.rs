//! Converting KVM's fixed-layout ABI structs to and from bytes for saved
//! state. KVM keeps these layouts stable across kernel versions (new
//! fields are announced by flags and capability checks), so their raw bytes
//! are a sound thing to persist — as long as the length is checked on the
//! way back in, which [`from_bytes`] does.

/// A KVM ABI struct that is plain old data: `repr(C)` integers and arrays
/// of integers (possibly in unions), for which every bit pattern is valid.
///
/// # Safety
/// Implementors must be `repr(C)`, contain no pointers or references, and
/// accept any bit pattern.
pub unsafe trait KvmPod: Copy + Default {}

// SAFETY: each of these is a bindgen-generated repr(C) struct of integer
// fields, integer arrays and unions of integers from the KVM UAPI.
unsafe impl KvmPod for kvm_bindings::kvm_lapic_state {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_debugregs {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_pit_state2 {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_irqchip {}
// SAFETY: as above.
unsafe impl KvmPod for kvm_bindings::kvm_clock_data {}

/// The bytes of `v`.
pub fn to_bytes<T: KvmPod>(v: &T) -> Vec<u8> {
    // SAFETY: T is POD (KvmPod contract), so viewing it as
    // size_of::<T>() initialised bytes is sound.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

/// A saved struct had the wrong size.
#[derive(Debug, thiserror::Error)]
#[error("saved {what} is {got} bytes, expected {want}")]
pub struct AbiSizeError {
    /// The struct.
    pub what: &'static str,
    /// Bytes found.
    pub got: usize,
    /// Bytes expected.
    pub want: usize,
}

/// Rebuilds a `T` from exactly `size_of::<T>()` bytes.
pub fn from_bytes<T: KvmPod>(what: &'static str, bytes: &[u8]) -> Result<T, AbiSizeError> {
    let want = std::mem::size_of::<T>();
    if bytes.len() != want {
        return Err(AbiSizeError {
            what,
            got: bytes.len(),
            want,
        });
    }
    let mut v = T::default();
    // SAFETY: T is POD, the source has exactly size_of::<T>() bytes and the
    // two regions cannot overlap.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut v as *mut T).cast::<u8>(), want) };
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_size_check() {
        let d = kvm_bindings::kvm_debugregs {
            dr7: 0x400,
            db: [0, 0, 0xdead, 0],
            ..Default::default()
        };
        let b = to_bytes(&d);
        let back: kvm_bindings::kvm_debugregs = from_bytes("debugregs", &b).unwrap();
        assert_eq!(back.dr7, 0x400);
        assert_eq!(back.db[2], 0xdead);
        let e = from_bytes::<kvm_bindings::kvm_debugregs>("debugregs", &b[1..]).unwrap_err();
        assert!(e.to_string().contains("expected"));
    }
}
