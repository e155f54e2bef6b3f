//! Snapshots from earlier stasis releases still restore, and their guests
//! continue exactly where they stopped; snapshots a host cannot run are
//! refused by name. See tests/fixtures/README.md.
//!
//! Hosts differ (AMD and Intel, with and without AVX-512, other TSC
//! rates), so each test asks `stasis check` what this host can do and
//! tests that: the x86-64-v2 fixture of this host's vendor must run (with
//! `--allow-tsc-mismatch` where the TSC rate differs and cannot be scaled,
//! after checking that it is refused without); the other vendor's must be
//! refused naming the vendor.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// (file name, crc32c) of every file in `dir`, sorted.
fn fingerprint(dir: &Path) -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                crc32c::crc32c(&std::fs::read(e.path()).unwrap()),
            )
        })
        .collect();
    v.sort();
    v
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

const AMD_V2: &str = "v1-heartbeat-16m-x86-64-v2-amd";
const INTEL_V2: &str = "v1-heartbeat-16m-x86-64-v2-intel";

fn host_vendor() -> String {
    let s = Scratch::new("fx-vendor");
    let out = stasis(&["cpu-models", "--json"], s.path());
    assert!(out.status.success(), "{}", err_text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["host"]["vendor"].as_str().unwrap().to_string()
}

fn problem_kinds(check: &serde_json::Value) -> Vec<String> {
    check["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap().to_string())
        .collect()
}

/// Restores the fixture `name` (its snapshot must be runnable here) and
/// checks that the guest continues from its last heartbeat.
fn restores_and_continues(name: &str) {
    let dir = fixture(name);
    let snap = dir.join("snapshot");
    let before_files = fingerprint(&snap);
    let runtime = Scratch::new("fx-run");
    let out = stasis(&["verify", snap.to_str().unwrap()], runtime.path());
    assert!(out.status.success(), "{}", err_text(&out));

    // A different TSC rate without scaling is refused unless accepted.
    let (code, check) = check_json(&snap, &[]);
    let sock = runtime.join("fx.sock");
    let mut extra = vec!["--api-socket", sock.to_str().unwrap()];
    if code != Some(0) {
        assert_eq!(
            problem_kinds(&check),
            ["tsc"],
            "{name} cannot run here: {check}"
        );
        let out = stasis(
            &[
                "restore",
                snap.to_str().unwrap(),
                "--name",
                "fx-no",
                "--serial",
                "null",
            ],
            runtime.path(),
        );
        assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
        assert!(
            err_text(&out).contains("--allow-tsc-mismatch"),
            "{}",
            err_text(&out)
        );
        let (code, check) = check_json(&snap, &["--allow-tsc-mismatch"]);
        assert_eq!(code, Some(0), "{check}");
        extra.push("--allow-tsc-mismatch");
    }
    let mut r = restore_process("fx", &snap, runtime.path(), &extra);
    r.wait_until("two heartbeats", Duration::from_secs(60), |ls| {
        ls.iter().filter(|l| l.starts_with("HB ")).count() >= 2
    });
    let before = std::fs::read_to_string(dir.join("serial-before.log")).unwrap();
    let (last_hb, next_hb) = heartbeats_across(&before, &r);
    assert_eq!(
        num(&next_hb, "seq"),
        num(&last_hb, "seq") + 1,
        "{last_hb} -> {next_hb}"
    );
    assert!(
        num(&next_hb, "counter") > num(&last_hb, "counter"),
        "{last_hb} -> {next_hb}"
    );
    // The restore is a new generation of the VM.
    let genid = r.wait_tagged("GENID", 1, Duration::from_secs(30));
    assert_eq!(num(&genid[0], "generation"), 1, "{}", genid[0]);
    drop(r);
    assert_eq!(
        before_files,
        fingerprint(&snap),
        "restoring modified the fixture"
    );
}

/// Expects the fixture `name` to be refused by `check` and `restore`, each
/// naming `want`, with no VM and the files unchanged.
fn refused(name: &str, kind: &str, want: &str) {
    let snap = fixture(name).join("snapshot");
    let before_files = fingerprint(&snap);
    let (code, check) = check_json(&snap, &["--allow-tsc-mismatch"]);
    assert_eq!(code, Some(1), "{check}");
    assert!(problem_kinds(&check).contains(&kind.to_string()), "{check}");
    let runtime = Scratch::new("fx-refused");
    let out = stasis(
        &[
            "restore",
            snap.to_str().unwrap(),
            "--name",
            "fx-r",
            "--serial",
            "null",
            "--allow-tsc-mismatch",
        ],
        runtime.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(
        err_text(&out).contains(want),
        "want {want:?} in {}",
        err_text(&out)
    );
    assert!(!runtime.join("fx-r.sock").exists(), "a VM was started");
    assert_eq!(
        before_files,
        fingerprint(&snap),
        "refusing modified the fixture"
    );
}

#[test]
fn x86_64_v2_fixture_of_this_hosts_vendor_restores_and_the_other_is_refused() {
    require_kvm();
    let vendor = host_vendor();
    let (mine, other, other_vendor) = match vendor.as_str() {
        "AuthenticAMD" => (AMD_V2, INTEL_V2, "GenuineIntel"),
        "GenuineIntel" => (INTEL_V2, AMD_V2, "AuthenticAMD"),
        v => panic!("the fixtures cover AMD and Intel hosts; this host's CPU is {v}"),
    };
    restores_and_continues(mine);
    refused(
        other,
        "vendor",
        &format!("the guest ran on a {other_vendor} CPU; this host's CPU is {vendor}"),
    );
}

/// The first fixture recorded the CPU of the host it was taken on (an AMD
/// EPYC with AVX-512, `host` model): it runs where those features are
/// offered and is refused, by feature name, where they are not.
#[test]
fn host_model_fixture_runs_where_its_features_are_and_is_refused_elsewhere() {
    require_kvm();
    let name = "v1-heartbeat-16m";
    let snap = fixture(name).join("snapshot");
    let (code, check) = check_json(&snap, &["--allow-tsc-mismatch"]);
    if code == Some(0) {
        restores_and_continues(name);
        return;
    }
    // What this host lacks depends on the host; restore must be refused
    // for the same reason `check` gives.
    let kinds = problem_kinds(&check);
    let kind = kinds
        .iter()
        .find(|k| *k == "features" || *k == "vendor" || *k == "xsave")
        .unwrap_or_else(|| panic!("refused for an unexpected reason: {check}"));
    let message = check["messages"][kinds.iter().position(|k| k == kind).unwrap()]
        .as_str()
        .unwrap()
        .to_string();
    refused(name, kind, &message);
}

/// Writes the x86-64-v2 fixtures. Run once, on an AMD host, when they were
/// made; never again (a fixture's point is that it is old):
/// `cargo test -p stasis --test compat_fixtures -- --ignored generate`.
/// See tests/fixtures/README.md for what it does and why.
#[test]
#[ignore]
fn generate_x86_64_v2_fixtures() {
    use stasis_cpu::{cpuid as model_cpuid, msr, reference, CpuModel, CpuSpec, FeatureSet};
    require_kvm();
    assert_eq!(
        host_vendor(),
        "AuthenticAMD",
        "record the fixtures on an AMD host"
    );
    let amd = fixture(AMD_V2);
    assert!(
        !amd.exists(),
        "{} exists: fixtures are never regenerated",
        amd.display()
    );
    std::fs::create_dir_all(&amd).unwrap();
    let mut vm = VmProcess::start(
        "fx-gen",
        VmOpts {
            memory: "16M",
            cmdline: "console=ttyS0 workload=heartbeat hb_ms=100 xsave=0",
            extra: vec!["--cpu".into(), "x86-64-v2".into()],
            ..Default::default()
        },
    );
    vm.wait_tagged("HB", 5, Duration::from_secs(60));
    vm.suspend_to(&amd.join("snapshot"));
    std::fs::copy(&vm.serial, amd.join("serial-before.log")).unwrap();

    // The CPU description a KVM that can hide features records: exactly
    // the x86-64-v2 template (this host's KVM put its own instruction-set
    // features into the recorded CPUID; see the README).
    let spec = CpuSpec::new(CpuModel::X86_64V2);
    let rewrite_cpu =
        |dir: &Path, offer: &[stasis_snapshot::CpuidEntry], brand: &str, intel: bool| {
            let t = model_cpuid::guest_template(&spec, offer, 1 << 32).unwrap();
            let mut vcpu0 = Vec::new();
            rewrite_snapshot(
                dir,
                |name, _, v| {
                    if name != "vcpu" {
                        return;
                    }
                    let tsc = v["tsc_khz"].as_u64().unwrap() as u32;
                    let index = v["index"].as_u64().unwrap() as u32;
                    let cpuid = model_cpuid::for_vcpu(&t.cpuid, index, 1, tsc);
                    v["cpuid"] = serde_json::to_value(&cpuid).unwrap();
                    // AMD's own MSRs (0xc001xxxx) have no place on Intel.
                    let amd_only = |i: u32| (0xc001_0000..=0xc001_ffff).contains(&i);
                    let keep =
                        |i: u32| msr::guest_can_use(i, &t.features) && !(intel && amd_only(i));
                    v["msrs"]
                        .as_array_mut()
                        .unwrap()
                        .retain(|m| keep(m["index"].as_u64().unwrap() as u32));
                    if index == 0 {
                        vcpu0 = cpuid;
                    }
                },
                |_| {},
            );
            rewrite_snapshot(
                dir,
                |_, _, _| {},
                |m| {
                    m.cpu.vendor = model_cpuid::vendor(&t.cpuid);
                    m.cpu.model = brand.to_string();
                    m.cpu.cpuid = vcpu0.clone();
                    let g = m.cpu.guest.as_mut().unwrap();
                    g.features = FeatureSet::of(&vcpu0).names();
                    g.added_by_host = Vec::new();
                    g.xcr0 = model_cpuid::xcr0_mask(&vcpu0);
                },
            );
        };
    let snap = amd.join("snapshot");
    let recorded: Vec<stasis_snapshot::CpuidEntry> = stasis_snapshot::SnapshotReader::open(&snap)
        .unwrap()
        .body()
        .cpu
        .cpuid
        .clone();
    let brand = stasis_snapshot::SnapshotReader::open(&snap)
        .unwrap()
        .body()
        .cpu
        .model
        .clone();
    rewrite_cpu(&snap, &recorded, &brand, false);
    // The Intel twin: the same guest state on an Intel host's template.
    let intel = fixture(INTEL_V2);
    std::fs::create_dir_all(intel.join("snapshot")).unwrap();
    for f in ["manifest.json", "state.bin", "memory.img"] {
        std::fs::copy(snap.join(f), intel.join("snapshot").join(f)).unwrap();
    }
    std::fs::copy(
        amd.join("serial-before.log"),
        intel.join("serial-before.log"),
    )
    .unwrap();
    rewrite_cpu(
        &intel.join("snapshot"),
        &reference::intel_xeon_icelake(),
        "Intel Xeon (constructed from the AMD fixture)",
        true,
    );
}
