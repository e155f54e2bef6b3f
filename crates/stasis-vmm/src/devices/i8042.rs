//! The i8042 keyboard controller, present so that guests can reset the
//! machine through it (command 0xFE pulses the CPU reset line).

use vm_superio::{I8042Device, Trigger};

use super::bus::BusDevice;
use crate::exit::{ExitReason, ExitSink};

/// Turns the controller's reset pulse into a VM exit.
pub struct ResetTrigger(ExitSink);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.report(ExitReason::GuestReset { source: "i8042" });
        Ok(())
    }
}

/// The i8042 on ports 0x60 (data, offset 0) and 0x64 (command, offset 4).
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// A controller that reports resets to `exit`.
    pub fn new(exit: ExitSink) -> Self {
        Self(I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.0.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let _ = self.0.write(offset as u8, data[0]);
    }
}
