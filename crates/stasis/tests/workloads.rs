//! Every guest-kit workload boots on real KVM with 1 and 2 vCPUs, through
//! the 64-bit Linux entry and PVH, and reports what it must.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

fn boot(tag: &str, vcpus: u32, boot: &str, cmdline: &str, memory: &str) -> VmProcess {
    let smp = if vcpus > 1 { " smp=1" } else { "" };
    let cmdline = format!("console=ttyS0 {cmdline}{smp}");
    let mut vm = VmProcess::start(
        tag,
        VmOpts {
            vcpus,
            memory,
            boot,
            cmdline: &cmdline,
            ..Default::default()
        },
    );
    let bootline = vm.wait_tagged("STASIS-GUEST", 1, T).remove(0);
    let want = if boot == "linux" { "linux64" } else { "pvh" };
    assert_eq!(fields(&bootline)["proto"], want, "{bootline}");
    assert_eq!(fields(&bootline)["acpi"], "ok", "{bootline}");
    assert_eq!(fields(&bootline)["mptable"], "ok", "{bootline}");
    assert_eq!(num(&bootline, "cpus"), u64::from(vcpus), "{bootline}");
    // The guest read the TSC rate from our hypervisor timing leaf.
    assert_eq!(fields(&bootline)["tsc_src"], "cpuid", "{bootline}");
    vm.wait_tagged("CPU-UP", vcpus as usize, T);
    vm
}

/// Waits until every CPU has printed at least `n` lines with `tag`.
fn wait_per_cpu(vm: &mut VmProcess, tag: &str, n: usize, vcpus: u32) -> Vec<String> {
    let prefix = format!("{tag} ");
    vm.wait_until(
        &format!("{n} '{tag}' lines from each of {vcpus} CPUs"),
        T,
        |ls| {
            (0..u64::from(vcpus)).all(|cpu| {
                ls.iter()
                    .filter(|l| l.starts_with(&prefix) && num(l, "cpu") == cpu)
                    .count()
                    >= n
            })
        },
    );
    vm.tagged(tag)
}

fn cpus_in(lines: &[String]) -> Vec<u64> {
    let mut c: Vec<u64> = lines.iter().map(|l| num(l, "cpu")).collect();
    c.sort();
    c.dedup();
    c
}

fn heartbeat(tag: &str, vcpus: u32, proto: &str) {
    let mut vm = boot(tag, vcpus, proto, "workload=heartbeat hb_ms=50", "64M");
    let hb = wait_per_cpu(&mut vm, "HB", 4, vcpus);
    assert_eq!(cpus_in(&hb), (0..u64::from(vcpus)).collect::<Vec<_>>());
    for cpu in 0..u64::from(vcpus) {
        let mine: Vec<&String> = hb.iter().filter(|l| num(l, "cpu") == cpu).collect();
        for w in mine.windows(2) {
            assert_eq!(num(w[1], "seq"), num(w[0], "seq") + 1);
            assert!(num(w[1], "counter") > num(w[0], "counter"));
        }
    }
}

fn memory(tag: &str, vcpus: u32, proto: &str) {
    let mut vm = boot(tag, vcpus, proto, "workload=memory mem_mib=32", "96M");
    // Three passes per CPU: the second and third verify every page.
    let mem = wait_per_cpu(&mut vm, "MEM", 3, vcpus);
    assert_eq!(cpus_in(&mem), (0..u64::from(vcpus)).collect::<Vec<_>>());
    for l in &mem {
        assert_eq!(num(l, "bad"), 0, "{l}");
        if num(l, "pass") > 1 {
            assert_eq!(num(l, "verified"), num(l, "pages"), "{l}");
        }
    }
}

fn registers(tag: &str, vcpus: u32, proto: &str) {
    let mut vm = boot(tag, vcpus, proto, "workload=registers report_ms=200", "64M");
    let regs = wait_per_cpu(&mut vm, "REGS", 3, vcpus);
    assert_eq!(cpus_in(&regs), (0..u64::from(vcpus)).collect::<Vec<_>>());
    for l in &regs {
        assert_eq!(num(l, "mismatches"), 0, "{l}");
        assert!(num(l, "checks") > 0, "{l}");
    }
    assert!(vm.tagged("REGS-MISMATCH").is_empty());
}

fn timer(tag: &str, vcpus: u32, proto: &str) {
    let mut vm = boot(
        tag,
        vcpus,
        proto,
        "workload=timer timer_hz=100 report_ms=500",
        "64M",
    );
    let t = wait_per_cpu(&mut vm, "TIMER", 3, vcpus);
    assert_eq!(cpus_in(&t), (0..u64::from(vcpus)).collect::<Vec<_>>());
    // Each CPU's timer ticks between its reports, never faster than set
    // (the rate itself is measured by `cargo bench -p stasis --bench
    // quiesce`: a loaded host makes a guest miss ticks).
    for cpu in 0..u64::from(vcpus) {
        let mine: Vec<String> = t.iter().filter(|l| num(l, "cpu") == cpu).cloned().collect();
        timer_runs_at_most_at(&mine, 100.0);
    }
}

#[test]
fn heartbeat_1_vcpu_linux_entry() {
    heartbeat("wl-hb1l", 1, "linux");
}
#[test]
fn heartbeat_1_vcpu_pvh() {
    heartbeat("wl-hb1p", 1, "pvh");
}
#[test]
fn heartbeat_2_vcpus_linux_entry() {
    heartbeat("wl-hb2l", 2, "linux");
}
#[test]
fn heartbeat_2_vcpus_pvh() {
    heartbeat("wl-hb2p", 2, "pvh");
}
#[test]
fn memory_1_vcpu() {
    memory("wl-mem1", 1, "linux");
}
#[test]
fn memory_2_vcpus() {
    memory("wl-mem2", 2, "pvh");
}
#[test]
fn registers_1_vcpu() {
    registers("wl-regs1", 1, "pvh");
}
#[test]
fn registers_2_vcpus() {
    registers("wl-regs2", 2, "linux");
}
#[test]
fn timer_1_vcpu() {
    timer("wl-timer1", 1, "linux");
}
#[test]
fn timer_2_vcpus() {
    timer("wl-timer2", 2, "pvh");
}

#[test]
fn guest_sees_the_e820_map_the_vmm_wrote() {
    let mut vm = boot("wl-e820", 1, "linux", "workload=heartbeat", "64M");
    vm.wait_tagged("HB", 1, T);
    let e820 = vm.tagged("E820");
    let ram: Vec<(u64, u64)> = e820
        .iter()
        .filter(|l| num(l, "type") == 1)
        .map(|l| {
            let f = fields(l);
            (
                u64::from_str_radix(&f["addr_hex"], 16).unwrap(),
                u64::from_str_radix(&f["size_hex"], 16).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ram,
        vec![(0, 0x9f000), (0x10_0000, (64 << 20) - 0x10_0000)],
        "{e820:?}"
    );
}
