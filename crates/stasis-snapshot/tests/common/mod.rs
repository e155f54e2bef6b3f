//! Helpers shared by the integration tests: temp dirs, file hashing, and a
//! sample snapshot with two memory regions and a few sections.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use stasis_snapshot::{
    decode_json, CpuInfo, CpuidEntry, GuestCpuRecord, ManifestInput, MemoryRegionSource,
    SectionState, SnapshotWriter,
};

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "stasis-snapshot-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }

    /// Names of every entry directly in the temp dir, hidden ones included.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// (length, crc32c) of every file under `dir`, recursively, by relative path.
pub fn hash_tree(dir: &Path) -> BTreeMap<String, (u64, u32)> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, (u64, u32)>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                let bytes = fs::read(&p).unwrap();
                let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
                out.insert(rel, (bytes.len() as u64, crc32c::crc32c(&bytes)));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A vCPU's state, as a section owner would define it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: Vec<u64>,
    #[serde(with = "stasis_snapshot::hex_bytes")]
    pub lapic: Vec<u8>,
    /// Added later without a version bump.
    #[serde(default)]
    pub tsc_khz: u32,
}

impl SectionState for VcpuState {
    const NAME: &'static str = "vcpu";
    const VERSION: u32 = 1;
}

/// Version 1 of the serial state, kept to decode old snapshots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SerialStateV1 {
    pub ier: u8,
    pub lcr: u8,
}

/// Version 2 of the serial state: `lcr` became a list of registers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SerialState {
    pub ier: u8,
    pub regs: Vec<u8>,
}

impl SectionState for SerialState {
    const NAME: &'static str = "serial";
    const VERSION: u32 = 2;

    fn upgrade(version: u32, payload: &[u8]) -> Result<Self, String> {
        match version {
            1 => {
                let old: SerialStateV1 = decode_json(payload)?;
                Ok(SerialState {
                    ier: old.ier,
                    regs: vec![old.lcr],
                })
            }
            v => Err(format!("serial version {v} is unknown")),
        }
    }
}

pub const RAM0_GPA: u64 = 0;
pub const RAM0_SIZE: usize = (3 << 20) + 8192;
pub const RAM1_GPA: u64 = 4 << 30;
pub const RAM1_SIZE: usize = 2 << 20;

/// Guest memory for the sample: mostly zero, a few marked pages.
pub fn sample_memory() -> (Vec<u8>, Vec<u8>) {
    let mut ram0 = vec![0u8; RAM0_SIZE];
    let mut ram1 = vec![0u8; RAM1_SIZE];
    for page in [0usize, 1, 7, 300, 769] {
        let p = &mut ram0[page * 4096..(page + 1) * 4096];
        for (i, b) in p.iter_mut().enumerate() {
            *b = (page as u8).wrapping_mul(31).wrapping_add(i as u8) | 1;
        }
    }
    // A page whose only non-zero byte is the last one.
    ram0[10 * 4096 + 4095] = 0xaa;
    for page in [5usize, 511] {
        ram1[page * 4096..(page + 1) * 4096].fill(0x5a);
    }
    (ram0, ram1)
}

pub fn sample_vcpu(i: u64) -> VcpuState {
    VcpuState {
        regs: vec![i, 0xffff_ffff_ffff_fff0, 42],
        lapic: (0..64).map(|b| b as u8 ^ i as u8).collect(),
        tsc_khz: 2_000_000,
    }
}

pub fn sample_serial() -> SerialState {
    SerialState {
        ier: 1,
        regs: vec![3, 0, 0x60],
    }
}

pub fn sample_input(note: &str) -> ManifestInput {
    ManifestInput {
        created_unix_ms: Some(1_735_787_045_678),
        vm_config: serde_json::json!({"vcpus": 2, "memory_mib": 5}),
        cpu: CpuInfo {
            vendor: "GenuineIntel".into(),
            model: "Test CPU @ 1.00GHz".into(),
            cpuid: vec![
                CpuidEntry {
                    function: 0,
                    index: 0,
                    flags: 0,
                    eax: 0xd,
                    ebx: 0x756e_6547,
                    ecx: 0x6c65_746e,
                    edx: 0x4965_6e69,
                },
                CpuidEntry {
                    function: 1,
                    ..Default::default()
                },
            ],
            guest: Some(GuestCpuRecord {
                model: "x86-64-v2".into(),
                changes: vec!["+aes".into()],
                features: vec!["fpu".into(), "sse2".into(), "sse4_2".into(), "aes".into()],
                added_by_host: vec!["avx".into()],
                xcr0: 0x7,
            }),
        },
        notes: [("note".to_string(), note.to_string())].into(),
    }
}

/// Writes the sample snapshot at `dir`; `extra` may add sections.
pub fn write_sample(dir: &Path, note: &str, extra: impl FnOnce(&mut SnapshotWriter)) {
    let (ram0, ram1) = sample_memory();
    let mut w = SnapshotWriter::create(dir).unwrap();
    w.add_section("0", false, &sample_vcpu(0)).unwrap();
    w.add_section("1", false, &sample_vcpu(1)).unwrap();
    w.add_section("com1", false, &sample_serial()).unwrap();
    extra(&mut w);
    let stats = w
        .write_memory(&[
            MemoryRegionSource::new("ram0", RAM0_GPA, &ram0),
            MemoryRegionSource::new("ram1", RAM1_GPA, &ram1),
        ])
        .unwrap();
    assert_eq!(stats.nonzero_pages, 8);
    w.commit(sample_input(note)).unwrap();
}

/// Reads manifest.json as a JSON value.
pub fn manifest_value(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Flips one bit of the byte at `offset` in `path`.
pub fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).unwrap();
}

/// Writes a snapshot of one region `ram0` at guest address `gpa` holding
/// `mem`, as a diff of `parent` (its path and the path recorded) if given.
pub fn write_member(dir: &Path, mem: &[u8], gpa: u64, parent: Option<(&Path, &str)>) {
    let mut w = SnapshotWriter::create(dir).unwrap();
    if let Some((p, recorded)) = parent {
        w.set_parent(
            std::sync::Arc::new(stasis_snapshot::SnapshotChain::open(p).unwrap()),
            recorded,
        )
        .unwrap();
    }
    w.add_section("0", false, &sample_vcpu(0)).unwrap();
    w.write_memory(&[stasis_snapshot::MemoryRegionSource::new("ram0", gpa, mem)])
        .unwrap();
    w.commit(sample_input("member")).unwrap();
}
