//! CPU models with real guests: what a guest of each model sees, that the
//! model travels with its snapshots, and that hosts refuse what they
//! cannot run (by name, before any VM exists).
//!
//! Hosts differ: some KVMs (PVM, which runs guest code natively) put the
//! host's instruction-set features into every guest's CPUID. These tests
//! ask the host what it offers and what it adds (`stasis cpu-models
//! --json`), then check that the guest sees exactly that.

mod common;
use common::*;
use stasis_cpu::{cpuid as model_cpuid, CpuModel, CpuSpec, FeatureSet};
use stasis_snapshot::CpuidEntry;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn cpu_models() -> serde_json::Value {
    let s = Scratch::new("cpu-models");
    let out = stasis(&["cpu-models", "--json"], s.path());
    assert!(out.status.success(), "{}", err_text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn model_entry(models: &serde_json::Value, name: &str) -> serde_json::Value {
    models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == name)
        .unwrap_or_else(|| panic!("cpu-models lists no {name}"))
        .clone()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn names(set: &FeatureSet) -> Vec<String> {
    set.names()
}

fn set_of(names: &[String]) -> FeatureSet {
    names
        .iter()
        .map(|n| stasis_cpu::feature::by_name(n).unwrap_or_else(|| panic!("unknown {n}")))
        .collect()
}

fn hex(line: &str, key: &str) -> u32 {
    let f = fields(line);
    u32::from_str_radix(
        f.get(key).unwrap_or_else(|| panic!("no {key} in {line}")),
        16,
    )
    .unwrap()
}

/// The CPUID leaves and usable XCR0 the guest kit's `cpuid` workload
/// reports from ring 0.
struct GuestView {
    cpuid: Vec<CpuidEntry>,
    xcr0_usable: u64,
}

fn guest_view(vm: &mut VmProcess) -> GuestView {
    vm.wait_tagged("CPUID-DONE", 1, T);
    let cpuid = vm
        .tagged("CPUID")
        .iter()
        .map(|l| CpuidEntry {
            function: hex(l, "leaf_hex"),
            index: num(l, "sub") as u32,
            flags: 0,
            eax: hex(l, "eax_hex"),
            ebx: hex(l, "ebx_hex"),
            ecx: hex(l, "ecx_hex"),
            edx: hex(l, "edx_hex"),
        })
        .collect();
    let x = vm.tagged("XCR0");
    GuestView {
        cpuid,
        xcr0_usable: u64::from(hex(&x[0], "usable_hex")),
    }
}

fn status_cpu(vm: &VmProcess) -> serde_json::Value {
    let out = vm.cli(&["status", &vm.name, "--json"]);
    assert!(out.status.success(), "{}", err_text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["cpu"].clone()
}

/// The template of `model` on this host, from the same probe `run` uses.
fn template(model: CpuModel) -> stasis_cpu::GuestCpuid {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let host = stasis_vmm::cpu::cpuid::probe_host(&kvm, 1).unwrap();
    model_cpuid::guest_template(&CpuSpec::new(model), &host.offer, 1 << 32).unwrap()
}

#[test]
fn every_model_is_listed_and_those_this_host_lacks_are_refused_by_name() {
    require_kvm();
    let models = cpu_models();
    let listed: Vec<String> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        listed,
        ["host", "x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4"]
    );
    assert_eq!(model_entry(&models, "host")["runs_here"], true);
    let s = Scratch::new("cpu-refuse");
    let kernel = guest(s.path());
    for m in models["models"].as_array().unwrap() {
        let name = m["model"].as_str().unwrap();
        if m["runs_here"] == true {
            assert!(!strings(&m["features"]).is_empty(), "{name}");
            continue;
        }
        let missing = strings(&m["missing"]);
        assert!(
            !missing.is_empty(),
            "{name} does not run here but nothing is missing"
        );
        let out = stasis(
            &[
                "run",
                "--name",
                "refused",
                "--kernel",
                kernel.to_str().unwrap(),
                "--cpu",
                name,
                "--serial",
                "null",
            ],
            s.path(),
        );
        assert_eq!(out.status.code(), Some(1), "{name}: {}", err_text(&out));
        let want = format!(
            "this host cannot offer CPU model {name}: it lacks {}",
            missing.join(", ")
        );
        assert!(
            err_text(&out).contains(&want),
            "{name}: want {want:?} in {}",
            err_text(&out)
        );
        assert!(
            !s.join("refused.sock").exists(),
            "a VM was created for {name}"
        );
    }
    // Bad feature changes are refused before anything starts.
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--name",
            "bad",
            "--kernel",
            kernel.to_str().unwrap(),
            "--serial",
            "null",
        ];
        args.extend_from_slice(extra);
        stasis(&args, s.path())
    };
    let out = run(&["--cpu-features", "+avx9"]);
    assert_eq!(out.status.code(), Some(2), "{}", err_text(&out));
    assert!(
        err_text(&out).contains("unknown CPU feature 'avx9'"),
        "{}",
        err_text(&out)
    );
    let out = run(&["--cpu", "x86-64-v2", "--cpu-features", "+vmx"]);
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(
        err_text(&out).contains("nested virtualisation is not offered"),
        "{}",
        err_text(&out)
    );
    let out = run(&["--cpu", "x86-64-v2", "--cpu-features", "+avx2"]);
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(
        err_text(&out).contains("+avx2 needs avx"),
        "{}",
        err_text(&out)
    );
}

