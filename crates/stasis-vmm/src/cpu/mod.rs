//! vCPUs: their CPUID, their boot state, and the threads that run them.

pub mod cpuid;
pub mod invariants;
pub mod kick;
pub mod regs;
pub mod setup;
pub mod state;
pub mod vcpu;
