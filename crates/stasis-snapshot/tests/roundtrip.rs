//! Write → read round trips and the crash-safe replacement protocol, on
//! real files in temp dirs.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::*;
use stasis_snapshot::{
    remove_stale_temp_dirs, summary, summary_json, Error, KnownSections, MemoryRegionSource,
    SectionState, SnapshotReader, SnapshotWriter, CHUNK_SIZE,
};

#[test]
fn round_trip() {
    let tmp = TempDir::new("rt");
    let dir = tmp.join("snap");
    write_sample(&dir, "first", |_| {});
    assert_eq!(tmp.entries(), vec!["snap"], "no temp dirs left behind");
    let mut files: Vec<String> = hash_tree(&dir).into_keys().collect();
    files.sort();
    assert_eq!(files, vec!["manifest.json", "memory.img", "state.bin"]);

    let r = SnapshotReader::open(&dir).unwrap();
    let m = r.manifest();
    assert_eq!(m.format_version, 1);
    let b = r.body();
    assert_eq!(b.producer.name, "stasis");
    assert_eq!(b.producer.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(b.created_unix_ms, 1_735_787_045_678);
    assert_eq!(b.vm_config["vcpus"], 2);
    assert_eq!(b.cpu, sample_input("").cpu);
    assert_eq!(b.notes["note"], "first");
    assert_eq!(b.parent, None);
    assert_eq!(b.state_file, "state.bin");

    // Sections: typed reads, all instances, alignment.
    assert_eq!(r.sections().len(), 3);
    for s in r.sections() {
        assert_eq!(s.offset % 8, 0);
    }
    assert_eq!(
        r.read_section::<VcpuState>("1").unwrap(),
        Some((1, sample_vcpu(1)))
    );
    assert_eq!(r.read_section::<VcpuState>("7").unwrap(), None);
    let all = r.read_all::<VcpuState>().unwrap();
    assert_eq!(
        all,
        vec![("0".into(), sample_vcpu(0)), ("1".into(), sample_vcpu(1))]
    );
    assert_eq!(
        r.read_section::<SerialState>("com1").unwrap(),
        Some((2, sample_serial()))
    );
    // The payload is JSON with bytes as hex.
    let raw = r
        .section_bytes(r.find_section("vcpu", "0").unwrap())
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(v["lapic"].as_str().unwrap().len(), 128);
    assert!(v["lapic"].as_str().unwrap().starts_with("00010203"));

    let known = KnownSections::new()
        .with::<VcpuState>()
        .with::<SerialState>();
    assert!(r.check_known(&|n| known.max_version(n)).unwrap().is_empty());

    // Memory layout: 2 MiB-aligned offsets, regions in order, file ends at
    // the last region.
    let mem = &b.memory;
    assert_eq!(mem.page_size, 4096);
    assert_eq!(mem.chunk_size, 2 << 20);
    assert_eq!(mem.file, "memory.img");
    let regs = r.regions();
    assert_eq!(regs.len(), 2);
    assert_eq!(
        (
            regs[0].name.as_str(),
            regs[0].gpa,
            regs[0].size,
            regs[0].file_offset
        ),
        ("ram0", RAM0_GPA, RAM0_SIZE as u64, 0)
    );
    assert_eq!(
        (
            regs[1].name.as_str(),
            regs[1].gpa,
            regs[1].size,
            regs[1].file_offset
        ),
        ("ram1", RAM1_GPA, RAM1_SIZE as u64, 4 << 20)
    );
    assert_eq!(mem.file_size, (4 << 20) + RAM1_SIZE as u64);
    assert_eq!(mem.chunk_crc32c.len(), 3);
    assert_eq!(mem.nonzero_pages, 8);

    // Holes really are holes.
    let md = fs::metadata(r.memory_file_path()).unwrap();
    assert_eq!(md.len(), mem.file_size);
    assert!(
        md.blocks() * 512 <= 16 * 4096 * 2,
        "memory.img has {} bytes allocated for 8 non-zero pages",
        md.blocks() * 512
    );
    assert_eq!(r.memory_allocated_bytes().unwrap(), md.blocks() * 512);

    // Chunk checksums, computed independently over the whole file.
    let img = fs::read(r.memory_file_path()).unwrap();
    for (i, c) in img.chunks(CHUNK_SIZE as usize).enumerate() {
        assert_eq!(crc32c::crc32c(c), mem.chunk_crc32c[i], "chunk {i}");
    }
    let (ram0, ram1) = sample_memory();
    assert_eq!(&img[..RAM0_SIZE], &ram0[..]);
    assert!(img[RAM0_SIZE..4 << 20].iter().all(|&b| b == 0));
    assert_eq!(&img[4 << 20..], &ram1[..]);

    // Eager restore, into zeroed memory and into dirty memory.
    let mut dst = vec![0u8; RAM0_SIZE];
    let n = r.read_region_into(&regs[0], &mut dst, true).unwrap();
    assert_eq!(dst, ram0);
    assert!(n < RAM0_SIZE as u64, "holes were read: {n} bytes");
    let mut dst = vec![0xffu8; RAM1_SIZE];
    r.read_region_into(&regs[1], &mut dst, false).unwrap();
    assert_eq!(dst, ram1);
    let mut small = vec![0u8; 4096];
    assert!(matches!(
        r.read_region_into(&regs[1], &mut small, true),
        Err(Error::Usage(_))
    ));

    // Verify passes and reports progress up to the total.
    let mut last = (0, 0);
    let report = r.verify(|d, t| last = (d, t)).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems());
    assert_eq!(report.sections_checked, 3);
    assert_eq!(report.chunks_checked, 3);
    assert_eq!(last.0, last.1);
    assert_eq!(last.1, b.state_size + mem.file_size);
    report.into_result().unwrap();

    // manifest.json is plain JSON a person or jq can read.
    let v = manifest_value(&dir);
    assert_eq!(v["format"], "stasis-snapshot");
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["body_crc32c"].as_str().unwrap().len(), 8);
    assert_eq!(v["body"]["memory"]["regions"][1]["name"], "ram1");

    // inspect.
    let s = summary(&r);
    for want in [
        "format version: 1",
        "2025-01-02T03:04:05.678Z",
        "1735787045678",
        "GenuineIntel / Test CPU @ 1.00GHz",
        "cpuid leaves:   2",
        "region ram1: guest 0x100000000..0x100200000 (2.00 MiB)",
        "nonzero pages:  8 of 1282",
        "serial",
        "com1",
        "note: first",
    ] {
        assert!(s.contains(want), "summary lacks {want:?}:\n{s}");
    }
    let j = summary_json(&r);
    assert_eq!(j["sections"][2]["name"], "serial");
    assert_eq!(j["memory"]["nonzero_pages"], 8);
    assert_eq!(j["created"], "2025-01-02T03:04:05.678Z");
    assert!(j["memory"]["allocated_bytes"].as_u64().unwrap() < mem.file_size);
}