/// Boots the `cpuid` workload with `model` and checks that the guest sees
/// exactly what stasis records for it: the model's features plus what
/// this host's KVM adds, never anything else, and an XCR0 that accepts
/// exactly the XSAVE components its CPUID lists.
fn guest_sees_model(model: CpuModel) -> Option<(GuestView, FeatureSet, Vec<String>)> {
    require_kvm();
    if model_entry(&cpu_models(), model.name())["runs_here"] != true {
        return None; // refusal is covered above
    }
    let mut vm = VmProcess::start(
        &format!("cpu-{}", model.name()),
        VmOpts {
            memory: "32M",
            cmdline: "console=ttyS0 workload=cpuid",
            extra: vec!["--cpu".into(), model.name().into()],
            ..Default::default()
        },
    );
    let view = guest_view(&mut vm);
    vm.wait_socket();
    let cpu = status_cpu(&vm);
    assert_eq!(cpu["model"], model.name());
    let seen = FeatureSet::of(&view.cpuid);
    let recorded = strings(&cpu["features"]);
    let added = strings(&cpu["added_by_host"]);
    assert_eq!(
        names(&seen),
        recorded,
        "the guest sees other features than stasis records"
    );
    let want = template(model).features.union(&set_of(&added));
    assert_eq!(
        names(&seen),
        names(&want),
        "model {model} + what this host adds"
    );
    for f in model.level_features() {
        assert!(
            seen.contains(&stasis_cpu::feature::by_name(f).unwrap()),
            "{model} lacks {f}"
        );
    }
    for f in ["vmx", "svm"] {
        assert!(
            !seen.contains(&stasis_cpu::feature::by_name(f).unwrap()),
            "{model} shows {f}"
        );
    }
    // XCR0: exactly the components leaf 0xD lists can be enabled. (AMX is
    // left out: enabling its state can need a permission the host grants
    // separately; so is MPX, which newer kernels stop offering while older
    // CPUs still list it.)
    let d = model_cpuid::xcr0_mask(&view.cpuid);
    let groups: [u64; 3] = [0x4, 0xe4, 0x200];
    let listed = groups
        .iter()
        .filter(|g| d & **g == **g)
        .fold(0x3, |m, g| m | g);
    if stasis_cpu::feature::by_name("xsave").is_some_and(|x| seen.contains(&x)) {
        assert_eq!(
            view.xcr0_usable & !0x60018,
            listed,
            "usable XCR0 vs leaf 0xD {d:#x}"
        );
    } else {
        assert_eq!(view.xcr0_usable, 0, "no XSAVE, yet XCR0 was usable");
    }
    Some((view, seen, added))
}

