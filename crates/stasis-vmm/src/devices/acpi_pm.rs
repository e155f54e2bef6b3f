//! The HW-reduced ACPI sleep control, sleep status and reset registers
//! described in the FADT: how an ACPI guest powers off or resets.

use super::bus::BusDevice;
use crate::exit::{ExitReason, ExitSink};
use crate::layout;

/// SLP_EN in the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// The SLP_TYP the DSDT's `\_S5_` package gives for soft-off.
const SLP_TYP_S5: u8 = 5;

/// The three one-byte registers at [`layout::ACPI_SLEEP_CONTROL_PORT`]
/// onwards. Register offsets: 0 sleep control, 1 sleep status, 2 reset.
pub struct AcpiPmRegisters {
    exit: ExitSink,
}

impl AcpiPmRegisters {
    /// Number of ports the device spans.
    pub const LEN: u64 = (layout::ACPI_RESET_PORT - layout::ACPI_SLEEP_CONTROL_PORT + 1) as u64;

    /// A device that reports power-off and reset to `exit`.
    pub fn new(exit: ExitSink) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPmRegisters {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status reads as "not waking"; the others as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let v = data[0];
        let reset_offset = u64::from(layout::ACPI_RESET_PORT - layout::ACPI_SLEEP_CONTROL_PORT);
        match offset {
            0 if v & SLP_EN != 0 && (v >> 2) & 0x7 == SLP_TYP_S5 => {
                self.exit.report(ExitReason::GuestPoweroff)
            }
            0 => tracing::warn!(
                "guest asked for unsupported ACPI sleep state {}",
                (v >> 2) & 7
            ),
            o if o == reset_offset && v == layout::ACPI_RESET_VALUE => {
                self.exit.report(ExitReason::GuestReset {
                    source: "ACPI reset register",
                })
            }
            _ => {}
        }
    }
}
