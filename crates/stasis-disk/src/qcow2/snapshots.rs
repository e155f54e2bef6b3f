//! qcow2 internal snapshots (qcow2.txt, "Snapshots"): the snapshot table,
//! and taking, applying and deleting a snapshot the way QEMU's `savevm`,
//! `loadvm` and `qemu-img snapshot -c/-a/-d` do, so each tool reads the
//! other's snapshots.
//!
//! Each operation runs with the image's dirty bit set (see [`super::image`])
//! and makes its change live with one header write:
//!
//! - **take**: every cluster of the active tree gets one more reference
//!   (so the guest's next write to it copies it), a copy of the active L1
//!   table and a new snapshot table are written to new clusters, and the
//!   header's `nb_snapshots`/`snapshots_offset` switch to the new table;
//! - **apply**: the snapshot's tree gets one more reference, a copy of its
//!   L1 table is written to new clusters, and the header's `size`,
//!   `l1_size` and `l1_table_offset` switch to it; the old active tree
//!   then loses its reference;
//! - **delete**: a snapshot table without the entry is committed, then the
//!   snapshot's tree loses its reference (clusters that reach zero are
//!   free for reuse).
//!
//! A SIGKILL at any point leaves either the old or the new header, and at
//! worst refcounts that are too high (leaks) with the dirty bit set;
//! opening the image writable repairs them. One window cannot be closed
//! in qcow2 (QEMU's `savevm` has it too): between a cluster's refcount
//! change and the COPIED flag of the active entry that points at it (two
//! writes), `qemu-img check` reports the flag as an error. Both states are
//! safe (the flag only decides whether a write copies the cluster first,
//! and the snapshot that would share it is not committed yet), the dirty
//! bit is set, and the next writable open repairs the flags with the
//! refcounts.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{SystemTime, UNIX_EPOCH};

use super::image::{field, invalid, Qcow2Image, OFFSET_MASK};

/// The longest snapshot table accepted (QEMU's limit).
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// The most snapshots an image may have (QEMU's limit).
const MAX_SNAPSHOTS: usize = 65536;
/// The longest extra data accepted per entry.
const MAX_EXTRA: u32 = 1024;

/// One entry of the snapshot table, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// The snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Its entries.
    pub l1_size: u32,
    /// Unique id (QEMU uses decimal numbers).
    pub id: String,
    /// Name (what `qemu-img snapshot -l` shows as TAG).
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// The guest clock at the snapshot (QEMU's savevm; 0 here).
    pub vm_clock_nsec: u64,
    /// VM state saved in the image (0: stasis keeps VM state beside it).
    pub vm_state_size: u32,
    /// Extra data, kept byte for byte (v3: at least the large VM state
    /// size and the disk size).
    pub extra: Vec<u8>,
    /// The id and the name as stored (`id` and `name` are their text,
    /// which may differ for bytes that are not UTF-8): written back as
    /// they were.
    raw_id_name: (Vec<u8>, Vec<u8>),
}

impl SnapshotEntry {
    /// The virtual disk size at the snapshot, where recorded.
    pub fn disk_size(&self) -> Option<u64> {
        (self.extra.len() >= 16)
            .then(|| u64::from_be_bytes(self.extra[8..16].try_into().expect("8 bytes")))
    }

