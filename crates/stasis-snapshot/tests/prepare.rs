//! `prepare_memory` (creating and caching the image before the guest
//! pauses) changes nothing in what is written.

mod common;

use common::{sample_input, TempDir};
use stasis_snapshot::{Error, ManifestInput, MemoryRegionSource, SnapshotReader, SnapshotWriter};

fn guest_ram() -> Vec<u8> {
    let mut ram = vec![0u8; 64 * 4096];
    for page in [1usize, 2, 17, 40] {
        ram[page * 4096..(page + 1) * 4096].fill(page as u8);
    }
    ram
}

fn input() -> ManifestInput {
    sample_input("prepare")
}

#[test]
fn prepared_and_unprepared_images_are_identical() {
    let tmp = TempDir::new("prepare");
    let ram = guest_ram();
    let mut images = Vec::new();
    for (name, prepare) in [("plain", false), ("prepared", true)] {
        let dir = tmp.path().join(name);
        let regions = [MemoryRegionSource::new("ram0", 0, &ram)];
        let mut w = SnapshotWriter::create(&dir).unwrap();
        if prepare {
            w.prepare_memory(&regions).unwrap();
        }
        w.write_memory(&regions).unwrap();
        w.commit(input()).unwrap();
        let r = SnapshotReader::open(&dir).unwrap();
        assert!(r.verify(|_, _| {}).unwrap().is_ok());
        images.push((
            std::fs::read(dir.join("memory.img")).unwrap(),
            r.body().memory.chunk_crc32c.clone(),
        ));
    }
    assert_eq!(images[0], images[1]);
}

#[test]
fn write_memory_must_match_what_was_prepared() {
    let tmp = TempDir::new("prepare-mismatch");
    let ram = guest_ram();
    let mut w = SnapshotWriter::create(&tmp.path().join("s")).unwrap();
    w.prepare_memory(&[MemoryRegionSource::new("ram0", 0, &ram)])
        .unwrap();
    let e = w
        .write_memory(&[MemoryRegionSource::new("ram0", 0, &ram[..32 * 4096])])
        .unwrap_err();
    assert!(matches!(e, Error::Usage(_)), "{e}");
    assert!(e.to_string().contains("prepare_memory"), "{e}");
}
