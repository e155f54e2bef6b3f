//! Damaged, foreign and future snapshots: each gives its own error, nothing
//! panics, and reading never changes a file.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use stasis_snapshot::{
    encode_manifest, seal_manifest_body, Error, KnownSections, ManifestBody, SnapshotReader,
};

/// A fresh sample snapshot in its own temp dir.
fn sample(tag: &str) -> (TempDir, std::path::PathBuf) {
    let tmp = TempDir::new(tag);
    let dir = tmp.join("snap");
    write_sample(&dir, "sample", |_| {});
    (tmp, dir)
}

/// Opens (and, if that works, verifies) the snapshot, checking that no
/// file changes; returns the open error, if any.
fn open_unchanged(dir: &Path) -> Result<SnapshotReader, Error> {
    let before = hash_tree(dir);
    let r = SnapshotReader::open(dir);
    if let Ok(r) = &r {
        let _ = r.verify(|_, _| {});
        for s in r.sections() {
            let _ = r.section_bytes(s);
        }
    }
    assert_eq!(hash_tree(dir), before, "reading changed a file");
    r
}

fn open_err(dir: &Path) -> String {
    match open_unchanged(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// The manifest body as written, without checking it.
fn body_of(dir: &Path) -> ManifestBody {
    serde_json::from_value(manifest_value(dir)["body"].clone()).unwrap()
}

/// Rewrites the manifest with a modified (but correctly sealed) body.
fn reseal(dir: &Path, edit: impl FnOnce(&mut ManifestBody)) {
    let mut b = body_of(dir);
    edit(&mut b);
    fs::write(dir.join("manifest.json"), encode_manifest(&b).unwrap()).unwrap();
}

/// Rewrites the manifest from a JSON value of the body, sealed.
fn reseal_json(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v = manifest_value(dir)["body"].clone();
    edit(&mut v);
    let text = seal_manifest_body(1, &serde_json::to_string(&v).unwrap());
    fs::write(dir.join("manifest.json"), text).unwrap();
}

#[test]
fn missing_dir_and_manifest() {
    let tmp = TempDir::new("missing");
    let e = SnapshotReader::open(&tmp.join("nope")).unwrap_err();
    assert!(matches!(e, Error::DirMissing { .. }), "{e}");
    let (_t, dir) = sample("nomanifest");
    fs::remove_file(dir.join("manifest.json")).unwrap();
    let msg = open_err(&dir);
    assert!(msg.contains("manifest.json is missing"), "{msg}");
}

#[test]
fn truncated_manifest() {
    let (_t, dir) = sample("trunc");
    let p = dir.join("manifest.json");
    let text = fs::read(&p).unwrap();
    fs::write(&p, &text[..text.len() / 2]).unwrap();
    let msg = open_err(&dir);
    assert!(
        msg.starts_with("manifest.json is truncated or not JSON: "),
        "{msg}"
    );
    fs::write(&p, b"").unwrap();
    assert!(open_err(&dir).starts_with("manifest.json is truncated or not JSON"));
    fs::write(&p, b"\xff\xfe garbage").unwrap();
    assert!(open_err(&dir).starts_with("manifest.json is truncated or not JSON"));
}

#[test]
fn flipped_byte_in_manifest_body() {
    let (_t, dir) = sample("flipmanifest");
    let p = dir.join("manifest.json");
    let text = fs::read_to_string(&p).unwrap();
    // Still valid JSON, but not what was sealed.
    let bad = text.replacen("\"name\": \"stasis\"", "\"name\": \"stasiS\"", 1);
    assert_ne!(bad, text);
    fs::write(&p, bad).unwrap();
    let msg = open_err(&dir);
    assert!(
        msg.starts_with("manifest.json is corrupt: checksum mismatch"),
        "{msg}"
    );

    // Whitespace counts too: the checksum covers the bytes as written.
    let bad = text.replacen("\"created_unix_ms\": ", "\"created_unix_ms\":  ", 1);
    fs::write(&p, bad).unwrap();
    assert!(open_err(&dir).contains("checksum mismatch"));

    // A digit change in a number in the body.
    let bad = text.replacen("1735787045678", "1735787045679", 1);
    fs::write(&p, bad).unwrap();
    assert!(open_err(&dir).contains("checksum mismatch"));
}

#[test]
fn flipped_byte_in_section() {
    let (_t, dir) = sample("flipsection");
    let serial = body_of(&dir)
        .sections
        .into_iter()
        .find(|s| s.name == "serial")
        .unwrap();
    flip_byte(&dir.join("state.bin"), serial.offset + 3);
    let r = open_unchanged(&dir).expect("open checks sizes, not section bytes");
    let e = r
        .section_bytes(r.find_section("serial", "com1").unwrap())
        .unwrap_err();
    assert!(matches!(e, Error::SectionChecksum { .. }));
    assert!(
        e.to_string()
            .starts_with("section 'serial'/'com1' is corrupt: checksum mismatch"),
        "{e}"
    );
    assert!(r.read_section::<SerialState>("com1").is_err());
    // The other sections are fine.
    assert!(r.read_section::<VcpuState>("0").unwrap().is_some());

    let report = r.verify(|_, _| {}).unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.bad_sections.len(), 1);
    assert_eq!(report.bad_sections[0].name, "serial");
    assert_eq!(report.bad_sections[0].instance, "com1");
    assert!(report.bad_chunks.is_empty());
    let e = report.into_result().unwrap_err();
    assert!(e.to_string().contains("section 'serial'/'com1'"), "{e}");
}

#[test]
fn flipped_byte_in_memory() {
    let (_t, dir) = sample("flipmem");
    let b = body_of(&dir);
    let ram1 = b.memory.regions[1].clone();
    // A data page of ram1 (page 5), and a hole in ram0 (page 2).
    flip_byte(&dir.join("memory.img"), ram1.file_offset + 5 * 4096 + 17);
    flip_byte(&dir.join("memory.img"), 2 * 4096);
    let r = open_unchanged(&dir).unwrap();
    let report = r.verify(|_, _| {}).unwrap();
    assert!(report.bad_sections.is_empty());
    assert_eq!(report.bad_chunks.len(), 2, "{:?}", report.problems());
    let c0 = &report.bad_chunks[0];
    assert_eq!((c0.index, c0.start, c0.end), (0, 0, 2 << 20));
    assert_eq!(c0.region.as_deref(), Some("ram0"));
    assert_eq!(c0.gpa, Some((0, 2 << 20)));
    let c2 = &report.bad_chunks[1];
    assert_eq!((c2.index, c2.start, c2.end), (2, 4 << 20, 6 << 20));
    assert_eq!(c2.region.as_deref(), Some("ram1"));
    assert_eq!(c2.gpa, Some((RAM1_GPA, RAM1_GPA + (2 << 20))));
    let problems = report.problems();
    assert!(
        problems[1].starts_with(
            "memory chunk 2 (file bytes 0x400000..0x600000, region 'ram1', guest physical 0x100000000..0x100200000): checksum mismatch"
        ),
        "{}",
        problems[1]
    );
    let e = report.into_result().unwrap_err().to_string();
    assert!(
        e.contains("memory chunk 0") && e.contains("memory chunk 2"),
        "{e}"
    );
}

#[test]
fn missing_data_files() {
    for file in ["state.bin", "memory.img"] {
        let (_t, dir) = sample("missingfile");
        fs::remove_file(dir.join(file)).unwrap();
        let msg = open_err(&dir);
        assert!(msg.ends_with(&format!("{file} is missing")), "{msg}");
    }
}

#[test]
fn truncated_data_files() {
    let (_t, dir) = sample("truncmem");
    let p = dir.join("memory.img");
    let len = fs::metadata(&p).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    let msg = open_err(&dir);
    assert_eq!(
        msg,
        format!(
            "memory.img is {} bytes but the manifest records {len} (truncated or replaced?)",
            len - 4096
        )
    );

    let (_t, dir) = sample("truncstate");
    let p = dir.join("state.bin");
    fs::write(&p, b"short").unwrap();
    assert!(open_err(&dir).starts_with("state.bin is 5 bytes but the manifest records"));
}

#[test]
fn future_format_version() {
    let (_t, dir) = sample("future");
    let p = dir.join("manifest.json");
    let text = fs::read_to_string(&p).unwrap();
    fs::write(
        &p,
        text.replacen("\"format_version\": 1", "\"format_version\": 3", 1),
    )
    .unwrap();
    assert_eq!(
        open_err(&dir),
        "snapshot format version 3 is newer than this stasis supports (max 2); upgrade stasis"
    );
    // The version is checked before the body: a future body that this
    // build cannot even parse still gets the upgrade message.
    fs::write(
        &p,
        r#"{"format":"stasis-snapshot","format_version":7,"body_crc32c":"00000000","body":{"x":1}}"#,
    )
    .unwrap();
    assert!(open_err(&dir).starts_with("snapshot format version 7 is newer"));
}

#[test]
fn not_a_stasis_snapshot() {
    let (_t, dir) = sample("foreign");
    let p = dir.join("manifest.json");
    let text = fs::read_to_string(&p).unwrap();
    fs::write(
        &p,
        text.replacen("\"stasis-snapshot\"", "\"firecracker\"", 1),
    )
    .unwrap();
    let msg = open_err(&dir);
    assert!(msg.starts_with("not a stasis snapshot"), "{msg}");
    fs::write(&p, text.replacen("\"format\":", "\"fmt\":", 1)).unwrap();
    assert!(open_err(&dir).starts_with("not a stasis snapshot"));
    fs::write(&p, "[1, 2, 3]").unwrap();
    assert!(open_err(&dir).starts_with("not a stasis snapshot"));
    fs::write(&p, r#"{"format": 5}"#).unwrap();
    assert!(open_err(&dir).starts_with("not a stasis snapshot"));
}

#[test]
fn body_that_does_not_parse() {
    let (_t, dir) = sample("badbody");
    reseal_json(&dir, |v| {
        v.as_object_mut().unwrap().remove("memory");
    });
    let msg = open_err(&dir);
    assert!(
        msg.starts_with("manifest.json body does not parse"),
        "{msg}"
    );
    assert!(msg.contains("memory"), "{msg}");

    reseal_json(&dir, |v| v["state_size"] = serde_json::json!(-5));
    assert!(open_err(&dir).starts_with("manifest.json body does not parse"));
}

#[test]
fn unknown_fields_in_body_are_ignored() {
    let (_t, dir) = sample("unknownfield");
    reseal_json(&dir, |v| {
        v["added_in_a_later_release"] = serde_json::json!({"anything": [1, 2]});
        v["memory"]["future_hint"] = serde_json::json!(true);
    });
    let r = open_unchanged(&dir).unwrap();
    assert!(r.verify(|_, _| {}).unwrap().is_ok());
}

#[test]
fn unknown_sections_required_vs_optional() {
    let known = KnownSections::new()
        .with::<VcpuState>()
        .with::<SerialState>();

    let tmp = TempDir::new("unknownopt");
    let dir = tmp.join("snap");
    write_sample(&dir, "", |w| {
        w.add_raw_section("balloon", "0", 1, true, b"{}").unwrap();
    });
    let r = open_unchanged(&dir).unwrap();
    assert_eq!(r.sections().len(), 4, "sections() lists unknown ones too");
    let warnings = r.check_known(&|n| known.max_version(n)).unwrap();
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].name, "balloon");
    assert_eq!(
        warnings[0].to_string(),
        "skipping optional section 'balloon'/'0' version 1, which this stasis does not know"
    );

    let tmp = TempDir::new("unknownreq");
    let dir = tmp.join("snap");
    write_sample(&dir, "", |w| {
        w.add_raw_section("balloon", "0", 1, true, b"{}").unwrap();
        w.add_raw_section("nvme", "disk0", 3, false, b"{}").unwrap();
    });
    let r = open_unchanged(&dir).unwrap();
    let e = r.check_known(&|n| known.max_version(n)).unwrap_err();
    assert!(matches!(e, Error::UnknownSection { .. }));
    assert_eq!(
        e.to_string(),
        "snapshot needs section 'nvme'/'disk0' version 3, which this stasis does not know"
    );
}

