//! Flattening a chain of diff snapshots into one full snapshot.

use std::path::Path;

use crate::chain::SnapshotChain;
use crate::error::{Error, Result};
use crate::memory_image::MemoryRegionSource;
use crate::writer::{CommitStats, ManifestInput, SnapshotWriter};
use crate::{MANIFEST_FILE, PAGE_MAP_FILE};

/// Replaces the diff snapshot in `dir` by a full snapshot of the same
/// guest: its sections, the memory the whole chain describes, and any
/// other files it holds (disk clones, hard-linked). Every member is
/// verified first. Like every write, the replacement is atomic: a merge
/// that fails half way leaves `dir` as it was. Diffs taken against `dir`
/// itself are refused afterwards (its manifest changes); other snapshots
/// of the chain are untouched.
pub fn merge_chain(dir: &Path) -> Result<CommitStats> {
    let chain = SnapshotChain::open(dir)?;
    if chain.len() == 1 {
        return Err(Error::Usage(format!(
            "{} is already a full snapshot (it has no parent)",
            dir.display()
        )));
    }
    for m in chain.members() {
        m.verify(|_, _| {})?.into_result()?;
    }
    let newest = chain.newest();
    let body = newest.body().clone();
    let mut w = SnapshotWriter::create(dir)?;
    for e in newest.sections() {
        let bytes = newest.section_bytes(e)?;
        w.add_raw_section(&e.name, &e.instance, e.version, e.optional, &bytes)?;
    }
    // Each region composed in memory that stays unallocated where zero.
    let mut memory: Vec<Vec<u8>> = Vec::new();
    for (i, r) in newest.regions().iter().enumerate() {
        let mut buf = vec![0u8; r.size as usize];
        chain.read_region_into(i, &mut buf, true)?;
        memory.push(buf);
    }
    let sources: Vec<MemoryRegionSource<'_>> = newest
        .regions()
        .iter()
        .zip(&memory)
        .map(|(r, buf)| MemoryRegionSource::new(&r.name, r.gpa, buf))
        .collect();
    w.write_memory(&sources)?;
    drop(sources);
    drop(memory);
    // Other files (disk clones) go along.
    let own = [
        MANIFEST_FILE,
        body.state_file.as_str(),
        body.memory.file.as_str(),
        PAGE_MAP_FILE,
    ];
    let entries = std::fs::read_dir(dir)
        .map_err(crate::error::io_ctx(format!("listing {}", dir.display())))?;
    for e in entries {
        let e = e.map_err(crate::error::io_ctx(format!("listing {}", dir.display())))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if own.contains(&name) || name.starts_with('.') || !e.path().is_file() {
            continue;
        }
        w.link_file(name, &e.path())?;
    }
    let mut notes = body.notes.clone();
    let ids: Vec<String> = chain
        .members()
        .map(|m| m.body().snapshot_id.clone().unwrap_or_default())
        .collect();
    notes.insert("merged_from".to_string(), ids.join(" "));
    w.commit(ManifestInput {
        created_unix_ms: Some(body.created_unix_ms),
        vm_config: body.vm_config,
        cpu: body.cpu,
        notes,
    })
}
