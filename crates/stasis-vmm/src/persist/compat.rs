//! Can this host run a snapshot? The saved vCPUs as
//! `stasis_cpu::compat` checks them, against this host probed through
//! KVM; and the decisions the restore then follows.

use kvm_ioctls::Kvm;
use stasis_cpu::{CompatReport, HostCpu, SavedCpu, SavedVcpu, TscPlan};
use stasis_snapshot::{CpuInfo, GuestCpuRecord};

use crate::cpu::setup::RestoreCpu;
use crate::cpu::state::{RestoreLayout, VcpuState, XsaveIo};

/// This host, and what it says about a saved VM.
#[derive(Debug, Clone)]
pub struct HostCheck {
    /// What this host offers.
    pub host: HostCpu,
    /// Every reason it cannot run the VM (none: it can), and the TSC plan.
    pub report: CompatReport,
    /// How this host's KVM transfers XSAVE areas.
    pub xsave_io: XsaveIo,
}

impl HostCheck {
    /// Probes this host for a VM of `vcpus.len()` vCPUs and checks the
    /// saved CPU (the manifest's record `cpu` and the vCPUs) against it.
    pub fn run(
        kvm: &Kvm,
        cpu: &CpuInfo,
        vcpus: &[VcpuState],
        allow_tsc_mismatch: bool,
    ) -> Result<Self, crate::cpu::cpuid::CpuidError> {
        let host = crate::cpu::cpuid::probe_host(kvm, vcpus.len().max(1) as u32)?;
        let msrs: Vec<Vec<(u32, u64)>> = vcpus
            .iter()
            .map(|v| v.msrs.iter().map(|m| (m.index, m.value)).collect())
            .collect();
        let saved: Vec<SavedVcpu<'_>> = vcpus
            .iter()
            .zip(&msrs)
            .map(|(v, m)| SavedVcpu {
                cpuid: &v.cpuid,
                // A longer area restores where the excess is zero.
                xsave_len: v.xsave.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1),
                msrs: m,
                tsc_khz: v.tsc_khz,
            })
            .collect();
        let no_names = Vec::new();
        let saved = SavedCpu {
            vendor: &cpu.vendor,
            cpuid: &cpu.cpuid,
            features: cpu.guest.as_ref().map(|g| &g.features).unwrap_or(&no_names),
            vcpus: saved,
        };
        let report = stasis_cpu::compat::check(&saved, &host, allow_tsc_mismatch);
        Ok(Self {
            host,
            report,
            xsave_io: XsaveIo::for_host(kvm),
        })
    }

    /// How the restore puts the vCPUs back, for a host that can run them.
    pub fn restore_cpu(&self, saved: Option<GuestCpuRecord>) -> RestoreCpu {
        RestoreCpu {
            layout: RestoreLayout {
                xsave_io: self.xsave_io,
                scale_tsc: matches!(self.report.tsc, Some(TscPlan::Scale { .. })),
                skip_msrs: self.report.skipped_msrs.clone(),
            },
            saved,
        }
    }
}
