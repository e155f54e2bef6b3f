//! Guest TSC frequency across hosts.
//!
//! A guest calibrates its TSC once (or reads it from the timing leaf) and
//! trusts it ever after. A restore on a host whose TSC runs at another
//! rate must either have KVM scale the guest's TSC (`KVM_SET_TSC_KHZ` on a
//! host with `KVM_CAP_TSC_CONTROL`) or knowingly accept that guest time
//! derived from the TSC drifts. Rates within KVM's own tolerance
//! (250 ppm, `tsc_tolerance_ppm`) count as equal.

/// Rates that differ by at most this many parts per million are equal.
pub const TOLERANCE_PPM: u64 = 250;

/// How a restore treats the guest's TSC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "plan", rename_all = "snake_case")]
pub enum TscPlan {
    /// The rates match (or the saved one is unknown): nothing to do.
    Same {
        /// The host's rate in kHz.
        host_khz: u32,
    },
    /// KVM scales the guest's TSC to the saved rate.
    Scale {
        /// The saved rate in kHz.
        saved_khz: u32,
        /// The host's rate in kHz.
        host_khz: u32,
    },
    /// The rates differ and cannot be scaled; the user accepted the drift.
    Mismatch {
        /// The saved rate in kHz.
        saved_khz: u32,
        /// The host's rate in kHz.
        host_khz: u32,
    },
}

/// A TSC rate that cannot be kept, and was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[error("the guest's TSC ran at {saved_khz} kHz and this host's runs at {host_khz} kHz ({ppm} ppm apart), and this host's KVM cannot scale a guest's TSC (no KVM_CAP_TSC_CONTROL): guest time would drift; --allow-tsc-mismatch restores anyway")]
pub struct TscMismatch {
    /// The saved rate in kHz.
    pub saved_khz: u32,
    /// The host's rate in kHz.
    pub host_khz: u32,
    /// How far apart, in ppm.
    pub ppm: u64,
}

/// How far apart two rates are, in parts per million of `saved`.
pub fn ppm_apart(saved_khz: u32, host_khz: u32) -> u64 {
    let diff = (i64::from(host_khz) - i64::from(saved_khz)).unsigned_abs();
    diff * 1_000_000 / u64::from(saved_khz.max(1))
}

/// Decides what a restore does with a guest whose TSC ran at `saved_khz`
/// on a host running at `host_khz` (0 for either means unknown).
pub fn plan(
    saved_khz: u32,
    host_khz: u32,
    host_can_scale: bool,
    allow_mismatch: bool,
) -> Result<TscPlan, TscMismatch> {
    if saved_khz == 0 || host_khz == 0 || ppm_apart(saved_khz, host_khz) <= TOLERANCE_PPM {
        return Ok(TscPlan::Same { host_khz });
    }
    if host_can_scale {
        return Ok(TscPlan::Scale {
            saved_khz,
            host_khz,
        });
    }
    if allow_mismatch {
        return Ok(TscPlan::Mismatch {
            saved_khz,
            host_khz,
        });
    }
    Err(TscMismatch {
        saved_khz,
        host_khz,
        ppm: ppm_apart(saved_khz, host_khz),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_within_tolerance_are_the_same() {
        assert_eq!(
            plan(2_445_406, 2_445_406, false, false),
            Ok(TscPlan::Same {
                host_khz: 2_445_406
            })
        );
        // 250 ppm of 2.4 GHz is 611 kHz.
        assert_eq!(
            plan(2_445_406, 2_446_000, false, false),
            Ok(TscPlan::Same {
                host_khz: 2_446_000
            })
        );
        assert!(plan(2_445_406, 2_447_000, false, false).is_err());
        assert_eq!(
            plan(0, 3_000_000, false, false),
            Ok(TscPlan::Same {
                host_khz: 3_000_000
            })
        );
    }

    #[test]
    fn other_rates_scale_or_need_consent() {
        assert_eq!(
            plan(2_000_000, 3_000_000, true, false),
            Ok(TscPlan::Scale {
                saved_khz: 2_000_000,
                host_khz: 3_000_000
            })
        );
        assert_eq!(
            plan(2_000_000, 3_000_000, false, true),
            Ok(TscPlan::Mismatch {
                saved_khz: 2_000_000,
                host_khz: 3_000_000
            })
        );
        let e = plan(2_000_000, 3_000_000, false, false).unwrap_err();
        assert_eq!(e.ppm, 500_000);
        assert!(e.to_string().contains("--allow-tsc-mismatch"), "{e}");
        assert!(
            e.to_string().starts_with(
                "the guest's TSC ran at 2000000 kHz and this host's runs at 3000000 kHz"
            ),
            "{e}"
        );
    }
}