#[test]
fn x86_64_v2_guest_sees_no_avx_unless_the_host_forces_it() {
    let Some((view, seen, added)) = guest_sees_model(CpuModel::X86_64V2) else {
        return;
    };
    let avx = stasis_cpu::feature::by_name("avx").unwrap();
    if added.iter().any(|a| a == "avx") {
        // This host's KVM cannot hide AVX: then CPUID and XCR0 agree on it.
        assert!(seen.contains(&avx));
        assert_ne!(view.xcr0_usable & 0x4, 0);
    } else {
        assert!(!seen.contains(&avx), "x86-64-v2 guest sees AVX");
        assert_eq!(
            view.xcr0_usable & 0x4,
            0,
            "x86-64-v2 guest can enable AVX state"
        );
    }
    // Leaves every KVM lets a VMM set follow the model exactly.
    for f in [
        "abm",
        "sse4a",
        "3dnowprefetch",
        "rdtscp",
        "pdpe1gb",
        "invtsc",
        "topoext",
    ] {
        let b = stasis_cpu::feature::by_name(f).unwrap();
        if !added.iter().any(|a| a == f) {
            assert!(!seen.contains(&b), "x86-64-v2 guest sees {f}");
        }
    }
    let phys = model_cpuid::phys_bits(&view.cpuid);
    assert_eq!(
        phys,
        model_cpuid::BASELINE_PHYS_BITS,
        "guest physical address width"
    );
}

#[test]
fn x86_64_v3_guest_sees_avx2_and_no_avx512_unless_the_host_forces_it() {
    let Some((_, seen, added)) = guest_sees_model(CpuModel::X86_64V3) else {
        return;
    };
    assert!(seen.contains(&stasis_cpu::feature::by_name("avx2").unwrap()));
    if !added.iter().any(|a| a == "avx512f") {
        assert!(!seen.contains(&stasis_cpu::feature::by_name("avx512f").unwrap()));
    }
}

#[test]
fn baseline_and_host_guests_see_what_is_recorded() {
    guest_sees_model(CpuModel::X86_64);
    guest_sees_model(CpuModel::X86_64V4);
    // The host model: everything offered, nested virtualisation hidden.
    guest_sees_model(CpuModel::Host);
}

/// Heartbeat VM of `model`, suspended to `dir`; returns it and its serial
/// output up to the suspend.
fn suspend_heartbeat(
    tag: &str,
    model: &str,
    extra_cmdline: &str,
    dir: &Path,
) -> (VmProcess, String) {
    let cmdline = format!("console=ttyS0 workload=heartbeat hb_ms=50 {extra_cmdline}");
    let mut vm = VmProcess::start(
        tag,
        VmOpts {
            memory: "32M",
            cmdline: &cmdline,
            extra: vec!["--cpu".into(), model.into()],
            ..Default::default()
        },
    );
    vm.wait_tagged("HB", 3, T);
    vm.suspend_to(dir);
    let before = std::fs::read_to_string(&vm.serial).unwrap();
    (vm, before)
}

#[test]
fn a_v2_snapshot_records_its_model_and_restores_and_continues() {
    require_kvm();
    let s = Scratch::new("cpu-v2-snap");
    let dir = s.join("snap");
    let (vm, before) = suspend_heartbeat("cpu-v2", "x86-64-v2", "", &dir);
    let out = stasis(&["inspect", dir.to_str().unwrap(), "--json"], s.path());
    assert!(out.status.success(), "{}", err_text(&out));
    let inspect: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let g = &inspect["cpu"]["guest"];
    assert_eq!(g["model"], "x86-64-v2");
    assert!(strings(&g["features"]).contains(&"sse4_2".to_string()));
    let text = stasis(&["inspect", dir.to_str().unwrap()], s.path());
    assert!(String::from_utf8_lossy(&text.stdout).contains("cpu model:      x86-64-v2"));
    let (code, check) = check_json(&dir, &[]);
    assert_eq!(code, Some(0), "{check}");
    assert_eq!(check["runnable"], true);
    assert_eq!(check["cpu_model"], "x86-64-v2");
    let mut r = restore_process("cpu-v2-r", &dir, &vm.runtime_dir, &[]);
    r.wait_tagged("HB", 1, T);
    let (last, next) = heartbeats_across(&before, &r);
    assert_eq!(num(&next, "seq"), num(&last, "seq") + 1, "{last} -> {next}");
    r.wait_socket();
    assert_eq!(status_cpu(&r)["model"], "x86-64-v2");
}