#[test]
fn upgrade_old_section_version() {
    let tmp = TempDir::new("upgrade");
    let dir = tmp.join("snap");
    let mut w = SnapshotWriter::create(&dir).unwrap();
    w.add_raw_section("serial", "com1", 1, false, br#"{"ier":5,"lcr":3}"#)
        .unwrap();
    w.commit(sample_input("old serial")).unwrap();
    let r = SnapshotReader::open(&dir).unwrap();
    let (v, s) = r.read_section::<SerialState>("com1").unwrap().unwrap();
    assert_eq!(v, 1);
    assert_eq!(
        s,
        SerialState {
            ier: 5,
            regs: vec![3]
        }
    );
    // An empty snapshot (no memory) is valid.
    assert_eq!(r.body().memory.file_size, 0);
    assert!(r.verify(|_, _| {}).unwrap().is_ok());
}

#[test]
fn added_field_with_default_needs_no_bump() {
    let tmp = TempDir::new("default");
    let dir = tmp.join("snap");
    let mut w = SnapshotWriter::create(&dir).unwrap();
    // Written before `tsc_khz` existed.
    w.add_raw_section("vcpu", "0", 1, false, br#"{"regs":[1],"lapic":"ff"}"#)
        .unwrap();
    w.commit(sample_input("")).unwrap();
    let r = SnapshotReader::open(&dir).unwrap();
    let (_, s) = r.read_section::<VcpuState>("0").unwrap().unwrap();
    assert_eq!(
        s,
        VcpuState {
            regs: vec![1],
            lapic: vec![0xff],
            tsc_khz: 0
        }
    );
}

#[test]
fn dropped_writer_leaves_no_trace_and_old_snapshot_intact() {
    let tmp = TempDir::new("drop");
    let dir = tmp.join("snap");
    write_sample(&dir, "old", |_| {});
    let before = hash_tree(&dir);

    let (ram0, ram1) = sample_memory();
    {
        let mut w = SnapshotWriter::create(&dir).unwrap();
        assert!(w.temp_dir().starts_with(tmp.path()));
        assert!(w
            .temp_dir()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".snap.tmp-"));
        w.add_section("0", false, &sample_vcpu(9)).unwrap();
        w.write_memory(&[
            MemoryRegionSource::new("ram0", 0, &ram1),
            MemoryRegionSource::new("ram1", 1 << 30, &ram0),
        ])
        .unwrap();
        assert_eq!(tmp.entries().len(), 2, "temp dir exists while writing");
        // Dropped here without commit.
    }
    assert_eq!(tmp.entries(), vec!["snap"]);
    assert_eq!(hash_tree(&dir), before);

    // A writer that fails half-way is the same.
    {
        let mut w = SnapshotWriter::create(&dir).unwrap();
        w.add_section("0", false, &sample_vcpu(9)).unwrap();
        let e = w.add_section("0", false, &sample_vcpu(9)).unwrap_err();
        assert!(e.to_string().contains("added twice"), "{e}");
        let odd = vec![1u8; 100];
        let e = w
            .write_memory(&[MemoryRegionSource::new("ram0", 0, &odd)])
            .unwrap_err();
        assert!(e.to_string().contains("multiple of 4096"), "{e}");
    }
    assert_eq!(tmp.entries(), vec!["snap"]);
    assert_eq!(hash_tree(&dir), before);
    assert_eq!(
        SnapshotReader::open(&dir).unwrap().body().notes["note"],
        "old"
    );
}

#[test]
fn commit_replaces_existing_snapshot() {
    let tmp = TempDir::new("replace");
    let dir = tmp.join("snap");
    write_sample(&dir, "old", |_| {});
    let old = hash_tree(&dir);
    // A reader holding the old snapshot open keeps reading the old files.
    let old_reader = SnapshotReader::open(&dir).unwrap();

    let mut w = SnapshotWriter::create(&dir).unwrap();
    w.add_section("0", false, &sample_vcpu(5)).unwrap();
    let stats = w.commit(sample_input("new")).unwrap();
    assert!(stats.replaced_existing);
    assert_eq!(tmp.entries(), vec!["snap"], "old snapshot deleted");
    assert_ne!(hash_tree(&dir), old);
    let r = SnapshotReader::open(&dir).unwrap();
    assert_eq!(r.body().notes["note"], "new");
    assert_eq!(r.sections().len(), 1);
    assert!(r.verify(|_, _| {}).unwrap().is_ok());

    assert_eq!(
        old_reader
            .read_section::<VcpuState>("1")
            .unwrap()
            .unwrap()
            .1,
        sample_vcpu(1)
    );

    // An empty directory may be the target too.
    let empty = tmp.join("empty");
    fs::create_dir(&empty).unwrap();
    let w = SnapshotWriter::create(&empty).unwrap();
    assert!(
        w.commit(sample_input("into empty"))
            .unwrap()
            .replaced_existing
    );
    assert!(SnapshotReader::open(&empty).is_ok());
}

#[test]
fn refuses_to_replace_unrelated_directory() {
    let tmp = TempDir::new("refuse");
    let dir = tmp.join("data");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("precious.txt"), b"keep me").unwrap();
    let before = hash_tree(&dir);
    let e = SnapshotWriter::create(&dir).unwrap_err();
    assert!(matches!(e, Error::RefuseOverwrite { .. }));
    assert_eq!(
        e.to_string(),
        format!(
            "{} exists and is not a stasis snapshot; refusing to overwrite",
            dir.display()
        )
    );
    assert_eq!(hash_tree(&dir), before);

    // A plain file is refused too.
    let file = tmp.join("file");
    fs::write(&file, b"x").unwrap();
    assert!(matches!(
        SnapshotWriter::create(&file),
        Err(Error::RefuseOverwrite { .. })
    ));

    // Something unrelated appearing at the target while writing is refused
    // at commit, and left alone.
    let target = tmp.join("later");
    let w = SnapshotWriter::create(&target).unwrap();
    fs::create_dir(&target).unwrap();
    fs::write(target.join("other.txt"), b"other").unwrap();
    let e = w.commit(sample_input("")).unwrap_err();
    assert!(matches!(e, Error::RefuseOverwrite { .. }), "{e}");
    assert_eq!(fs::read(target.join("other.txt")).unwrap(), b"other");
    let mut entries = tmp.entries();
    entries.sort();
    assert_eq!(entries, vec!["data", "file", "later"], "temp dir removed");

    // The parent must exist.
    let e = SnapshotWriter::create(&tmp.join("no/such/dir")).unwrap_err();
    assert!(matches!(e, Error::NoParent { .. }), "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");
}

