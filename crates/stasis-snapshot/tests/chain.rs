//! Diff snapshots and chains at the format level: what a diff stores, the
//! memory a chain composes, merging, and parents that are missing,
//! replaced or changed.

mod common;

use std::path::Path;

use common::*;
use stasis_snapshot::{
    encode_manifest, merge_chain, ManifestBody, PageSource, SnapshotChain, SnapshotReader,
};

const PAGES: usize = 2048;

fn base_memory() -> Vec<u8> {
    let mut m = vec![0u8; PAGES * 4096];
    for (i, page) in m.chunks_mut(4096).enumerate() {
        if i % 4 != 0 {
            page.fill((i % 250 + 1) as u8);
        }
    }
    m
}

fn write(dir: &Path, mem: &[u8], parent: Option<(&Path, &str)>) {
    write_member(dir, mem, 0, parent);
}

fn composed(dir: &Path) -> Vec<u8> {
    let chain = SnapshotChain::open(dir).unwrap();
    let mut out = vec![0u8; PAGES * 4096];
    chain.read_region_into(0, &mut out, true).unwrap();
    out
}

#[test]
fn a_chain_stores_only_changed_pages_and_composes_exactly() {
    let t = TempDir::new("chain");
    let (a, b, c) = (t.join("a"), t.join("b"), t.join("c"));
    let mut mem = base_memory();
    write(&a, &mem, None);
    // b: 10 pages rewritten, a non-zero page zeroed, a zero page filled.
    for i in 10..20 {
        mem[i * 4096..(i + 1) * 4096].fill(0xEE);
    }
    mem[5 * 4096..6 * 4096].fill(0);
    mem[8 * 4096..9 * 4096].fill(0x77);
    let mem_b = mem.clone();
    write(&b, &mem, Some((&a, "../a")));
    let rb = SnapshotReader::open(&b).unwrap();
    assert_eq!(rb.manifest().format_version, 2);
    let map = rb.page_map().unwrap().unwrap();
    let here: Vec<u64> = (0..PAGES as u64)
        .filter(|&p| map.get(p) == PageSource::Here)
        .collect();
    assert_eq!(here, [8].into_iter().chain(10..20).collect::<Vec<u64>>());
    assert_eq!(map.get(5), PageSource::Zero);
    assert_eq!(map.get(4), PageSource::Zero);
    assert_eq!(map.get(1), PageSource::Parent);
    assert!(
        rb.memory_allocated_bytes().unwrap() <= 64 << 10,
        "a diff of 11 pages allocated {} bytes",
        rb.memory_allocated_bytes().unwrap()
    );
    assert!(rb.verify(|_, _| {}).unwrap().is_ok());
    assert_eq!(composed(&b), mem_b);

    // c on b (a chain of three), one more page.
    mem[100 * 4096..101 * 4096].fill(0x42);
    write(&c, &mem, Some((&b, "../b")));
    let chain = SnapshotChain::open(&c).unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain.base().dir(), std::fs::canonicalize(&a).unwrap());
    assert_eq!(composed(&c), mem);
    // The parent of a diff is still itself: b composes as before.
    assert_eq!(composed(&b), mem_b);

    // Merged, c is a full snapshot of the same memory.
    merge_chain(&c).unwrap();
    let merged = SnapshotReader::open(&c).unwrap();
    assert_eq!(merged.body().parent, None);
    assert_eq!(merged.manifest().format_version, 1);
    assert_eq!(SnapshotChain::open(&c).unwrap().len(), 1);
    assert_eq!(composed(&c), mem);
    assert!(merged.body().notes["merged_from"].split(' ').count() == 3);
    assert!(
        merge_chain(&c).is_err(),
        "a full snapshot has nothing to merge"
    );
}

#[test]
fn missing_replaced_or_changed_parents_are_refused_by_name() {
    let t = TempDir::new("chain-bad");
    let (a, b) = (t.join("a"), t.join("b"));
    let mem = base_memory();
    write(&a, &mem, None);
    let mut mem2 = mem.clone();
    mem2[0..4096].fill(9);
    write(&b, &mem2, Some((&a, "../a")));
    let err = |dir: &Path| SnapshotChain::open(dir).unwrap_err().to_string();

    // Changed: a's manifest rewritten (sealed correctly, a note added).
    let text = std::fs::read_to_string(a.join("manifest.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut body: ManifestBody = serde_json::from_str(&v["body"].to_string()).unwrap();
    body.notes.insert("edited".into(), "yes".into());
    std::fs::write(a.join("manifest.json"), encode_manifest(&body).unwrap()).unwrap();
    let e = err(&b);
    assert!(
        e.contains("changed since the diff was taken") && e.contains("/a"),
        "{e}"
    );
    std::fs::write(a.join("manifest.json"), text).unwrap();
    assert!(SnapshotChain::open(&b).is_ok());

    // Replaced: another snapshot at a's path.
    let moved = t.join("a-old");
    std::fs::rename(&a, &moved).unwrap();
    let e = err(&b);
    assert!(e.contains("cannot be opened") && e.contains("/a"), "{e}");
    write(&a, &mem, None);
    let e = err(&b);
    assert!(e.contains("is another snapshot"), "{e}");
    std::fs::remove_dir_all(&a).unwrap();
    std::fs::rename(&moved, &a).unwrap();
    assert_eq!(composed(&b), mem2);
}
