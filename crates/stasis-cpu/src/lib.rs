//! CPU models for stasis, and everything about a guest's CPU that can be
//! decided without KVM: feature names ([`feature`]), the models and their
//! feature sets ([`model`]), the CPUID a model gives a guest ([`cpuid`]),
//! the size of its XSAVE area ([`xsave`]), which MSRs it saves ([`msr`]),
//! what happens to its TSC on another host ([`tsc`]), and whether a host
//! can run a saved guest ([`compat`]).
//!
//! The VM core (`stasis-vmm`) feeds these functions what KVM reports and
//! applies their answers; `stasis check` and `stasis cpu-models` print
//! them. Written here rather than taken from a crate: no published crate
//! builds x86 CPUID tables for KVM from psABI levels (rust-vmm's
//! `vmm-sys-util` and `kvm-bindings` carry the ioctls, not the policy).

pub mod compat;
pub mod cpuid;
pub mod feature;
pub mod model;
pub mod msr;
mod names;
pub mod reference;
pub mod tsc;
pub mod xsave;

pub use compat::{CompatReport, HostCpu, Problem, SavedCpu, SavedVcpu};
pub use cpuid::GuestCpuid;
pub use feature::{FeatureBit, FeatureSet, UnknownFeature};
pub use model::{CpuModel, CpuSpec, FeatureChange, FeatureChanges, ModelError};
pub use tsc::{TscMismatch, TscPlan};
