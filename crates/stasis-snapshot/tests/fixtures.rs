//! Snapshots written by older versions of stasis, checked in under
//! `tests/fixtures/`, must open and decode forever. Fixtures are never
//! regenerated or edited, only added (see docs/FORMAT.md, "Compatibility").
//!
//! The structs below are frozen copies of what the fixture's sections held
//! when it was written; they are not the VMM's current state types.

mod common;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stasis_snapshot::{
    CpuInfo, CpuidEntry, ManifestInput, MemoryRegionSource, SectionState, SnapshotReader,
    SnapshotWriter,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct FixtureVcpuV1 {
    rip: u64,
    rsp: u64,
    #[serde(with = "stasis_snapshot::hex_bytes")]
    lapic: Vec<u8>,
}

impl SectionState for FixtureVcpuV1 {
    const NAME: &'static str = "vcpu";
    const VERSION: u32 = 1;
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct FixtureSerialV1 {
    ier: u8,
    lcr: u8,
    #[serde(with = "stasis_snapshot::hex_bytes")]
    fifo: Vec<u8>,
}

impl SectionState for FixtureSerialV1 {
    const NAME: &'static str = "serial";
    const VERSION: u32 = 1;
}

const V1_REGION_SIZE: usize = 64 << 10;
const V1_NONZERO_PAGES: [usize; 3] = [0, 3, 15];

fn v1_memory() -> Vec<u8> {
    let mut mem = vec![0u8; V1_REGION_SIZE];
    for p in V1_NONZERO_PAGES {
        for (i, b) in mem[p * 4096..(p + 1) * 4096].iter_mut().enumerate() {
            *b = (i as u8).wrapping_add(p as u8) | 0x80;
        }
    }
    mem
}

fn v1_vcpu() -> FixtureVcpuV1 {
    FixtureVcpuV1 {
        rip: 0xfff0,
        rsp: 0x7000,
        lapic: vec![0x10, 0x00, 0x05, 0xff],
    }
}

fn v1_serial() -> FixtureSerialV1 {
    FixtureSerialV1 {
        ier: 0x01,
        lcr: 0x03,
        fifo: b"hi\n".to_vec(),
    }
}

fn v1_input() -> ManifestInput {
    ManifestInput {
        created_unix_ms: Some(1_767_225_600_000),
        vm_config: serde_json::json!({"vcpus": 1, "memory_mib": 0, "kernel": "fixture"}),
        cpu: CpuInfo {
            vendor: "AuthenticAMD".into(),
            model: "fixture cpu family 25 model 1 stepping 1".into(),
            cpuid: vec![
                CpuidEntry {
                    function: 0,
                    index: 0,
                    flags: 0,
                    eax: 0x10,
                    ebx: 0x6874_7541,
                    ecx: 0x444d_4163,
                    edx: 0x6974_6e65,
                },
                CpuidEntry {
                    function: 7,
                    index: 0,
                    flags: 1,
                    eax: 0,
                    ebx: 0x219c_97a9,
                    ecx: 0,
                    edx: 0,
                },
            ],
            // Written before CPU models: the field is absent in the file.
            guest: None,
        },
        notes: [("purpose".to_string(), "format fixture v1".to_string())].into(),
    }
}

/// Writes `tests/fixtures/v1-minimal`. Run once, when format version 1 was
/// current; never again (the point of a fixture is that it is old):
/// `cargo test -p stasis-snapshot --test fixtures -- --ignored generate`.
#[test]
#[ignore = "writes the checked-in fixture; never regenerate it"]
fn generate_v1_minimal_fixture() {
    let dir = fixture("v1-minimal");
    assert!(
        !dir.exists(),
        "{} exists; fixtures are never regenerated",
        dir.display()
    );
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let mem = v1_memory();
    let mut w = SnapshotWriter::create(&dir).unwrap();
    w.add_section("0", false, &v1_vcpu()).unwrap();
    w.add_section("com1", true, &v1_serial()).unwrap();
    w.write_memory(&[MemoryRegionSource::new("ram0", 0x10_0000, &mem)])
        .unwrap();
    w.commit(v1_input()).unwrap();
}

#[test]
fn v1_minimal_fixture_reads() {
    let dir = fixture("v1-minimal");
    let r = SnapshotReader::open(&dir).unwrap();
    let m = r.manifest();
    assert_eq!(m.format_version, 1);
    let b = r.body();
    assert_eq!(b.producer.name, "stasis");
    assert_eq!(b.producer.version, "0.1.0");
    let input = v1_input();
    assert_eq!(b.created_unix_ms, 1_767_225_600_000);
    assert_eq!(
        stasis_snapshot::format_unix_ms(b.created_unix_ms),
        "2026-01-01T00:00:00.000Z"
    );
    assert_eq!(b.vm_config, input.vm_config);
    assert_eq!(b.cpu, input.cpu);
    assert_eq!(b.parent, None);
    assert_eq!(b.notes, input.notes);
    assert_eq!(b.state_file, "state.bin");

    // Memory.
    let mem = &b.memory;
    assert_eq!(mem.page_size, 4096);
    assert_eq!(mem.chunk_size, 2 << 20);
    assert_eq!(mem.file, "memory.img");
    assert_eq!(mem.file_size, V1_REGION_SIZE as u64);
    assert_eq!(mem.nonzero_pages, 3);
    assert_eq!(mem.regions.len(), 1);
    let reg = &mem.regions[0];
    assert_eq!(
        (reg.name.as_str(), reg.gpa, reg.size, reg.file_offset),
        ("ram0", 0x10_0000, V1_REGION_SIZE as u64, 0)
    );
    let want = v1_memory();
    assert_eq!(mem.chunk_crc32c, vec![crc32c::crc32c(&want)]);
    assert_eq!(mem.chunk_crc32c, vec![0x8507_720c]);
    let mut got = vec![0u8; V1_REGION_SIZE];
    r.read_region_into(reg, &mut got, true).unwrap();
    assert_eq!(got, want);

    // Sections.
    let s = r.sections();
    assert_eq!(s.len(), 2);
    assert_eq!(
        (
            s[0].name.as_str(),
            s[0].instance.as_str(),
            s[0].version,
            s[0].optional,
            s[0].offset
        ),
        ("vcpu", "0", 1, false, 0)
    );
    assert_eq!(
        (
            s[1].name.as_str(),
            s[1].instance.as_str(),
            s[1].version,
            s[1].optional
        ),
        ("serial", "com1", 1, true)
    );
    assert_eq!(s[1].offset % 8, 0);
    assert_eq!(b.state_size, s[1].offset + s[1].size);
    assert_eq!(
        r.section_bytes(&s[0]).unwrap(),
        br#"{"rip":65520,"rsp":28672,"lapic":"100005ff"}"#
    );
    assert_eq!(
        r.section_bytes(&s[1]).unwrap(),
        br#"{"ier":1,"lcr":3,"fifo":"68690a"}"#
    );
    assert_eq!((s[0].crc32c, s[1].crc32c), (0x1904_cdd2, 0x22b6_6fc5));
    assert_eq!(
        r.read_section::<FixtureVcpuV1>("0").unwrap(),
        Some((1, v1_vcpu()))
    );
    assert_eq!(
        r.read_section::<FixtureSerialV1>("com1").unwrap(),
        Some((1, v1_serial()))
    );

    assert!(r.verify(|_, _| {}).unwrap().is_ok());
    let summary = stasis_snapshot::summary(&r);
    assert!(summary.contains("AuthenticAMD"), "{summary}");
}

/// The diff fixture's memory: the v1 memory with page 2 rewritten, the
/// first non-zero page cleared, and page 15 filled.
fn v2_diff_memory() -> Vec<u8> {
    let mut mem = v1_memory();
    mem[2 * 4096..3 * 4096].fill(0x5a);
    let first = V1_NONZERO_PAGES[0];
    mem[first * 4096..(first + 1) * 4096].fill(0);
    mem[15 * 4096..16 * 4096].fill(0xc3);
    mem
}

/// Writes `tests/fixtures/v2-diff-chain/{base,diff}`: a full snapshot and
/// a diff (format version 2) against it, when diff snapshots were new.
/// Never regenerated:
/// `cargo test -p stasis-snapshot --test fixtures -- --ignored generate`.
#[test]
#[ignore = "writes the checked-in fixture; never regenerate it"]
fn generate_v2_diff_chain_fixture() {
    let root = fixture("v2-diff-chain");
    assert!(
        !root.exists(),
        "{} exists; fixtures are never regenerated",
        root.display()
    );
    std::fs::create_dir_all(&root).unwrap();
    let (base, diff) = (root.join("base"), root.join("diff"));
    let mut w = SnapshotWriter::create(&base).unwrap();
    w.add_section("0", false, &v1_vcpu()).unwrap();
    w.write_memory(&[MemoryRegionSource::new("ram0", 0x10_0000, &v1_memory())])
        .unwrap();
    w.commit(v1_input()).unwrap();
    let mut w = SnapshotWriter::create(&diff).unwrap();
    let chain = stasis_snapshot::SnapshotChain::open(&base).unwrap();
    w.set_parent(std::sync::Arc::new(chain), "../base").unwrap();
    w.add_section("0", false, &v1_vcpu()).unwrap();
    w.write_memory(&[MemoryRegionSource::new(
        "ram0",
        0x10_0000,
        &v2_diff_memory(),
    )])
    .unwrap();
    w.commit(v1_input()).unwrap();
}

#[test]
fn v2_diff_chain_fixture_reads() {
    let root = fixture("v2-diff-chain");
    let diff = SnapshotReader::open(&root.join("diff")).unwrap();
    assert_eq!(diff.manifest().format_version, 2);
    let b = diff.body();
    let parent = b.parent.as_ref().expect("a diff has a parent");
    assert_eq!(parent.path, "../base");
    let base = SnapshotReader::open(&root.join("base")).unwrap();
    assert_eq!(base.manifest().format_version, 1);
    assert_eq!(
        base.body().snapshot_id.as_deref(),
        Some(parent.snapshot_id.as_str())
    );
    assert_eq!(
        format!("{:08x}", base.manifest().body_crc32c),
        parent.body_crc32c
    );
    let map = diff.page_map().unwrap().unwrap();
    use stasis_snapshot::PageSource::{Here, Parent, Zero};
    let first = V1_NONZERO_PAGES[0] as u64;
    assert_eq!(map.get(2), Here);
    assert_eq!(map.get(15), Here);
    assert_eq!(map.get(first), Zero);
    for p in V1_NONZERO_PAGES.iter().skip(1) {
        if *p != 2 && *p != 15 {
            assert_eq!(map.get(*p as u64), Parent, "page {p}");
        }
    }
    assert_eq!(b.memory.nonzero_pages, 2);
    assert!(diff.verify(|_, _| {}).unwrap().is_ok());
    let chain = stasis_snapshot::SnapshotChain::open(&root.join("diff")).unwrap();
    assert_eq!(chain.len(), 2);
    let mut got = vec![0u8; V1_REGION_SIZE];
    chain.read_region_into(0, &mut got, true).unwrap();
    assert_eq!(got, v2_diff_memory());
}
