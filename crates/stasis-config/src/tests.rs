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

#[test]
fn virtio_devices_from_toml_arrays_of_tables() {
    let cfg = VmConfig::from_toml_str(
        r#"
        name = "v"
        kernel = "/k"
        [[disk]]
        id = "root"
        path = "/img/root.raw"
        [[disk]]
        id = "data"
        path = "/img/data.raw"
        readonly = true
        [[net]]
        id = "eth0"
        tap = "tap0"
        mac = "52:54:00:12:34:56"
        [[rng]]
        id = "rng0"
        [[console]]
        id = "con0"
        output = "file:/tmp/con0.log"
        [[console]]
        id = "con1"
        "#,
    )
    .unwrap();
    assert_eq!(cfg.disk.len(), 2);
    assert!(!cfg.disk[0].readonly && cfg.disk[1].readonly);
    assert_eq!(
        cfg.net[0].mac,
        Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]))
    );
    assert_eq!(
        cfg.console[0].output,
        SerialConfig::File {
            path: "/tmp/con0.log".into()
        }
    );
    assert_eq!(cfg.console[1].output, SerialConfig::Stdout);
    let order: Vec<&str> = cfg.virtio_devices().iter().map(|d| d.id()).collect();
    assert_eq!(order, ["root", "data", "eth0", "rng0", "con0", "con1"]);
    let back = VmConfig::from_toml_str(&cfg.to_toml_string()).unwrap();
    assert_eq!(back, cfg);
}

#[test]
fn virtio_unknown_keys_are_errors() {
    let err = VmConfig::from_toml_str("name='a'\nkernel='k'\n[[disk]]\nid='d'\npath='/x'\nro=true")
        .unwrap_err();
    assert!(err.to_string().contains("ro"), "{err}");
    let err = VmConfig::from_toml_str(
        "name='a'\nkernel='k'\n[[net]]\nid='n'\ntap='t'\nmac='01:00:00:00:00:01'",
    )
    .unwrap_err();
    assert!(err.to_string().contains("multicast"), "{err}");
}

#[test]
fn device_flag_forms() {
    let d: DiskConfig = "id=root,path=/x.img,readonly=on".parse().unwrap();
    assert_eq!(
        d,
        DiskConfig {
            id: "root".into(),
            path: "/x.img".into(),
            readonly: true,
            format: None,
        }
    );
    let d: DiskConfig = "path=/x.img,id=r".parse().unwrap();
    assert!(!d.readonly);
    let n: NetConfig = "id=eth0,tap=tap0,mac=52:54:00:aa:bb:cc".parse().unwrap();
    assert_eq!(n.mac.unwrap().to_string(), "52:54:00:aa:bb:cc");
    assert_eq!("id=r".parse::<RngConfig>().unwrap().id, "r");
    let c: ConsoleConfig = "id=c,output=socket:/run/c.sock".parse().unwrap();
    assert_eq!(
        c.output,
        SerialConfig::Socket {
            path: "/run/c.sock".into()
        }
    );
    for (bad, want) in [
        ("path=/x", "missing id"),
        ("id=a", "missing path"),
        ("id=a,path=/x,size=3", "unknown key 'size'"),
        ("id=a,path=/x,readonly=maybe", "expected on or off"),
        ("id=a,id=b,path=/x", "given twice"),
        ("id=a,/x", "not key=value"),
    ] {
        let e = bad.parse::<DiskConfig>().unwrap_err().to_string();
        assert!(e.contains(want), "{bad}: {e}");
        assert!(e.starts_with("invalid --disk"), "{e}");
    }
    assert!("id=n,tap=t,mac=52:54:00:zz:00:00"
        .parse::<NetConfig>()
        .unwrap_err()
        .to_string()
        .contains("not hexadecimal"));
    assert!("id=c,output=tty".parse::<ConsoleConfig>().is_err());
}