#[test]
fn stale_temp_dirs_are_removed_only_when_safe() {
    let tmp = TempDir::new("stale");
    let dir = tmp.join("snap");
    // A dead writer's leftovers (no process has pid 2147483647): one
    // unfinished (no manifest), two complete ones.
    let unfinished = tmp.join(".snap.tmp-2147483647-0");
    let complete_tmp = tmp.join(".snap.tmp-2147483647-1");
    let complete_old = tmp.join(".snap.old-2147483647-3");
    fs::create_dir(&unfinished).unwrap();
    fs::write(unfinished.join("state.bin"), b"partial").unwrap();
    write_sample(&complete_tmp, "new", |_| {});
    write_sample(&complete_old, "old", |_| {});
    // Without a snapshot at the target, complete leftovers may be the only
    // copies: only the unfinished one goes.
    assert_eq!(
        remove_stale_temp_dirs(&dir).unwrap(),
        vec![unfinished.clone()]
    );
    assert!(complete_tmp.exists() && complete_old.exists());

    write_sample(&dir, "x", |_| {});
    // A live writer's temp dir (ours) is kept.
    let live = SnapshotWriter::create(&dir).unwrap();
    let mut removed = remove_stale_temp_dirs(&dir).unwrap();
    removed.sort();
    assert_eq!(removed, vec![complete_old, complete_tmp]);
    assert!(live.temp_dir().exists());
    // Unrelated names are never touched.
    fs::create_dir(tmp.join(".snapshot-other.tmp-2147483647-0")).unwrap();
    fs::create_dir(tmp.join(".snap.tmp-notapid-0")).unwrap();
    assert!(remove_stale_temp_dirs(&dir).unwrap().is_empty());
    drop(live);
    let mut entries = tmp.entries();
    entries.sort();
    assert_eq!(
        entries,
        vec![
            ".snap.tmp-notapid-0",
            ".snapshot-other.tmp-2147483647-0",
            "snap"
        ]
    );
}

