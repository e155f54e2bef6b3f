//! The VM's virtio devices: disks, network interfaces, entropy sources and
//! consoles, each with a stable user-chosen id.
//!
//! In TOML each kind is an array of tables (`[[disk]]`, `[[net]]`,
//! `[[rng]]`, `[[console]]`); on the command line each is a repeatable flag
//! whose value is a comma-separated list of `key=value` pairs, e.g.
//! `--disk id=root,path=/img/root.raw,readonly=on`. Paths cannot contain a
//! comma in the flag form (use a TOML file for those).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{ConfigError, SerialConfig};
pub use stasis_disk::DiskFormat;

/// The most virtio devices a VM can have, all kinds together (the VMM has
/// that many MMIO slots and interrupt lines for them).
pub const MAX_VIRTIO_DEVICES: usize = 16;

/// The longest device id.
pub const MAX_DEVICE_ID_LEN: usize = 32;

/// The longest tap interface name (Linux's `IFNAMSIZ` less the NUL).
pub const MAX_TAP_NAME_LEN: usize = 15;

/// A virtio-blk disk backed by an image file (raw or qcow2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The device's id (snapshot sections and restore overrides use it).
    pub id: String,
    /// The raw image file.
    pub path: PathBuf,
    /// Offer the disk read-only (`VIRTIO_BLK_F_RO`); the file is opened
    /// read-only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub readonly: bool,
    /// The image format (`raw` or `qcow2`); detected from the file when
    /// not given (a file that starts with qcow2's magic is qcow2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
}

/// A virtio-net interface attached to a host tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The device's id.
    pub id: String,
    /// The host tap interface; it must exist (`ip tuntap add dev NAME mode
    /// tap`).
    pub tap: String,
    /// The guest's MAC address; by default one derived from the VM name and
    /// the device id (`52:54:00:xx:xx:xx`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
}

/// A virtio-rng entropy source fed from the host's `getrandom(2)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// The device's id.
    pub id: String,
}

/// A virtio-console with one port whose output goes to stdout, a file, a
/// UNIX socket or nowhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// The device's id.
    pub id: String,
    /// Where the output goes, in the `--serial` syntax: `stdout`, `null`,
    /// `file:PATH`, `socket:PATH`. Default `stdout`.
    #[serde(
        default,
        serialize_with = "output_to_str",
        deserialize_with = "output_from_str"
    )]
    pub output: SerialConfig,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn output_to_str<S: Serializer>(o: &SerialConfig, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&o.to_string())
}