#[test]
fn section_version_newer_than_known() {
    let known = KnownSections::new()
        .with::<VcpuState>()
        .with::<SerialState>();
    let tmp = TempDir::new("newer");
    let dir = tmp.join("snap");
    let mut w = stasis_snapshot::SnapshotWriter::create(&dir).unwrap();
    w.add_raw_section(
        "serial",
        "com1",
        3,
        false,
        br#"{"ier":1,"regs":[],"new":1}"#,
    )
    .unwrap();
    w.add_raw_section("vcpu", "0", 2, true, br#"{}"#).unwrap();
    w.commit(sample_input("")).unwrap();

    let r = open_unchanged(&dir).unwrap();
    let e = r.read_section::<SerialState>("com1").unwrap_err();
    assert!(
        matches!(
            e,
            Error::SectionTooNew {
                version: 3,
                max: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "snapshot needs section 'serial'/'com1' version 3, but this stasis reads it only up to version 2; upgrade stasis"
    );
    let e = r.check_known(&|n| known.max_version(n)).unwrap_err();
    assert!(matches!(e, Error::SectionTooNew { .. }), "{e}");

    // The same, optional, is a warning.
    let tmp = TempDir::new("neweropt");
    let dir = tmp.join("snap");
    let mut w = stasis_snapshot::SnapshotWriter::create(&dir).unwrap();
    w.add_raw_section("vcpu", "0", 2, true, br#"{}"#).unwrap();
    w.commit(sample_input("")).unwrap();
    let r = open_unchanged(&dir).unwrap();
    let warnings = r.check_known(&|n| known.max_version(n)).unwrap();
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].message.contains("only up to version 1"),
        "{}",
        warnings[0]
    );
}

#[test]
fn section_beyond_state_file() {
    let (_t, dir) = sample("beyond");
    let size = body_of(&dir).state_size;
    reseal(&dir, |b| b.sections[0].offset = (size / 8 + 1) * 8);
    let msg = open_err(&dir);
    assert!(matches!(
        open_unchanged(&dir),
        Err(Error::Invalid { ref field, .. }) if field.starts_with("sections[0].offset")
    ));
    assert!(msg.contains("sections[0].offset ('vcpu'/'0')"), "{msg}");
    assert!(msg.contains("beyond the end of state.bin"), "{msg}");

    let (_t, dir) = sample("absurd");
    reseal(&dir, |b| b.sections[1].size = u64::MAX);
    let msg = open_err(&dir);
    assert!(msg.contains("sections[1].size"), "{msg}");
    assert!(msg.contains("a section is at most 16 MiB"), "{msg}");

    let (_t, dir) = sample("misaligned");
    reseal(&dir, |b| b.sections[1].offset += 1);
    assert!(open_err(&dir).contains("not a multiple of 8"));

    let (_t, dir) = sample("overlap");
    reseal(&dir, |b| b.sections[1].offset = b.sections[0].offset);
    assert!(open_err(&dir).contains("overlaps the previous section"));

    let (_t, dir) = sample("dup");
    reseal(&dir, |b| {
        b.sections[1].instance = "0".into();
    });
    assert!(open_err(&dir).contains("duplicate"));
}

#[test]
fn bad_memory_layouts() {
    type Edit = fn(&mut ManifestBody);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "beyond",
            |b| b.memory.regions[1].size += 4096,
            "memory.regions[1].size: region at file offset 0x400000 of size 0x201000 extends beyond the memory file",
        ),
        ("absurd", |b| b.memory.regions[1].size = u64::MAX - 4095, "memory.regions[1].size"),
        (
            "misaligned",
            |b| b.memory.regions[1].file_offset = 3 << 20,
            "memory.regions[1].file_offset: 0x300000 is not a multiple of 2 MiB",
        ),
        ("unaligned size", |b| b.memory.regions[0].size -= 1, "memory.regions[0].size"),
        (
            "overlap in file",
            |b| b.memory.regions[1].file_offset = 2 << 20,
            "memory.regions[1].file_offset: 0x200000 overlaps the previous region",
        ),
        (
            "overlap in gpa",
            |b| b.memory.regions[1].gpa = 1 << 20,
            "regions \"ram0\" and \"ram1\" overlap in guest physical memory",
        ),
        ("gpa wraps", |b| b.memory.regions[1].gpa = u64::MAX - 4095, "memory.regions[1].size"),
        ("dup name", |b| b.memory.regions[1].name = "ram0".into(), "memory.regions[1].name"),
        ("chunks", |b| { b.memory.chunk_crc32c.pop(); }, "memory.chunk_crc32c: has 2 entries"),
        ("page size", |b| b.memory.page_size = 65536, "memory.page_size"),
        ("chunk size", |b| b.memory.chunk_size = 3 << 20, "memory.chunk_size"),
        ("zero chunk size", |b| b.memory.chunk_size = 0, "memory.chunk_size"),
        ("nonzero pages", |b| b.memory.nonzero_pages = 1 << 40, "memory.nonzero_pages"),
        ("path", |b| b.memory.file = "../../etc/passwd".into(), "memory.file"),
        ("hidden", |b| b.state_file = ".state".into(), "state_file"),
        ("same file", |b| b.memory.file = "state.bin".into(), "memory.file"),
    ];
    for (name, edit, want) in cases {
        let (_t, dir) = sample("layout");
        reseal(&dir, edit);
        let msg = open_err(&dir);
        assert!(
            msg.starts_with("invalid snapshot manifest: ") && msg.contains(want),
            "case {name}: {msg}"
        );
    }
}