#[test]
fn missing_dir_hints_at_interrupted_replacement() {
    let tmp = TempDir::new("hint");
    let dir = tmp.join("snap");
    write_sample(&dir, "x", |_| {});
    // Simulate a crash in the fallback protocol after moving the old aside.
    let aside = tmp.join(".snap.old-2147483647-0");
    fs::rename(&dir, &aside).unwrap();
    let e = SnapshotReader::open(&dir).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("no such snapshot directory"), "{msg}");
    assert!(msg.contains(".snap.old-2147483647-0"), "{msg}");
    assert!(msg.contains("to recover"), "{msg}");
}

#[test]
fn section_names_are_checked() {
    let tmp = TempDir::new("names");
    let mut w = SnapshotWriter::create(&tmp.join("snap")).unwrap();
    assert!(w.add_raw_section("", "0", 1, false, b"{}").is_err());
    assert!(w.add_raw_section("bad name", "0", 1, false, b"{}").is_err());
    assert!(w
        .add_raw_section("ok", "bad\ninstance", 1, false, b"{}")
        .is_err());
    w.add_raw_section("kvm.pit2", "", 1, false, b"{}").unwrap();
    w.add_raw_section("kvm.pit2", "x", 1, false, b"").unwrap();
    w.commit(sample_input("")).unwrap();
    let r = SnapshotReader::open(&tmp.join("snap")).unwrap();
    assert_eq!(r.sections()[1].size, 0);
    assert_eq!(r.section_bytes(&r.sections()[1]).unwrap(), b"");
}