    /// The VM state size (large field if present).
    pub fn vm_state_size(&self) -> u64 {
        if self.extra.len() >= 8 {
            u64::from_be_bytes(self.extra[0..8].try_into().expect("8 bytes"))
        } else {
            u64::from(self.vm_state_size)
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        let (id, name) = &self.raw_id_name;
        out.extend_from_slice(&(id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(id);
        out.extend_from_slice(name);
        while !(out.len() - start).is_multiple_of(8) {
            out.push(0);
        }
    }
}

/// Reads the snapshot table.
pub fn read_table(img: &Qcow2Image) -> io::Result<Vec<SnapshotEntry>> {
    Ok(read_table_len(img)?.0)
}

/// Reads the snapshot table; also its length in bytes as stored.
fn read_table_len(img: &Qcow2Image) -> io::Result<(Vec<SnapshotEntry>, u64)> {
    let mut at = img.header.snapshots_offset;
    let start = at;
    let mut out = Vec::with_capacity(img.header.nb_snapshots.min(1024) as usize);
    for i in 0..img.header.nb_snapshots {
        if at - start > MAX_TABLE_BYTES {
            return Err(invalid("qcow2 snapshot table is larger than 64 MiB"));
        }
        let mut h = [0u8; 40];
        img.file
            .read_exact_at(&mut h, at)
            .map_err(|e| invalid(format!("qcow2 snapshot table entry {i} at {at:#x}: {e}")))?;
        let u16_at = |o: usize| u16::from_be_bytes(h[o..o + 2].try_into().expect("2 bytes"));
        let u32_at = |o: usize| u32::from_be_bytes(h[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_be_bytes(h[o..o + 8].try_into().expect("8 bytes"));
        let extra_len = u32_at(36);
        if extra_len > MAX_EXTRA {
            return Err(invalid(format!(
                "qcow2 snapshot {i} has {extra_len} bytes of extra data"
            )));
        }
        let (id_len, name_len) = (u16_at(12) as usize, u16_at(14) as usize);
        let mut rest = vec![0u8; extra_len as usize + id_len + name_len];
        img.file.read_exact_at(&mut rest, at + 40)?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let e = SnapshotEntry {
            l1_table_offset: u64_at(0),
            l1_size: u32_at(8),
            date_sec: u32_at(16),
            date_nsec: u32_at(20),
            vm_clock_nsec: u64_at(24),
            vm_state_size: u32_at(32),
            extra: rest[..extra_len as usize].to_vec(),
            id: text(&rest[extra_len as usize..extra_len as usize + id_len]),
            name: text(&rest[extra_len as usize + id_len..]),
            raw_id_name: (
                rest[extra_len as usize..extra_len as usize + id_len].to_vec(),
                rest[extra_len as usize + id_len..].to_vec(),
            ),
        };
        if !e.l1_table_offset.is_multiple_of(img.cluster_size())
            || u64::from(e.l1_size) * 8 > 32 << 20
        {
            return Err(invalid(format!(
                "qcow2 snapshot '{}' has an invalid L1 table ({:#x}, {} entries)",
                e.name, e.l1_table_offset, e.l1_size
            )));
        }
        at += (40 + rest.len() as u64).next_multiple_of(8);
        out.push(e);
    }
    Ok((out, at - start))
}

fn encode_table(entries: &[SnapshotEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        e.encode(&mut out);
    }
    out
}

/// The snapshot table's (offset, bytes) and every snapshot's L1 table
/// (offset, entries).
pub type TableExtent = ((u64, u64), Vec<(u64, u32)>);

/// The snapshot table's extent (offset, bytes) and every snapshot's L1
/// table (offset, entries): what a refcount rebuild must count.
pub fn table_extent(img: &Qcow2Image) -> io::Result<TableExtent> {
    let (entries, len) = read_table_len(img)?;
    let l1s = entries
        .iter()
        .map(|e| (e.l1_table_offset, e.l1_size))
        .collect();
    Ok(((img.header.snapshots_offset, len), l1s))
}

/// +`delta` for every L2 table and data cluster reachable from the L1
/// table (`off`, `size`) (the L1 table itself is not included).
fn tree_deltas(
    img: &Qcow2Image,
    off: u64,
    size: u32,
    delta: i64,
    deltas: &mut HashMap<u64, i64>,
) -> io::Result<()> {
    let cb = img.header.cluster_bits;
    for e in img.read_l1(off, size)? {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        *deltas.entry(l2 >> cb).or_default() += delta;
        for entry in img.read_l2(l2)? {
            if let Some((first, n)) = img.l2_entry_clusters(entry) {
                for c in first..first + n {
                    *deltas.entry(c).or_default() += delta;
                }
            }
        }
    }
    Ok(())
}

/// Writes a copy of an L1 table to new clusters, COPIED flags cleared
/// (every table it points at is now shared); returns its offset (0 for an
/// empty table).
fn copy_l1(img: &mut Qcow2Image, entries: &[u64]) -> io::Result<u64> {
    if entries.is_empty() {
        return Ok(0);
    }
    let off = img.allocate(entries.len() as u64 * 8)?;
    let cleared: Vec<u64> = entries.iter().map(|e| e & OFFSET_MASK).collect();
    img.write_u64s(off, &cleared)?;
    Ok(off)
}

/// Writes `entries` as the new snapshot table and commits it in the
/// header; frees the old table.
fn commit_table(img: &mut Qcow2Image, entries: &[SnapshotEntry]) -> io::Result<()> {
    let old = (img.header.snapshots_offset, table_extent(img)?.0 .1);
    let bytes = encode_table(entries);
    let off = if bytes.is_empty() {
        0
    } else {
        let off = img.allocate(bytes.len() as u64)?;
        img.write_at(off, &bytes)?;
        off
    };
    img.sync()?;
    stasis_failpoint::hit("qcow2.before_commit");
    let mut h = Vec::with_capacity(12);
    h.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    h.extend_from_slice(&off.to_be_bytes());
    img.write_at(field::NB_SNAPSHOTS, &h)?;
    img.sync()?;
    img.header.nb_snapshots = entries.len() as u32;
    img.header.snapshots_offset = off;
    img.free(old.0, old.1)
}

/// What [`list`] says of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Seconds since the epoch.
    pub date_sec: u64,
    /// Virtual disk size at the snapshot.
    pub disk_size: u64,
    /// VM state stored in the image (QEMU savevm), bytes.
    pub vm_state_size: u64,
}

/// The image's internal snapshots, in table order.
pub fn list(img: &Qcow2Image) -> io::Result<Vec<SnapshotInfo>> {
    Ok(read_table(img)?
        .into_iter()
        .map(|e| SnapshotInfo {
            disk_size: e.disk_size().unwrap_or(img.header.size),
            vm_state_size: e.vm_state_size(),
            date_sec: u64::from(e.date_sec),
            id: e.id,
            name: e.name,
        })
        .collect())
}

/// Takes an internal snapshot `name` of the active state.
pub fn take(img: &mut Qcow2Image, name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() > 1024 {
        return Err(invalid("a snapshot name must have 1 to 1024 bytes"));
    }
    let mut entries = read_table(img)?;
    if entries.iter().any(|e| e.name == name) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("the image already has a snapshot named '{name}'"),
        ));
    }
    if entries.len() >= MAX_SNAPSHOTS {
        return Err(invalid(format!(
            "the image has {} internal snapshots, the most qcow2 allows",
            entries.len()
        )));
    }
    let id = entries
        .iter()
        .filter_map(|e| e.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    img.set_dirty(true)?;
    let (l1_off, l1_size) = (img.header.l1_table_offset, img.header.l1_size);
    let mut deltas = HashMap::new();
    tree_deltas(img, l1_off, l1_size, 1, &mut deltas)?;
    img.apply_refcount_deltas(&deltas)?;
    stasis_failpoint::hit("qcow2.snapshot_refcounts");
    // Shared now: the active tables lose their COPIED flags, so the next
    // guest write to any of their clusters copies it first.
    img.fix_copied_flags()?;
    let l1 = img.read_l1(l1_off, l1_size)?;
    let copy = copy_l1(img, &l1)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut extra = Vec::with_capacity(16);
    extra.extend_from_slice(&0u64.to_be_bytes());
    extra.extend_from_slice(&img.header.size.to_be_bytes());
    entries.push(SnapshotEntry {
        l1_table_offset: copy,
        l1_size,
        id: id.to_string(),
        name: name.to_string(),
        date_sec: now.as_secs() as u32,
        date_nsec: now.subsec_nanos(),
        vm_clock_nsec: 0,
        vm_state_size: 0,
        extra,
        raw_id_name: (id.to_string().into_bytes(), name.as_bytes().to_vec()),
    });
    commit_table(img, &entries)?;
    img.set_dirty(false)
}

fn find<'a>(entries: &'a [SnapshotEntry], name: &str) -> io::Result<&'a SnapshotEntry> {
    entries.iter().find(|e| e.name == name).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("the image has no snapshot named '{name}'"),
        )
    })
}

