//! Emulated devices. Each device lives in its own module, with the state it
//! saves beside it.

pub mod acpi_pm;
pub mod bus;
pub mod i8042;
pub mod output_file;
pub mod rtc;
pub mod serial;
pub mod virtio;
pub mod vmgenid;
