//! A bad configuration gets an error that names the problem and a non-zero
//! exit, before any VM is created.

mod common;
use common::*;

fn run_expect_error(args: &[&str], want: &str) {
    let s = Scratch::new("cfg");
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    let out = stasis(&full, &s.join("run"));
    let err = err_text(&out);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains(want), "expected {want:?} in stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn missing_kernel_file() {
    run_expect_error(
        &["--kernel", "/nonexistent/vmlinux"],
        "kernel = /nonexistent/vmlinux: no such file",
    );
}

#[test]
fn no_kernel_at_all() {
    run_expect_error(&[], "no kernel given");
}

#[test]
fn too_little_memory() {
    let s = Scratch::new("cfgmem");
    let k = guest(s.path());
    run_expect_error(
        &["--kernel", k.to_str().unwrap(), "--memory", "8M"],
        "memory = 8 MiB: must be at least 16 MiB",
    );
}

#[test]
fn unknown_key_in_config_file() {
    let s = Scratch::new("cfgkey");
    let k = guest(s.path());
    let cfg = s.join("vm.toml");
    std::fs::write(
        &cfg,
        format!("name = 'x'\nkernel = '{}'\nmemroy = 64\n", k.display()),
    )
    .unwrap();
    run_expect_error(
        &["--config", cfg.to_str().unwrap()],
        "unknown field `memroy`",
    );
}

#[test]
fn too_many_vcpus() {
    let s = Scratch::new("cfgcpu");
    let k = guest(s.path());
    run_expect_error(
        &["--kernel", k.to_str().unwrap(), "--vcpus", "1000"],
        "vcpus = 1000: must be between 1 and 254",
    );
}

#[test]
fn zero_vcpus() {
    let s = Scratch::new("cfgcpu0");
    let k = guest(s.path());
    run_expect_error(
        &["--kernel", k.to_str().unwrap(), "--vcpus", "0"],
        "vcpus = 0",
    );
}

#[test]
fn kernel_that_is_not_a_kernel() {
    require_kvm();
    let s = Scratch::new("cfgjunk");
    let k = s.join("junk");
    std::fs::write(&k, vec![0x5au8; 4096]).unwrap();
    run_expect_error(
        &["--kernel", k.to_str().unwrap()],
        "is neither an ELF executable nor a bzImage",
    );
}

#[test]
fn pvh_requested_for_kernel_without_pvh_note() {
    require_kvm();
    let s = Scratch::new("cfgpvh");
    // A minimal bzImage header: 'HdrS' at 0x202.
    let mut img = vec![0u8; 0x1000];
    img[0x202..0x206].copy_from_slice(b"HdrS");
    let k = s.join("bzImage");
    std::fs::write(&k, img).unwrap();
    run_expect_error(
        &["--kernel", k.to_str().unwrap(), "--boot", "pvh"],
        "PVH needs an ELF vmlinux",
    );
}

#[test]
fn bad_serial_flag_is_a_usage_error() {
    let s = Scratch::new("cfgser");
    let out = stasis(
        &["run", "--kernel", "/k", "--serial", "tty"],
        &s.join("run"),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err_text(&out).contains("invalid serial 'tty'"),
        "{}",
        err_text(&out)
    );
}

#[test]
fn print_config_shows_the_merged_toml() {
    let s = Scratch::new("cfgprint");
    let k = guest(s.path());
    let cfg = s.join("vm.toml");
    std::fs::write(
        &cfg,
        format!("name = 'a'\nkernel = '{}'\nvcpus = 2\n", k.display()),
    )
    .unwrap();
    let out = stasis(
        &[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--memory",
            "1G",
            "--print-config",
        ],
        &s.join("run"),
    );
    assert!(out.status.success(), "{}", err_text(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("memory = 1024"), "{text}");
    assert!(text.contains("vcpus = 2"), "{text}");
}

#[test]
fn background_restore_options_with_another_mode_are_refused() {
    let s = Scratch::new("cfg-restore-mode");
    for extra in [
        &["--record-working-set"][..],
        &["--ignore-working-set"],
        &["--fill-threads", "2"],
    ] {
        let mut args = vec!["restore", "/nonexistent/snapshot", "--mode", "lazy"];
        args.extend_from_slice(extra);
        let out = stasis(&args, &s.join("run"));
        let err = err_text(&out);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(
            err.contains("are for --mode background (not lazy)"),
            "{err}"
        );
    }
    // And clap refuses nonsense before that.
    let out = stasis(
        &["restore", "/nonexistent/snapshot", "--fill-threads", "0"],
        &s.join("run"),
    );
    assert_eq!(out.status.code(), Some(2), "{}", err_text(&out));
    let out = stasis(
        &[
            "restore",
            "/x",
            "--record-working-set",
            "--ignore-working-set",
        ],
        &s.join("run"),
    );
    assert_eq!(out.status.code(), Some(2), "{}", err_text(&out));
}