#[test]
fn check_and_restore_name_the_features_this_host_lacks() {
    require_kvm();
    let s = Scratch::new("cpu-lacks");
    let dir = s.join("snap");
    let (vm, _) = suspend_heartbeat("cpu-lacks", "x86-64-v2", "", &dir);
    // Thermal-sensor features (leaf 6) KVM never offers a guest, and no
    // KVM rewrites leaf 6 from the host.
    rewrite_snapshot(
        &dir,
        |_, _, _| {},
        |m| {
            let g = m.cpu.guest.as_mut().unwrap();
            g.features.push("dtherm".into());
            g.features.push("pts".into());
        },
    );
    let before = std::fs::read(dir.join("manifest.json")).unwrap();
    let (code, check) = check_json(&dir, &[]);
    assert_eq!(code, Some(1), "{check}");
    assert_eq!(check["runnable"], false);
    let features = check["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == "features")
        .unwrap_or_else(|| panic!("no features problem: {check}"));
    assert_eq!(strings(&features["missing"]), ["dtherm", "pts"]);
    let out = stasis(&["check", dir.to_str().unwrap()], &vm.runtime_dir);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("runnable here: no"), "{text}");
    assert!(
        text.contains("this host cannot offer CPU features the guest was given: dtherm, pts"),
        "{text}"
    );
    let out = stasis(
        &[
            "restore",
            dir.to_str().unwrap(),
            "--name",
            "lacks-r",
            "--serial",
            "null",
        ],
        &vm.runtime_dir,
    );
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(
        err_text(&out).contains("this host cannot run the snapshot: this host cannot offer CPU features the guest was given: dtherm, pts"),
        "{}",
        err_text(&out)
    );
    assert!(
        !vm.runtime_dir.join("lacks-r.sock").exists(),
        "a VM was created"
    );
    assert_eq!(std::fs::read(dir.join("manifest.json")).unwrap(), before);
}