#[test]
fn virtio_validation_errors_name_the_device() {
    let (d, k) = kernel_file();
    let img = d.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let mut cfg = VmConfig::new("a", k);
    cfg.disk.push(DiskConfig {
        id: "root".into(),
        path: img.clone(),
        readonly: false,
        format: None,
    });
    cfg.validate().unwrap();

    let mut dup = cfg.clone();
    dup.rng.push(RngConfig { id: "root".into() });
    let e = dup.validate().unwrap_err().to_string();
    assert_eq!(
        e,
        "rng 'root': id is already used by a disk device (ids must be unique across all devices)"
    );

    let mut missing = cfg.clone();
    missing.disk[0].path = d.path().join("nope.img");
    let e = missing.validate().unwrap_err().to_string();
    assert!(
        e.starts_with("disk 'root': ") && e.ends_with("nope.img: no such file"),
        "{e}"
    );
    // A restore checks the disk itself (against the saved size).
    missing.validate_for_restore().unwrap();

    let mut badid = cfg.clone();
    badid.disk[0].id = "-x".into();
    assert!(badid
        .validate()
        .unwrap_err()
        .to_string()
        .contains("must start with"));
    badid.disk[0].id = "a b".into();
    assert!(badid
        .validate()
        .unwrap_err()
        .to_string()
        .contains("may contain only"));

    let mut tap = cfg.clone();
    tap.net.push(NetConfig {
        id: "eth0".into(),
        tap: "a-very-long-tap-name".into(),
        mac: None,
    });
    assert!(tap
        .validate()
        .unwrap_err()
        .to_string()
        .contains("longer than 15"));

    let mut many = cfg.clone();
    many.rng = (0..16)
        .map(|i| RngConfig {
            id: format!("r{i}"),
        })
        .collect();
    assert!(matches!(
        many.validate(),
        Err(ConfigError::TooManyDevices(17))
    ));
}

#[test]
fn derived_mac_is_stable_and_local_unicast() {
    let a = MacAddr::derived("vm1", "eth0");
    assert_eq!(a, MacAddr::derived("vm1", "eth0"));
    assert_ne!(a, MacAddr::derived("vm1", "eth1"));
    assert_ne!(a, MacAddr::derived("vm2", "eth0"));
    assert_eq!(&a.0[..3], &[0x52, 0x54, 0x00]);
    assert_eq!(a.to_string().parse::<MacAddr>().unwrap(), a);
}

#[test]
fn device_paths_resolve_against_config_dir() {
    let d = tempdir::Dir::new();
    let file = d.path().join("vm.toml");
    std::fs::write(
        &file,
        "name='a'\nkernel='k'\n[[disk]]\nid='r'\npath='r.img'\n[[console]]\nid='c'\noutput='file:c.log'\n",
    )
    .unwrap();
    let cfg = VmConfig::from_toml_file(&file).unwrap();
    assert_eq!(cfg.disk[0].path, d.path().join("r.img"));
    assert_eq!(
        cfg.console[0].output,
        SerialConfig::File {
            path: d.path().join("c.log")
        }
    );
}

#[test]
fn cpu_model_and_features_from_toml() {
    let cfg = VmConfig::from_toml_str(
        "name='a'\nkernel='k'\ncpu='x86-64-v2'\ncpu_features=['+avx', '-popcnt']",
    )
    .unwrap();
    assert_eq!(cfg.cpu, CpuModel::X86_64V2);
    assert_eq!(cfg.cpu_features.to_strings(), vec!["+avx", "-popcnt"]);
    assert_eq!(cfg.cpu_spec().to_string(), "x86-64-v2,+avx,-popcnt");
    let one = VmConfig::from_toml_str("name='a'\nkernel='k'\ncpu_features='+avx,-popcnt'").unwrap();
    assert_eq!(one.cpu, CpuModel::Host);
    assert_eq!(one.cpu_features, cfg.cpu_features);
    let back = VmConfig::from_toml_str(&cfg.to_toml_string()).unwrap();
    assert_eq!(back, cfg);
    // The default model is not written, so older readers still parse it.
    let plain = VmConfig::new("a", "k");
    let text = plain.to_toml_string();
    assert!(!text.lines().any(|l| l.starts_with("cpu")), "{text}");
    let err = VmConfig::from_toml_str("name='a'\nkernel='k'\ncpu='x86-64-v9'").unwrap_err();
    assert!(err.to_string().contains("x86-64-v9"), "{err}");
    let err = VmConfig::from_toml_str("name='a'\nkernel='k'\ncpu_features='+avx9'").unwrap_err();
    assert!(
        err.to_string().contains("unknown CPU feature 'avx9'"),
        "{err}"
    );
}