fn output_from_str<'de, D: Deserializer<'de>>(d: D) -> Result<SerialConfig, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// An Ethernet MAC address; written `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered unicast address (`52:54:00:xx:xx:xx`)
    /// derived from the VM name and device id: the same pair always gives
    /// the same address.
    pub fn derived(vm_name: &str, device_id: &str) -> Self {
        // FNV-1a over "name\0id": stable across builds and platforms.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in vm_name.bytes().chain([0]).chain(device_id.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_le_bytes();
        Self([0x52, 0x54, 0x00, b[0], b[1], b[2]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid MAC address '{s}': {why}");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad("expected six hex bytes separated by ':'"));
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(bad("expected six hex bytes separated by ':'"));
            }
            m[i] = u8::from_str_radix(p, 16).map_err(|_| bad("not hexadecimal"))?;
        }
        if m[0] & 1 != 0 {
            return Err(bad("a multicast address cannot be an interface's address"));
        }
        if m == [0; 6] {
            return Err(bad("the all-zero address is not valid"));
        }
        Ok(Self(m))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A device flag (`--disk`, `--net`, `--rng`, `--console`) that could not be
/// understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --{flag} '{value}': {problem}")]
pub struct DeviceParseError {
    /// The flag, without dashes.
    pub flag: &'static str,
    /// What was given.
    pub value: String,
    /// What is wrong.
    pub problem: String,
}

/// Splits `id=x,path=y` into pairs, checking keys against `allowed` and
/// refusing repeats.
fn key_values<'a>(
    flag: &'static str,
    value: &'a str,
    allowed: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, DeviceParseError> {
    let err = |problem: String| DeviceParseError {
        flag,
        value: value.to_string(),
        problem,
    };
    let mut out: Vec<(&str, &str)> = Vec::new();
    for item in value.split(',') {
        let Some((k, v)) = item.split_once('=') else {
            return Err(err(format!(
                "'{item}' is not key=value (keys: {})",
                allowed.join(", ")
            )));
        };
        if !allowed.contains(&k) {
            return Err(err(format!(
                "unknown key '{k}' (keys: {})",
                allowed.join(", ")
            )));
        }
        if out.iter().any(|(o, _)| *o == k) {
            return Err(err(format!("key '{k}' given twice")));
        }
        out.push((k, v));
    }
    if !out.iter().any(|(k, _)| *k == "id") {
        return Err(err("missing id=...".into()));
    }
    Ok(out)
}

fn take(kv: &[(&str, &str)], key: &str) -> Option<String> {
    kv.iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

fn parse_bool(
    flag: &'static str,
    value: &str,
    key: &str,
    v: &str,
) -> Result<bool, DeviceParseError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(DeviceParseError {
            flag,
            value: value.to_string(),
            problem: format!("{key}={v}: expected on or off"),
        }),
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = DeviceParseError;
    /// `id=ID,path=PATH[,readonly=on|off][,format=raw|qcow2]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let kv = key_values("disk", s, &["id", "path", "readonly", "format"])?;
        let path = take(&kv, "path").ok_or_else(|| DeviceParseError {
            flag: "disk",
            value: s.to_string(),
            problem: "missing path=...".into(),
        })?;
        let readonly = match take(&kv, "readonly") {
            Some(v) => parse_bool("disk", s, "readonly", &v)?,
            None => false,
        };
        let format = take(&kv, "format")
            .map(|v| {
                v.parse().map_err(|problem| DeviceParseError {
                    flag: "disk",
                    value: s.to_string(),
                    problem,
                })
            })
            .transpose()?;
        Ok(Self {
            id: take(&kv, "id").unwrap_or_default(),
            path: path.into(),
            readonly,
            format,
        })
    }
}

impl std::str::FromStr for NetConfig {
    type Err = DeviceParseError;
    /// `id=ID,tap=TAP[,mac=52:54:00:12:34:56]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let kv = key_values("net", s, &["id", "tap", "mac"])?;
        let err = |problem: String| DeviceParseError {
            flag: "net",
            value: s.to_string(),
            problem,
        };
        let tap = take(&kv, "tap").ok_or_else(|| err("missing tap=...".into()))?;
        let mac = match take(&kv, "mac") {
            Some(m) => Some(m.parse().map_err(err)?),
            None => None,
        };
        Ok(Self {
            id: take(&kv, "id").unwrap_or_default(),
            tap,
            mac,
        })
    }
}

impl std::str::FromStr for RngConfig {
    type Err = DeviceParseError;
    /// `id=ID`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let kv = key_values("rng", s, &["id"])?;
        Ok(Self {
            id: take(&kv, "id").unwrap_or_default(),
        })
    }
}

impl std::str::FromStr for ConsoleConfig {
    type Err = DeviceParseError;
    /// `id=ID[,output=stdout|null|file:PATH|socket:PATH]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let kv = key_values("console", s, &["id", "output"])?;
        let output = match take(&kv, "output") {
            Some(o) => o
                .parse()
                .map_err(|e: crate::SerialParseError| DeviceParseError {
                    flag: "console",
                    value: s.to_string(),
                    problem: format!(
                        "output={}: expected stdout, null, file:PATH or socket:PATH",
                        e.0
                    ),
                })?,
            None => SerialConfig::Stdout,
        };
        Ok(Self {
            id: take(&kv, "id").unwrap_or_default(),
            output,
        })
    }
}

