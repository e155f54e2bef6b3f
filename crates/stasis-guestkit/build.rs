//! Builds the stasis test guest (`guests/`) from source with gcc and GNU ld.
//!
//! Output: `$OUT_DIR/stasis-guest.elf`. Tools can be overridden with the
//! `STASIS_GUEST_CC` (default `gcc`) and `STASIS_GUEST_LD` (default `ld`)
//! environment variables.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-fcf-protection=none",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mcmodel=small",
    "-m64",
    "-nostdlib",
];

fn tool_missing(tool: &str, var: &str, err: &std::io::Error) -> ! {
    panic!(
        "stasis-guestkit: cannot run `{tool}` ({err}). The test guest is built from source at \
         cargo build time and needs gcc (C compiler + GNU as) and GNU ld (binutils) for x86_64. \
         Install them (Debian: `apt-get install gcc binutils`) or point {var} at them."
    );
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!("stasis-guestkit: failed to run {what}: {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        panic!(
            "stasis-guestkit: {what} failed ({}):\n{cmd:?}\n{stderr}",
            out.status
        );
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning={what}: {line}");
    }
    out
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guests = manifest.join("..").join("..").join("guests");
    let guests = guests.canonicalize().unwrap_or(guests);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let obj_dir = out_dir.join("guest-obj");
    fs::create_dir_all(&obj_dir).expect("create object directory");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", guests.display());
    println!("cargo:rerun-if-env-changed=STASIS_GUEST_CC");
    println!("cargo:rerun-if-env-changed=STASIS_GUEST_LD");

    let cc = env::var("STASIS_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());
    let ld = env::var("STASIS_GUEST_LD").unwrap_or_else(|_| "ld".to_string());
    for (tool, var) in [(&cc, "STASIS_GUEST_CC"), (&ld, "STASIS_GUEST_LD")] {
        if let Err(e) = Command::new(tool).arg("--version").output() {
            tool_missing(tool, var, &e);
        }
    }

    let mut entries: Vec<PathBuf> = fs::read_dir(&guests)
        .unwrap_or_else(|e| panic!("stasis-guestkit: cannot read {}: {e}", guests.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    let mut sources = Vec::new();
    for path in &entries {
        println!("cargo:rerun-if-changed={}", path.display());
        match path.extension().and_then(|e| e.to_str()) {
            Some("c") | Some("S") => sources.push(path.clone()),
            _ => {}
        }
    }
    let script = guests.join("guest.ld");
    assert!(
        script.exists(),
        "stasis-guestkit: missing linker script {}",
        script.display()
    );
    assert!(
        !sources.is_empty(),
        "stasis-guestkit: no guest sources in {}",
        guests.display()
    );

    let mut objects = Vec::new();
    for src in &sources {
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .expect("source file name");
        let obj = obj_dir.join(format!("{name}.o"));
        let mut cmd = Command::new(&cc);
        cmd.args(CFLAGS)
            .arg("-I")
            .arg(&guests)
            .arg("-c")
            .arg(src)
            .arg("-o")
            .arg(&obj);
        run(&mut cmd, &format!("{cc} {name}"));
        objects.push(obj);
    }

    let elf = out_dir.join("stasis-guest.elf");
    let mut cmd = Command::new(&ld);
    cmd.args([
        "-nostdlib",
        "-static",
        "-no-pie",
        "--build-id=none",
        "-z",
        "noexecstack",
    ])
    .arg("-T")
    .arg(&script)
    .arg("-o")
    .arg(&elf)
    .args(&objects);
    run(&mut cmd, &format!("{ld} (link)"));
    check_output(&elf);
}

fn check_output(elf: &Path) {
    let data = fs::read(elf).expect("read linked guest");
    assert!(
        data.len() > 64 && &data[..4] == b"\x7fELF" && data[4] == 2,
        "stasis-guestkit: {} is not an ELF64 file",
        elf.display()
    );
}
