use super::*;
use std::io::Write;

fn kernel_file() -> (tempdir::Dir, PathBuf) {
    let d = tempdir::Dir::new();
    let k = d.path().join("vmlinux");
    std::fs::File::create(&k)
        .unwrap()
        .write_all(b"\x7fELF")
        .unwrap();
    (d, k)
}

/// A temporary directory removed on drop (no extra crate for one test helper).
mod tempdir {
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "stasis-config-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn full_toml_parses_with_defaults_filled() {
    let cfg = VmConfig::from_toml_str(
        r#"
        name = "web-1"
        kernel = "/boot/vmlinux"
        memory = "2G"
        vcpus = 2
        [serial]
        mode = "file"
        path = "/tmp/console.log"
        "#,
    )
    .unwrap();
    assert_eq!(cfg.name, "web-1");
    assert_eq!(cfg.memory_mib, 2048);
    assert_eq!(cfg.vcpus, 2);
    assert_eq!(cfg.cmdline, DEFAULT_CMDLINE);
    assert_eq!(cfg.boot, BootProtocol::Auto);
    assert_eq!(
        cfg.serial,
        SerialConfig::File {
            path: "/tmp/console.log".into()
        }
    );
}

#[test]
fn memory_as_integer_is_mib() {
    let cfg = VmConfig::from_toml_str("name='a'\nkernel='k'\nmemory=512").unwrap();
    assert_eq!(cfg.memory_mib, 512);
}

#[test]
fn unknown_key_is_named() {
    let err = VmConfig::from_toml_str("name='a'\nkernel='k'\nmemroy=512").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("memroy"), "{msg}");
}

#[test]
fn missing_kernel_key_is_named() {
    let err = VmConfig::from_toml_str("name='a'").unwrap_err();
    assert!(err.to_string().contains("kernel"), "{err}");
}

#[test]
fn bad_memory_string_is_explained() {
    let err = VmConfig::from_toml_str("name='a'\nkernel='k'\nmemory='lots'").unwrap_err();
    assert!(err.to_string().contains("invalid size 'lots'"), "{err}");
}

#[test]
fn validate_rejects_missing_kernel() {
    let cfg = VmConfig::new("a", "/nonexistent/vmlinux");
    let msg = cfg.validate().unwrap_err().to_string();
    assert_eq!(msg, "kernel = /nonexistent/vmlinux: no such file");
}

#[test]
fn validate_rejects_directory_as_kernel() {
    let d = tempdir::Dir::new();
    let cfg = VmConfig::new("a", d.path());
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("not a regular file"));
}

#[test]
fn validate_rejects_too_little_memory() {
    let (_d, k) = kernel_file();
    let mut cfg = VmConfig::new("a", k);
    cfg.memory_mib = 8;
    let msg = cfg.validate().unwrap_err().to_string();
    assert!(
        msg.starts_with("memory = 8 MiB: must be at least 16 MiB"),
        "{msg}"
    );
}

#[test]
fn validate_rejects_zero_and_too_many_vcpus() {
    let (_d, k) = kernel_file();
    let mut cfg = VmConfig::new("a", k);
    cfg.vcpus = 0;
    assert!(matches!(cfg.validate(), Err(ConfigError::Vcpus(0))));
    cfg.vcpus = 1000;
    assert!(matches!(cfg.validate(), Err(ConfigError::Vcpus(1000))));
    cfg.vcpus = 2;
    cfg.validate().unwrap();
}

#[test]
fn validate_rejects_bad_names() {
    for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(65)] {
        assert!(validate_name(bad).is_err(), "{bad:?} accepted");
    }
    for good in ["a", "web-1", "vm_2.test", &"x".repeat(64)] {
        validate_name(good).unwrap();
    }
}

#[test]
fn validate_rejects_missing_initrd() {
    let (_d, k) = kernel_file();
    let mut cfg = VmConfig::new("a", k);
    cfg.initrd = Some("/nonexistent/initrd".into());
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("initrd = "));
}

#[test]
fn serial_flag_forms() {
    assert_eq!(
        "stdout".parse::<SerialConfig>().unwrap(),
        SerialConfig::Stdout
    );
    assert_eq!("null".parse::<SerialConfig>().unwrap(), SerialConfig::Null);
    assert_eq!(
        "socket:/run/x.sock".parse::<SerialConfig>().unwrap(),
        SerialConfig::Socket {
            path: "/run/x.sock".into()
        }
    );
    assert!("file:".parse::<SerialConfig>().is_err());
    assert!("tty".parse::<SerialConfig>().is_err());
}

#[test]
fn sizes() {
    assert_eq!(parse_size_mib("512").unwrap(), 512);
    assert_eq!(parse_size_mib("512M").unwrap(), 512);
    assert_eq!(parse_size_mib("4GiB").unwrap(), 4096);
    assert_eq!(parse_size_mib("1g").unwrap(), 1024);
    assert!(parse_size_mib("1.5G").is_err());
    assert!(parse_size_mib("12T").is_err());
    assert!(parse_size_mib("").is_err());
}

#[test]
fn relative_paths_resolve_against_config_dir() {
    let d = tempdir::Dir::new();
    let file = d.path().join("vm.toml");
    std::fs::write(&file, "name='a'\nkernel='vmlinux'\ninitrd='/abs/initrd'\n").unwrap();
    let cfg = VmConfig::from_toml_file(&file).unwrap();
    assert_eq!(cfg.kernel, d.path().join("vmlinux"));
    assert_eq!(cfg.initrd.as_deref(), Some(Path::new("/abs/initrd")));
}

#[test]
fn toml_round_trip() {
    let mut cfg = VmConfig::new("rt", "/k");
    cfg.serial = SerialConfig::Socket {
        path: "/s.sock".into(),
    };
    cfg.initrd = Some("/i".into());
    let back = VmConfig::from_toml_str(&cfg.to_toml_string()).unwrap();
    assert_eq!(back, cfg);
}
