//! `stasis check` (can this host run a snapshot?) and `stasis cpu-models`
//! (which CPU models can this host run?).

use serde_json::json;
use stasis_cpu::{cpuid as model_cpuid, CpuModel, CpuSpec, HostCpu, TscPlan};
use stasis_vmm::cpu::cpuid::{self, added_by_kvm};
use stasis_vmm::persist::restore;

use crate::cli::{CheckArgs, CpuModelsArgs};

/// Exit status when the host cannot run the snapshot, or it cannot be read.
const EXIT_NO: i32 = 1;

fn host_line(h: &HostCpu) -> String {
    format!(
        "{} {}, TSC {} kHz ({}), XSAVE area {} bytes, at most {} vCPUs",
        h.vendor,
        if h.brand.is_empty() {
            "(no brand string)"
        } else {
            &h.brand
        },
        h.tsc_khz,
        if h.tsc_scaling {
            "KVM can scale guest TSCs"
        } else {
            "no TSC scaling"
        },
        h.xsave_size,
        h.max_vcpus
    )
}

fn tsc_line(p: &TscPlan) -> String {
    match p {
        TscPlan::Same { host_khz } => format!("same rate ({host_khz} kHz)"),
        TscPlan::Scale {
            saved_khz,
            host_khz,
        } => format!("KVM scales it from this host's {host_khz} kHz to the saved {saved_khz} kHz"),
        TscPlan::Mismatch {
            saved_khz,
            host_khz,
        } => format!("runs at this host's {host_khz} kHz instead of the saved {saved_khz} kHz (accepted; guest time drifts)"),
    }
}

/// `stasis check DIR [--json] [--allow-tsc-mismatch]`.
pub fn check(args: &CheckArgs) -> i32 {
    let c = match restore::check_snapshot(&args.dir, args.allow_tsc_mismatch) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stasis: cannot check {}: {e}", args.dir.display());
            return EXIT_NO;
        }
    };
    let report = &c.check.report;
    let model = match &c.guest_cpu {
        Some(g) => g.spec(),
        None => "host (recorded before CPU models)".to_string(),
    };
    if args.json {
        let out = json!({
            "snapshot": args.dir.display().to_string(),
            "runnable": report.is_ok(),
            "cpu_model": model,
            "vendor": c.vendor,
            "vcpus": c.config.vcpus,
            "memory_mib": c.config.memory_mib,
            "guest_cpu": c.guest_cpu,
            "problems": report.problems,
            "messages": report.problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "tsc": report.tsc,
            "skipped_msrs": report.skipped_msrs,
            "host": {
                "vendor": c.check.host.vendor,
                "brand": c.check.host.brand,
                "tsc_khz": c.check.host.tsc_khz,
                "tsc_scaling": c.check.host.tsc_scaling,
                "xsave_size": c.check.host.xsave_size,
                "max_vcpus": c.check.host.max_vcpus,
            },
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serializes")
        );
    } else {
        println!(
            "snapshot {}: CPU model {model}, {} vCPU(s), {} MiB, taken on {}",
            args.dir.display(),
            c.config.vcpus,
            c.config.memory_mib,
            c.vendor
        );
        println!("this host: {}", host_line(&c.check.host));
        if report.is_ok() {
            println!("runnable here: yes");
            if let Some(t) = &report.tsc {
                println!("  guest TSC: {}", tsc_line(t));
            }
            if !report.skipped_msrs.is_empty() {
                let m: Vec<String> = report
                    .skipped_msrs
                    .iter()
                    .map(|i| stasis_cpu::msr::describe(*i))
                    .collect();
                println!(
                    "  MSRs this host lacks, zero in the snapshot, left out: {}",
                    m.join(", ")
                );
            }
            println!("  (memory checksums not checked: `stasis verify` does that)");
        } else {
            println!("runnable here: no");
            for p in &report.problems {
                println!("  - {p}");
            }
        }
    }
    if report.is_ok() {
        0
    } else {
        EXIT_NO
    }
}

/// One model's verdict on this host.
struct ModelRow {
    model: CpuModel,
    missing: Vec<String>,
    features: Vec<String>,
    added_by_host: Vec<String>,
}

fn assess(kvm: &kvm_ioctls::Kvm, host: &HostCpu, model: CpuModel) -> Result<ModelRow, String> {
    let spec = CpuSpec::new(model);
    match model_cpuid::guest_template(&spec, &host.offer, 1 << 32) {
        Err(stasis_cpu::ModelError::Missing { missing, .. }) => Ok(ModelRow {
            model,
            missing,
            features: vec![],
            added_by_host: vec![],
        }),
        Err(e) => Err(e.to_string()),
        Ok(t) => {
            let applied = cpuid::probe_applied(kvm, &t.cpuid, 1).map_err(|e| e.to_string())?;
            Ok(ModelRow {
                model,
                missing: vec![],
                features: stasis_cpu::FeatureSet::of(&applied).names(),
                added_by_host: added_by_kvm(&t.cpuid, &applied).names(),
            })
        }
    }
}

/// `stasis cpu-models [--json] [-v]`.
pub fn cpu_models(args: &CpuModelsArgs) -> i32 {
    let rows = (|| -> Result<(HostCpu, Vec<ModelRow>), String> {
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| {
            format!("cannot open /dev/kvm: {e} (is KVM available on this host, and may this user use it?)")
        })?;
        let host = cpuid::probe_host(&kvm, 1).map_err(|e| e.to_string())?;
        let rows = CpuModel::ALL
            .into_iter()
            .map(|m| assess(&kvm, &host, m))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((host, rows))
    })();
    let (host, rows) = match rows {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stasis: {e}");
            return EXIT_NO;
        }
    };
    if args.json {
        let out = json!({
            "host": {
                "vendor": host.vendor,
                "brand": host.brand,
                "tsc_khz": host.tsc_khz,
                "tsc_scaling": host.tsc_scaling,
                "xsave_size": host.xsave_size,
                "max_vcpus": host.max_vcpus,
            },
            "models": rows.iter().map(|r| json!({
                "model": r.model.name(),
                "description": r.model.description(),
                "runs_here": r.missing.is_empty(),
                "missing": r.missing,
                "features": r.features,
                "added_by_host": r.added_by_host,
                "exact_here": r.missing.is_empty() && r.added_by_host.is_empty(),
            })).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serializes")
        );
        return 0;
    }
    println!("this host: {}", host_line(&host));
    println!(
        "{:<11} {:<5} {:>8}  DESCRIPTION",
        "MODEL", "HERE", "FEATURES"
    );
    for r in &rows {
        let here = if r.missing.is_empty() { "yes" } else { "no" };
        let count = if r.missing.is_empty() {
            r.features.len().to_string()
        } else {
            "-".to_string()
        };
        println!(
            "{:<11} {here:<5} {count:>8}  {}",
            r.model.name(),
            r.model.description()
        );
        if !r.missing.is_empty() {
            println!("{:26}lacks: {}", "", r.missing.join(" "));
        }
        if !r.added_by_host.is_empty() && r.model.is_baseline() {
            println!(
                "{:26}this host's KVM also shows the guest: {}",
                "",
                r.added_by_host.join(" ")
            );
        }
        if args.verbose && r.missing.is_empty() {
            println!("{:26}features: {}", "", r.features.join(" "));
        }
    }
    0
}