#[test]
fn many_regions_and_threads_agree() {
    // The same memory written with 1 and 2 threads gives identical files.
    let tmp = TempDir::new("threads");
    // Region a spans more than one 16 MiB work batch.
    let mut mem = vec![0u8; 21 << 20];
    for (i, p) in mem.chunks_mut(4096).enumerate() {
        if i % 3 == 0 || (i / 97) % 2 == 0 {
            p[i % 4096] = (i % 251) as u8 + 1;
        }
    }
    let regions = [
        MemoryRegionSource::new("a", 0, &mem[..18 << 20]),
        MemoryRegionSource::new("b", 1 << 32, &mem[18 << 20..(19 << 20) + 4096]),
        MemoryRegionSource::new("c", 1 << 40, &mem[(19 << 20) + 4096..]),
    ];
    let mut hashes = Vec::new();
    for threads in [1, 2] {
        let dir = tmp.join(&format!("t{threads}"));
        let mut w = SnapshotWriter::create(&dir).unwrap();
        w.set_threads(threads);
        let stats = w.write_memory(&regions).unwrap();
        assert_eq!(stats.guest_bytes, 21 << 20);
        w.commit(sample_input("")).unwrap();
        let r = SnapshotReader::open(&dir).unwrap();
        assert!(r.verify(|_, _| {}).unwrap().is_ok());
        for (src, reg) in regions.iter().zip(r.regions()) {
            let mut dst = vec![0u8; reg.size as usize];
            r.read_region_into(reg, &mut dst, true).unwrap();
            assert!(dst == src_bytes(&mem, src), "region {}", reg.name);
        }
        let mut h = hash_tree(&dir);
        h.remove("manifest.json");
        hashes.push((h, r.body().memory.clone()));
    }
    assert_eq!(hashes[0], hashes[1]);
}

fn src_bytes<'a>(mem: &'a [u8], src: &MemoryRegionSource<'_>) -> &'a [u8] {
    let start = match src.name() {
        "a" => 0,
        "b" => 18 << 20,
        _ => (19 << 20) + 4096,
    };
    &mem[start..start + src.len() as usize]
}

#[test]
fn section_state_trait_constants() {
    assert_eq!(VcpuState::NAME, "vcpu");
    assert_eq!(SerialState::VERSION, 2);
}

/// Entry point of the child process of `killed_writer_never_damages_snapshot`:
/// commits snapshots to `$STASIS_TEST_KILL_TARGET` in a loop until killed.
#[test]
#[ignore = "child process of killed_writer_never_damages_snapshot"]
fn child_writer_loop() {
    let Some(target) = std::env::var_os("STASIS_TEST_KILL_TARGET") else {
        return;
    };
    let target = std::path::PathBuf::from(target);
    let mut mem = vec![0u8; 4 << 20];
    for generation in 0u64.. {
        for (i, p) in mem.chunks_mut(4096).enumerate() {
            if i % 5 == 0 {
                p[..8].copy_from_slice(&(generation * 1000 + i as u64).to_le_bytes());
            }
        }
        let mut w = SnapshotWriter::create(&target).unwrap();
        w.add_section("0", false, &sample_vcpu(generation)).unwrap();
        w.write_memory(&[MemoryRegionSource::new("ram0", 0, &mem)])
            .unwrap();
        w.commit(sample_input(&generation.to_string())).unwrap();
    }
}

#[test]
fn killed_writer_never_damages_snapshot() {
    let tmp = TempDir::new("kill");
    let dir = tmp.join("snap");
    let exe = std::env::current_exe().unwrap();
    let mut last_generation = None;
    for round in 0..12u64 {
        let mut child = std::process::Command::new(&exe)
            .args(["--exact", "child_writer_loop", "--ignored", "--quiet"])
            .env("STASIS_TEST_KILL_TARGET", &dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill at varying points of the write/commit cycle.
        std::thread::sleep(std::time::Duration::from_millis(40 + round * 17 % 90));
        child.kill().unwrap();
        child.wait().unwrap();
        if !dir.exists() {
            assert!(last_generation.is_none(), "snapshot vanished");
            continue;
        }
        let r = SnapshotReader::open(&dir).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let report = r.verify(|_, _| {}).unwrap();
        assert!(report.is_ok(), "round {round}: {:?}", report.problems());
        let generation: u64 = r.body().notes["note"].parse().unwrap();
        let (_, vcpu) = r.read_section::<VcpuState>("0").unwrap().unwrap();
        assert_eq!(vcpu, sample_vcpu(generation), "sections match the manifest");
        last_generation = Some(generation);
    }
    assert!(last_generation.is_some(), "no snapshot was ever committed");
    // Killed writers leave temp dirs behind; they can all be cleaned up.
    remove_stale_temp_dirs(&dir).unwrap();
    assert_eq!(tmp.entries(), vec!["snap"]);
}