#[test]
fn a_tsc_rate_this_host_cannot_keep_is_scaled_or_needs_consent() {
    require_kvm();
    let s = Scratch::new("cpu-tsc");
    let dir = s.join("snap");
    let (vm, before) = suspend_heartbeat("cpu-tsc", "x86-64-v2", "", &dir);
    let (_, check) = check_json(&dir, &[]);
    let host_khz = check["host"]["tsc_khz"].as_u64().unwrap();
    let scaling = check["host"]["tsc_scaling"].as_bool().unwrap();
    // The guest's TSC "ran" 10% faster than this host's.
    let saved_khz = host_khz + host_khz / 10;
    rewrite_snapshot(
        &dir,
        |name, _, v| {
            if name == "vcpu" {
                v["tsc_khz"] = saved_khz.into();
            }
        },
        |_| {},
    );
    let (code, check) = check_json(&dir, &[]);
    if scaling {
        assert_eq!(code, Some(0), "{check}");
        assert_eq!(check["tsc"]["plan"], "scale");
        let mut r = restore_process("cpu-tsc-scale", &dir, &vm.runtime_dir, &[]);
        r.wait_tagged("HB", 1, T);
        return;
    }
    assert_eq!(code, Some(1), "{check}");
    let tsc = check["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == "tsc")
        .unwrap_or_else(|| panic!("no tsc problem: {check}"));
    assert_eq!(tsc["saved_khz"].as_u64(), Some(saved_khz));
    assert_eq!(tsc["host_khz"].as_u64(), Some(host_khz));
    let out = stasis(
        &[
            "restore",
            dir.to_str().unwrap(),
            "--name",
            "tsc-r",
            "--serial",
            "null",
        ],
        &vm.runtime_dir,
    );
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    let want =
        format!("the guest's TSC ran at {saved_khz} kHz and this host's runs at {host_khz} kHz");
    assert!(err_text(&out).contains(&want), "{}", err_text(&out));
    assert!(
        err_text(&out).contains("--allow-tsc-mismatch"),
        "{}",
        err_text(&out)
    );
    assert!(!vm.runtime_dir.join("tsc-r.sock").exists());
    let (code, check) = check_json(&dir, &["--allow-tsc-mismatch"]);
    assert_eq!(code, Some(0), "{check}");
    assert_eq!(check["tsc"]["plan"], "mismatch");
    let mut r = restore_process(
        "cpu-tsc-r",
        &dir,
        &vm.runtime_dir,
        &["--allow-tsc-mismatch"],
    );
    r.wait_tagged("HB", 1, T);
    let (last, next) = heartbeats_across(&before, &r);
    assert_eq!(num(&next, "seq"), num(&last, "seq") + 1, "{last} -> {next}");
    assert!(
        r.stderr()
            .contains("restoring anyway (--allow-tsc-mismatch)"),
        "{}",
        r.stderr()
    );
}

#[test]
fn registers_of_an_x86_64_v2_guest_without_xsave_survive_restores() {
    require_kvm();
    let mut vm = VmProcess::start(
        "cpu-regs",
        VmOpts {
            memory: "32M",
            cmdline: "console=ttyS0 workload=registers report_ms=20 regs_hold_ms=5 xsave=0",
            extra: vec!["--cpu".into(), "x86-64-v2".into()],
            ..Default::default()
        },
    );
    let first = vm.wait_tagged("REGS", 1, T);
    // FXSAVE state only: x87 and SSE registers are what it checks.
    assert_eq!(num(&first[0], "avx"), 0, "{}", first[0]);
    let boot = vm.tagged("STASIS-GUEST");
    assert_eq!(fields(&boot[0])["xcr0_hex"], "0", "{}", boot[0]);
    let snaps = Scratch::new("cpu-regs-snap");
    let runtime = vm.runtime_dir.clone();
    let mut last_round = num(vm.tagged("REGS").last().unwrap(), "round");
    let mut current: Option<VmProcess> = None;
    for cycle in 0..5 {
        let dir = snaps.join(&format!("c{cycle}"));
        match current.as_mut() {
            Some(c) => c.suspend_to(&dir),
            None => vm.suspend_to(&dir),
        }
        let mut next = restore_process("cpu-regs-r", &dir, &runtime, &[]);
        next.wait_until("a REGS report after the restore", T, |ls| {
            ls.iter()
                .filter(|l| l.starts_with("REGS "))
                .any(|l| num(l, "round") > last_round)
        });
        let regs = next.tagged("REGS");
        let last = regs.last().unwrap().clone();
        assert_eq!(num(&last, "mismatches"), 0, "cycle {cycle}: {last}");
        assert!(num(&last, "checks") > 0);
        last_round = num(&last, "round");
        current = Some(next);
    }
}

#[test]
fn a_zero_tsc_deadline_in_deadline_mode_keeps_the_timer_running_after_restore() {
    require_kvm();
    let mut vm = VmProcess::start(
        "cpu-deadline",
        VmOpts {
            memory: "32M",
            cmdline: "console=ttyS0 workload=timer timer_mode=deadline timer_hz=100 report_ms=200",
            extra: vec!["--cpu".into(), "x86-64-v2".into()],
            ..Default::default()
        },
    );
    let start = vm.wait_tagged("TIMER-START", 1, T);
    assert_eq!(fields(&start[0])["mode"], "deadline");
    let ticking = vm.wait_tagged("TIMER", 2, T);
    assert!(
        num(&ticking[1], "ticks") > num(&ticking[0], "ticks"),
        "{ticking:?}"
    );
    let s = Scratch::new("cpu-deadline-snap");
    let dir = s.join("snap");
    vm.suspend_to(&dir);
    // A snapshot taken after the timer fired but before its interrupt was
    // handled: KVM had cleared the deadline, nothing is pending.
    let mut found = false;
    rewrite_snapshot(
        &dir,
        |name, _, v| {
            if name != "vcpu" {
                return;
            }
            for m in v["msrs"].as_array_mut().unwrap() {
                if m["index"] == 0x6e0 {
                    m["value"] = 0.into();
                    found = true;
                }
            }
        },
        |_| {},
    );
    assert!(found, "the snapshot holds no TSC-deadline MSR");
    let mut r = restore_process("cpu-deadline-r", &dir, &vm.runtime_dir, &[]);
    let after = r.wait_tagged("TIMER", 3, T);
    let (a, b) = (num(&after[0], "ticks"), num(&after[2], "ticks"));
    assert!(b > a + 10, "the timer stopped after the restore: {after:?}");
}