#[test]
fn manifest_with_huge_file_size_is_rejected_without_allocating() {
    let (_t, dir) = sample("huge");
    // Claims a 1 EiB image with the right number of chunks for that... no:
    // the chunk list cannot match without being huge, so it fails there.
    reseal(&dir, |b| b.memory.file_size = 1 << 60);
    assert!(open_err(&dir).contains("memory.chunk_crc32c"));
    // A consistent manifest whose file is smaller on disk fails the size check.
    let (_t, dir) = sample("huge2");
    reseal(&dir, |b| {
        b.memory.file_size += 2 << 20;
        b.memory.chunk_crc32c.push(0);
    });
    assert!(open_err(&dir).starts_with("memory.img is "));
}

#[test]
fn bad_guest_cpu_records() {
    let (_t, dir) = sample("guestcpu");
    reseal(&dir, |b| {
        b.cpu.guest.as_mut().unwrap().model = "\u{1b}[31mred".into()
    });
    assert_eq!(
        open_err(&dir),
        "invalid snapshot manifest: cpu.guest.model: must be 1-64 printable ASCII characters"
    );
    reseal(&dir, |b| {
        let g = b.cpu.guest.as_mut().unwrap();
        g.model = "x86-64-v2".into();
        g.features[2] = "x".repeat(65);
    });
    assert_eq!(
        open_err(&dir),
        "invalid snapshot manifest: cpu.guest.features[2]: must be 1-64 printable ASCII characters"
    );
    reseal(&dir, |b| {
        let g = b.cpu.guest.as_mut().unwrap();
        g.features = vec!["avx".into(); 5000];
    });
    assert_eq!(
        open_err(&dir),
        "manifest.json body does not parse: cpu.guest.features: has more than 2048 elements"
    );
    // A snapshot without the record (written before CPU models) opens.
    reseal_json(&dir, |b| b["cpu"]["guest"] = serde_json::Value::Null);
    open_unchanged(&dir).unwrap();
}
