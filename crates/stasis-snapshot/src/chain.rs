//! Chains of snapshots: a diff snapshot and its parents back to a full
//! one, opened and checked together, and the guest memory they describe
//! composed page by page.
//!
//! Each child names its parent by path, `snapshot_id` and the parent
//! manifest's body checksum; a parent that is missing, is another
//! snapshot, or changed since is refused by name, as is a parent with
//! another memory layout, a cycle, or a chain longer than
//! [`MAX_CHAIN_LEN`].

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::manifest::MemoryRegion;
use crate::page_map::{PageMap, PageSource};
use crate::reader::SnapshotReader;
use crate::PAGE_SIZE;

/// The longest chain opened (a guard against loops and runaway chains).
pub const MAX_CHAIN_LEN: usize = 256;

/// A snapshot and its ancestors, newest first; the last one is full.
#[derive(Debug)]
pub struct SnapshotChain {
    members: Vec<(SnapshotReader, Option<PageMap>)>,
}

fn parent_error(child: &Path, message: String) -> Error {
    Error::Parent {
        child: child.to_path_buf(),
        message,
    }
}

/// Where the parent named in `child`'s manifest is.
pub fn parent_path(child: &Path, recorded: &str) -> PathBuf {
    let p = Path::new(recorded);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::fs::canonicalize(child)
            .unwrap_or_else(|_| child.to_path_buf())
            .join(p)
    };
    if let Ok(c) = std::fs::canonicalize(&joined) {
        return c;
    }
    // Missing: still name it without `..` (lexically).
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Whether two snapshots lay out the same regions the same way (a diff
/// and its parent must).
pub(crate) fn same_layout(a: &[MemoryRegion], b: &[MemoryRegion]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name && x.gpa == y.gpa && x.size == y.size && x.file_offset == y.file_offset
        })
}

impl SnapshotChain {
    /// Opens the snapshot in `dir` and every parent, checking each link.
    pub fn open(dir: &Path) -> Result<SnapshotChain> {
        let newest = SnapshotReader::open(dir)?;
        let map = newest.page_map()?;
        let mut members = vec![(newest, map)];
        loop {
            let (child, _) = members.last().expect("not empty");
            let Some(link) = child.body().parent.clone() else {
                break;
            };
            let child_dir = child.dir().to_path_buf();
            if members.len() >= MAX_CHAIN_LEN {
                return Err(parent_error(
                    &child_dir,
                    format!("makes the chain longer than {MAX_CHAIN_LEN} snapshots"),
                ));
            }
            let path = parent_path(&child_dir, &link.path);
            let parent = SnapshotReader::open(&path).map_err(|e| {
                parent_error(
                    &child_dir,
                    format!("{} cannot be opened: {e}", path.display()),
                )
            })?;
            let pb = parent.body();
            if pb.snapshot_id.as_deref() != Some(link.snapshot_id.as_str()) {
                return Err(parent_error(
                    &child_dir,
                    format!(
                        "{} is another snapshot (id {}, the diff was taken against {})",
                        path.display(),
                        pb.snapshot_id.as_deref().unwrap_or("none"),
                        link.snapshot_id
                    ),
                ));
            }
            let crc = format!("{:08x}", parent.manifest().body_crc32c);
            if crc != link.body_crc32c {
                return Err(parent_error(
                    &child_dir,
                    format!(
                        "{} changed since the diff was taken (manifest checksum {crc}, expected {})",
                        path.display(),
                        link.body_crc32c
                    ),
                ));
            }
            if !same_layout(&pb.memory.regions, &child.body().memory.regions) {
                return Err(parent_error(
                    &child_dir,
                    format!("{} has another memory layout", path.display()),
                ));
            }
            if members
                .iter()
                .any(|(m, _)| m.body().snapshot_id == pb.snapshot_id)
            {
                return Err(parent_error(
                    &child_dir,
                    format!("{} is already in the chain (a loop)", path.display()),
                ));
            }
            let map = parent.page_map()?;
            members.push((parent, map));
        }
        Ok(SnapshotChain { members })
    }

