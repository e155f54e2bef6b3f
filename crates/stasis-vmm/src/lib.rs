//! The stasis VM core: a KVM VM with its guest memory, vCPUs, boot loaders
//! and devices.
//!
//! Layers, bottom up: [`layout`] (the guest address map), [`memory`]
//! (guest RAM), [`boot`] (kernel loading and entry protocols),
//! [`platform`] (ACPI and MP tables in guest memory), [`cpu`] (CPUID,
//! register state, vCPU threads), [`devices`] (each emulated device), and
//! [`vm`] which puts them together and exposes [`vm::VmControl`] to the
//! control API above.

pub mod abi;
pub mod boot;
pub mod cpu;
pub mod devices;
pub mod dirty;
pub mod exit;
pub mod jobs;
mod kvm;
pub mod layout;
pub mod memory;
pub mod migrate;
pub mod persist;
pub mod platform;
pub mod quiesce;
pub mod uffd;
pub mod vm;
pub mod vm_state;

pub use exit::ExitReason;
pub use vm::{CapturedState, RunState, Vm, VmControl, VmDescription, VmError, VmSource};