/// Checks a device id: 1-32 characters of `[A-Za-z0-9_-]`, starting with a
/// letter or digit.
pub fn validate_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("id must not be empty".into());
    }
    if id.len() > MAX_DEVICE_ID_LEN {
        return Err(format!(
            "id '{id}' is longer than {MAX_DEVICE_ID_LEN} characters"
        ));
    }
    if !id.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(format!("id '{id}' must start with a letter or digit"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "id '{id}' may contain only letters, digits, '_' and '-'"
        ));
    }
    Ok(())
}

/// Checks a tap interface name.
pub fn validate_tap_name(tap: &str) -> Result<(), String> {
    if tap.is_empty() {
        return Err("tap name must not be empty".into());
    }
    if tap.len() > MAX_TAP_NAME_LEN {
        return Err(format!(
            "tap name '{tap}' is longer than {MAX_TAP_NAME_LEN} characters"
        ));
    }
    if tap == "." || tap == ".." || tap.bytes().any(|b| b == b'/' || b == b':' || b <= b' ') {
        return Err(format!("'{tap}' is not a valid interface name"));
    }
    Ok(())
}

/// One virtio device of a configuration, whatever its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioDeviceRef<'a> {
    /// A disk.
    Disk(&'a DiskConfig),
    /// A network interface.
    Net(&'a NetConfig),
    /// An entropy source.
    Rng(&'a RngConfig),
    /// A console.
    Console(&'a ConsoleConfig),
}

impl<'a> VirtioDeviceRef<'a> {
    /// The device's id.
    pub fn id(&self) -> &'a str {
        match self {
            Self::Disk(d) => &d.id,
            Self::Net(n) => &n.id,
            Self::Rng(r) => &r.id,
            Self::Console(c) => &c.id,
        }
    }

    /// The configuration key of its kind: `disk`, `net`, `rng`, `console`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Disk(_) => "disk",
            Self::Net(_) => "net",
            Self::Rng(_) => "rng",
            Self::Console(_) => "console",
        }
    }
}

impl crate::VmConfig {
    /// Every virtio device in slot order: disks, then network interfaces,
    /// then entropy sources, then consoles, each in configuration order.
    /// Slot *n* is the *n*-th MMIO window and interrupt line the VMM gives
    /// to virtio devices.
    pub fn virtio_devices(&self) -> Vec<VirtioDeviceRef<'_>> {
        self.disk
            .iter()
            .map(VirtioDeviceRef::Disk)
            .chain(self.net.iter().map(VirtioDeviceRef::Net))
            .chain(self.rng.iter().map(VirtioDeviceRef::Rng))
            .chain(self.console.iter().map(VirtioDeviceRef::Console))
            .collect()
    }

    /// Checks the virtio devices: ids, uniqueness, count, tap names and
    /// output destinations; with `files`, also that disk images exist.
    pub(crate) fn validate_devices(&self, files: bool) -> Result<(), ConfigError> {
        let devices = self.virtio_devices();
        if devices.len() > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices.len()));
        }
        for (i, d) in devices.iter().enumerate() {
            let err = |problem: String| ConfigError::Device {
                kind: d.kind(),
                id: d.id().to_string(),
                problem,
            };
            validate_device_id(d.id()).map_err(err)?;
            if let Some(other) = devices[..i].iter().find(|o| o.id() == d.id()) {
                return Err(err(format!(
                    "id is already used by a {} device (ids must be unique across all devices)",
                    other.kind()
                )));
            }
            match d {
                VirtioDeviceRef::Disk(disk) => {
                    if disk.path.as_os_str().is_empty() {
                        return Err(err("path must not be empty".into()));
                    }
                    if files {
                        check_disk_file(&disk.path).map_err(err)?;
                    }
                }
                VirtioDeviceRef::Net(net) => validate_tap_name(&net.tap).map_err(err)?,
                VirtioDeviceRef::Rng(_) => {}
                VirtioDeviceRef::Console(c) => c
                    .output
                    .validate()
                    .map_err(|p| err(format!("output: {p}")))?,
            }
        }
        Ok(())
    }
}

/// Checks that a disk image exists and is a regular file.
pub fn check_disk_file(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{} is not a regular file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{}: no such file", path.display()))
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}