/// Makes the snapshot `name` the active state; the previous
/// active state is discarded, every snapshot stays.
pub fn apply(img: &mut Qcow2Image, name: &str) -> io::Result<()> {
    let entries = read_table(img)?;
    let sn = find(&entries, name)?.clone();
    if sn.vm_state_size() != 0 {
        tracing::info!(
            "snapshot '{}' also holds QEMU VM state, which stasis does not load (disk only)",
            sn.name
        );
    }
    img.set_dirty(true)?;
    let mut up = HashMap::new();
    tree_deltas(img, sn.l1_table_offset, sn.l1_size, 1, &mut up)?;
    img.apply_refcount_deltas(&up)?;
    let l1 = img.read_l1(sn.l1_table_offset, sn.l1_size)?;
    let new_l1 = copy_l1(img, &l1)?;
    img.sync()?;
    stasis_failpoint::hit("qcow2.before_commit");
    let (old_off, old_size) = (img.header.l1_table_offset, img.header.l1_size);
    let size = sn.disk_size().unwrap_or(img.header.size);
    let mut h = Vec::with_capacity(24);
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes());
    h.extend_from_slice(&sn.l1_size.to_be_bytes());
    h.extend_from_slice(&new_l1.to_be_bytes());
    img.write_at(field::SIZE, &h)?;
    img.sync()?;
    img.header.size = size;
    img.header.l1_size = sn.l1_size;
    img.header.l1_table_offset = new_l1;
    debug_assert_eq!(field::SIZE + 12, field::L1_SIZE);
    let mut down = HashMap::new();
    tree_deltas(img, old_off, old_size, -1, &mut down)?;
    img.apply_refcount_deltas(&down)?;
    img.free(old_off, u64::from(old_size) * 8)?;
    img.fix_copied_flags()?;
    img.set_dirty(false)
}

/// Deletes the snapshot `name`, freeing what only it used.
pub fn delete(img: &mut Qcow2Image, name: &str) -> io::Result<()> {
    let mut entries = read_table(img)?;
    let sn = find(&entries, name)?.clone();
    img.set_dirty(true)?;
    entries.retain(|e| e.id != sn.id);
    commit_table(img, &entries)?;
    stasis_failpoint::hit("qcow2.delete_refcounts");
    let mut down = HashMap::new();
    tree_deltas(img, sn.l1_table_offset, sn.l1_size, -1, &mut down)?;
    img.apply_refcount_deltas(&down)?;
    img.free(sn.l1_table_offset, u64::from(sn.l1_size) * 8)?;
    img.fix_copied_flags()?;
    img.set_dirty(false)
}