    /// The snapshot the chain was opened at.
    pub fn newest(&self) -> &SnapshotReader {
        &self.members[0].0
    }

    /// The full snapshot at its root.
    pub fn base(&self) -> &SnapshotReader {
        &self.members.last().expect("not empty").0
    }

    /// Every snapshot of the chain, newest first.
    pub fn members(&self) -> impl Iterator<Item = &SnapshotReader> {
        self.members.iter().map(|(r, _)| r)
    }

    /// Number of snapshots in the chain.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the chain is a single full snapshot.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Every member with its page map (none for the base), newest first.
    pub(crate) fn layers(&self) -> &[(SnapshotReader, Option<PageMap>)] {
        &self.members
    }

    /// First page index of region `region` in the page maps.
    pub(crate) fn first_page(&self, region: usize) -> u64 {
        self.base().regions()[..region]
            .iter()
            .map(|r| r.size / PAGE_SIZE)
            .sum()
    }

    /// Applies the diffs (oldest first) to `buf`, which holds the base
    /// snapshot's bytes of region `region` from byte `offset` on: pages a
    /// diff stores are read from it, pages it marks zero are cleared.
    pub fn apply_diffs(&self, region: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let page = PAGE_SIZE as usize;
        if !offset.is_multiple_of(PAGE_SIZE) || !buf.len().is_multiple_of(page) {
            return Err(Error::Usage("apply_diffs needs whole pages".to_string()));
        }
        let first = self.first_page(region) + offset / PAGE_SIZE;
        let npages = buf.len() / page;
        for (reader, map) in self.members[..self.members.len() - 1].iter().rev() {
            let map = map.as_ref().expect("every member but the base has a map");
            let r = &reader.regions()[region];
            let mut i = 0;
            while i < npages {
                match map.get(first + i as u64) {
                    PageSource::Parent => i += 1,
                    PageSource::Zero => {
                        // Only where not zero already: fresh memory and a
                        // private mapping stay untouched (unallocated).
                        let p = &mut buf[i * page..(i + 1) * page];
                        if !crate::crc::is_zero(p) {
                            p.fill(0);
                        }
                        i += 1;
                    }
                    PageSource::Here => {
                        let mut j = i + 1;
                        while j < npages && map.get(first + j as u64) == PageSource::Here {
                            j += 1;
                        }
                        let at = r.file_offset + offset + (i * page) as u64;
                        reader
                            .memory_file()
                            .read_exact_at(&mut buf[i * page..j * page], at)
                            .map_err(|e| Error::Io {
                                context: format!(
                                    "reading {} at offset {at:#x}",
                                    reader.memory_file_path().display()
                                ),
                                source: e,
                            })?;
                        i = j;
                    }
                }
            }
        }
        Ok(())
    }

    /// The guest's bytes of region `region` from byte `offset` on, as the
    /// newest snapshot describes them, into `buf` (whole pages).
    pub fn read_range(&self, region: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let base = self.base();
        let r = &base.regions()[region];
        let at = r.file_offset + offset;
        base.memory_file()
            .read_exact_at(buf, at)
            .map_err(|e| Error::Io {
                context: format!(
                    "reading {} at offset {at:#x}",
                    base.memory_file_path().display()
                ),
                source: e,
            })?;
        self.apply_diffs(region, offset, buf)
    }

    /// Reads region `region` whole into `dst` (eager restore): the base's
    /// bytes (holes skipped where `dst_is_zeroed`), then the diffs.
    pub fn read_region_into(
        &self,
        region: usize,
        dst: &mut [u8],
        dst_is_zeroed: bool,
    ) -> Result<u64> {
        let base = self.base();
        let read = base.read_region_into(&base.regions()[region], dst, dst_is_zeroed)?;
        self.apply_diffs(region, 0, dst)?;
        Ok(read)
    }

    /// Total allocated bytes of the members' memory files.
    pub fn memory_allocated_bytes(&self) -> Result<u64> {
        self.members().map(|m| m.memory_allocated_bytes()).sum()
    }
}
