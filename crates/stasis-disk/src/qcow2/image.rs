//! Direct access to a qcow2 image's metadata: the header, L1 and L2
//! tables, refcounts, cluster allocation and a refcount rebuild.
//!
//! Written here because no crate offers it: imago (the data path) keeps
//! its metadata private and has no internal snapshots. Everything follows
//! QEMU's `docs/interop/qcow2.txt`. This layer is used only while nothing
//! else has the image open (the device's imago instance is closed around
//! it), on a paused guest's disk or a stopped VM's.
//!
//! Supported: versions 2 and 3, any cluster size, any refcount width,
//! compressed clusters (counted, never written). Refused with a clear
//! error: encryption, external data files, extended L2 entries, and
//! incompatible feature bits this code does not know.
//!
//! Crash safety rests on two rules. New metadata always goes into freshly
//! allocated clusters and becomes live by one header write (the commit).
//! Operations that must change refcounts of clusters in use first set the
//! header's dirty bit (incompatible feature bit 0): the specification
//! says an image with that bit set may have inconsistent refcounts and
//! must be repaired before use, which [`Qcow2Image::open`] does (as QEMU
//! does when it opens such an image for writing).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Incompatible feature: dirty (refcounts may be inconsistent).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: compression type field.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// L1/L2 entry flag: refcount is exactly one.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry flag: compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (v3): reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits of L1 entries, standard L2 entries and reftable
/// entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// The header fields this code reads or writes.
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Backing file name's offset and length in the header cluster.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible features (v3).
    pub incompatible_features: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Header length (v3; 72 for v2).
    pub header_length: u32,
}

/// Byte offsets of header fields.
pub mod field {
    /// `size` (u64), followed by crypt_method, l1_size, l1_table_offset.
    pub const SIZE: u64 = 24;
    /// `l1_size` (u32).
    pub const L1_SIZE: u64 = 36;
    /// `nb_snapshots` (u32), followed by `snapshots_offset` (u64).
    pub const NB_SNAPSHOTS: u64 = 60;
    /// `incompatible_features` (u64, v3).
    pub const INCOMPATIBLE: u64 = 72;
    /// `autoclear_features` (u64, v3).
    pub const AUTOCLEAR: u64 = 88;
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// An error naming the image and what is wrong with it.
pub fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl Header {
    /// Parses the header at the start of `f`.
    pub fn read(f: &File) -> io::Result<Header> {
        let mut b = [0u8; 104];
        let n = f.read_at(&mut b, 0)?;
        if n < 72 || be32(&b, 0) != MAGIC {
            return Err(invalid("not a qcow2 image (no QFI\\xfb magic)"));
        }
        let version = be32(&b, 4);
        if version != 2 && version != 3 {
            return Err(invalid(format!(
                "qcow2 version {version} is not supported (2 or 3)"
            )));
        }
        if version == 3 && n < 104 {
            return Err(invalid("qcow2 v3 header is truncated"));
        }
        let cluster_bits = be32(&b, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(format!(
                "qcow2 cluster_bits {cluster_bits} out of range 9..=21"
            )));
        }
        if be32(&b, 32) != 0 {
            return Err(invalid("encrypted qcow2 images are not supported"));
        }
        let (incompatible_features, refcount_order, header_length) = if version == 3 {
            (be64(&b, 72), be32(&b, 96), be32(&b, 100))
        } else {
            (0, 4, 72)
        };
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
        if incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(invalid(
                "qcow2 images with an external data file are not supported",
            ));
        }
        if incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(invalid(
                "qcow2 images with extended L2 entries are not supported",
            ));
        }
        if incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Err(invalid(
                "the qcow2 image is marked corrupt (run `qemu-img check -r all` on it)",
            ));
        }
        if incompatible_features & !known != 0 {
            return Err(invalid(format!(
                "qcow2 incompatible features {:#x} are not supported",
                incompatible_features & !known
            )));
        }
        if refcount_order > 6 {
            return Err(invalid(format!(
                "qcow2 refcount_order {refcount_order} > 6"
            )));
        }
        let h = Header {
            version,
            backing_file_offset: be64(&b, 8),
            backing_file_size: be32(&b, 16),
            cluster_bits,
            size: be64(&b, 24),
            l1_size: be32(&b, 36),
            l1_table_offset: be64(&b, 40),
            refcount_table_offset: be64(&b, 48),
            refcount_table_clusters: be32(&b, 56),
            nb_snapshots: be32(&b, 60),
            snapshots_offset: be64(&b, 64),
            incompatible_features,
            refcount_order,
            header_length,
        };
        let cs = h.cluster_size();
        for (name, off) in [
            ("L1 table", h.l1_table_offset),
            ("refcount table", h.refcount_table_offset),
            ("snapshot table", h.snapshots_offset),
        ] {
            if !off.is_multiple_of(cs) {
                return Err(invalid(format!(
                    "qcow2 {name} offset {off:#x} is not cluster-aligned"
                )));
            }
        }
        // Bounds against hostile headers: QEMU's own limits.
        if u64::from(h.l1_size) * 8 > 32 << 20 {
            return Err(invalid(format!(
                "qcow2 L1 table of {} entries is too large",
                h.l1_size
            )));
        }
        if u64::from(h.refcount_table_clusters) * cs > 8 << 20 {
            return Err(invalid("qcow2 refcount table is too large"));
        }
        if h.nb_snapshots > 65536 {
            return Err(invalid(format!(
                "qcow2 image claims {} snapshots",
                h.nb_snapshots
            )));
        }
        Ok(h)
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }
}

/// One qcow2 image opened for metadata work.
#[derive(Debug)]
pub struct Qcow2Image {
    /// The image file.
    pub file: File,
    /// Its header (kept current by the methods that change it).
    pub header: Header,
    reftable: Vec<u64>,
    writable: bool,
}

impl Qcow2Image {
    /// Opens `file` (which must be writable if `writable`); an image left
    /// dirty by an interrupted operation is repaired first when writable,
    /// refused when not.
    pub fn open(file: File, writable: bool) -> io::Result<Self> {
        let header = Header::read(&file)?;
        let mut img = Qcow2Image {
            file,
            header,
            reftable: Vec::new(),
            writable,
        };
        img.load_reftable()?;
        if writable && img.header.version >= 3 {
            // qcow2.txt: a writer that does not keep the autoclear
            // extensions (dirty bitmaps among them) up to date clears
            // their bits before it changes the image, so readers know
            // they are stale.
            let mut b = [0u8; 8];
            img.file.read_exact_at(&mut b, field::AUTOCLEAR)?;
            if b != [0; 8] {
                img.file.write_all_at(&[0; 8], field::AUTOCLEAR)?;
                img.sync()?;
            }
        }
        if img.header.incompatible_features & INCOMPAT_DIRTY != 0 {
            if !writable {
                return Err(invalid(
                    "the qcow2 image is marked dirty by an interrupted operation; open it writable to repair it",
                ));
            }
            let fixed = img.rebuild_refcounts()?;
            tracing::warn!(
                "qcow2 image was left dirty by an interrupted operation: repaired {fixed} refcounts"
            );
            img.set_dirty(false)?;
        }
        Ok(img)
    }

    fn load_reftable(&mut self) -> io::Result<()> {
        let len = u64::from(self.header.refcount_table_clusters) * self.header.cluster_size();
        self.reftable = self.read_u64s(self.header.refcount_table_offset, (len / 8) as usize)?;
        // Every refcount block inside the file and used once: work on the
        // refcounts is then bounded by the file's size, whatever a hostile
        // table claims.
        let file_len = self.file.metadata()?.len();
        let mut seen = std::collections::HashSet::new();
        for (i, e) in self.reftable.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(self.header.cluster_size())
                || off >= file_len
                || !seen.insert(off)
            {
                return Err(invalid(format!(
                    "qcow2 refcount table entry {i} ({off:#x}) is unaligned, past the end of the file or used twice"
                )));
            }
        }
        Ok(())
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Reads `n` big-endian u64s at `off`.
    pub fn read_u64s(&self, off: u64, n: usize) -> io::Result<Vec<u64>> {
        let mut b = vec![0u8; n * 8];
        self.file.read_exact_at(&mut b, off).map_err(|e| {
            io::Error::new(e.kind(), format!("reading qcow2 metadata at {off:#x}: {e}"))
        })?;
        Ok(b.chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// Writes big-endian u64s at `off`.
    pub fn write_u64s(&self, off: u64, v: &[u64]) -> io::Result<()> {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_be_bytes()).collect();
        self.write_at(off, &b)
    }

    /// Writes raw bytes at `off`.
    pub fn write_at(&self, off: u64, b: &[u8]) -> io::Result<()> {
        debug_assert!(self.writable);
        self.file.write_all_at(b, off)
    }

    /// `fdatasync`: orders what was written before against what follows.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Reads an L1 table of `size` entries at `off`.
    pub fn read_l1(&self, off: u64, size: u32) -> io::Result<Vec<u64>> {
        self.read_u64s(off, size as usize)
    }

    /// Reads the L2 table at `off`.
    pub fn read_l2(&self, off: u64) -> io::Result<Vec<u64>> {
        self.check_cluster_offset(off, "L2 table")?;
        self.read_u64s(off, self.header.l2_entries() as usize)
    }

    fn check_cluster_offset(&self, off: u64, what: &str) -> io::Result<()> {
        if !off.is_multiple_of(self.cluster_size()) || off == 0 {
            return Err(invalid(format!(
                "qcow2 {what} at {off:#x} is not a valid cluster"
            )));
        }
        Ok(())
    }

    /// The host clusters (first cluster index, count) an L2 entry uses, if
    /// any.
    pub fn l2_entry_clusters(&self, entry: u64) -> Option<(u64, u64)> {
        let cb = self.header.cluster_bits;
        if entry & OFLAG_COMPRESSED != 0 {
            let x = 62 - (cb - 8);
            let off = entry & ((1u64 << x) - 1);
            let sectors = ((entry >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
            let end = (off & !511) + sectors * 512;
            let first = off >> cb;
            let last = (end - 1) >> cb;
            Some((first, last - first + 1))
        } else {
            let off = entry & OFFSET_MASK;
            (off != 0).then_some((off >> cb, 1))
        }
    }

    fn refcount_bits(&self) -> u64 {
        1 << self.header.refcount_order
    }

    fn refs_per_block(&self) -> u64 {
        self.cluster_size() * 8 / self.refcount_bits()
    }

    fn get_ref(&self, block: &[u8], index: u64) -> u64 {
        let bits = self.refcount_bits();
        if bits < 8 {
            let byte = block[(index * bits / 8) as usize];
            u64::from(byte >> ((index * bits) % 8)) & ((1 << bits) - 1)
        } else {
            let w = (bits / 8) as usize;
            let at = index as usize * w;
            let mut v = [0u8; 8];
            v[8 - w..].copy_from_slice(&block[at..at + w]);
            u64::from_be_bytes(v)
        }
    }

    fn set_ref(&self, block: &mut [u8], index: u64, value: u64) {
        let bits = self.refcount_bits();
        if bits < 8 {
            let at = (index * bits / 8) as usize;
            let shift = (index * bits) % 8;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            block[at] = (block[at] & !mask) | (((value as u8) << shift) & mask);
        } else {
            let w = (bits / 8) as usize;
            let at = index as usize * w;
            block[at..at + w].copy_from_slice(&value.to_be_bytes()[8 - w..]);
        }
    }

    fn max_ref(&self) -> u64 {
        let bits = self.refcount_bits();
        if bits == 64 {
            u64::MAX
        } else {
            (1 << bits) - 1
        }
    }

    /// The refcount of host cluster `cluster`.
    pub fn refcount(&self, cluster: u64) -> io::Result<u64> {
        let per = self.refs_per_block();
        let Some(&entry) = self.reftable.get((cluster / per) as usize) else {
            return Ok(0);
        };
        let block_off = entry & OFFSET_MASK;
        if block_off == 0 {
            return Ok(0);
        }
        let mut block = vec![0u8; self.cluster_size() as usize];
        self.file.read_exact_at(&mut block, block_off)?;
        Ok(self.get_ref(&block, cluster % per))
    }

    /// Adds `delta` to the refcount of each cluster in `deltas`, block by
    /// block. Fails before writing anything if a count would leave its
    /// range or a cluster has no refcount block.
    pub fn apply_refcount_deltas(&self, deltas: &HashMap<u64, i64>) -> io::Result<()> {
        let per = self.refs_per_block();
        let mut by_block: HashMap<u64, Vec<(u64, i64)>> = HashMap::new();
        for (&c, &d) in deltas {
            if d != 0 {
                by_block.entry(c / per).or_default().push((c % per, d));
            }
        }
        let mut updated = Vec::new();
        let mut freed = Vec::new();
        let mut blocks: Vec<_> = by_block.into_iter().collect();
        blocks.sort_by_key(|(b, _)| *b);
        for (b, changes) in blocks {
            let entry = self.reftable.get(b as usize).copied().unwrap_or(0);
            let block_off = entry & OFFSET_MASK;
            if block_off == 0 {
                return Err(invalid(format!(
                    "qcow2 clusters {:#x}.. have no refcount block",
                    b * per
                )));
            }
            let mut block = vec![0u8; self.cluster_size() as usize];
            self.file.read_exact_at(&mut block, block_off)?;
            for (i, d) in changes {
                let old = self.get_ref(&block, i);
                let new = old as i128 + d as i128;
                if new < 0 || new > self.max_ref() as i128 {
                    return Err(invalid(format!(
                        "refcount of qcow2 cluster {:#x} would become {new} (at most {})",
                        (b * per + i) << self.header.cluster_bits,
                        self.max_ref()
                    )));
                }
                self.set_ref(&mut block, i, new as u64);
                if new == 0 {
                    freed.push(b * per + i);
                }
            }
            updated.push((block_off, block));
        }
        for (off, block) in updated {
            self.write_at(off, &block)?;
        }
        // Clusters nobody uses any more give their space back to the
        // host filesystem (as QEMU's discard of freed clusters does).
        freed.sort_unstable();
        let cs = self.cluster_size();
        let mut i = 0;
        while i < freed.len() {
            let mut j = i + 1;
            while j < freed.len() && freed[j] == freed[j - 1] + 1 {
                j += 1;
            }
            self.punch(freed[i] * cs, (j - i) as u64 * cs);
            i = j;
        }
        Ok(())
    }

    fn punch(&self, off: u64, len: u64) {
        if let Err(e) = crate::punch_hole(&self.file, off, len) {
            tracing::debug!("cannot punch freed qcow2 clusters at {off:#x}: {e}");
        }
    }

    /// The first cluster index past every cluster in use and past the
    /// end of the file.
    fn end_cluster(&self) -> io::Result<u64> {
        let len = self.file.metadata()?.len();
        let cs = self.cluster_size();
        let mut end = len.div_ceil(cs);
        // A cluster with a refcount beyond the end of the file (QEMU can
        // leave these after a crash) must not be handed out again.
        let per = self.refs_per_block();
        let mut block = vec![0u8; cs as usize];
        for (t, &entry) in self.reftable.iter().enumerate() {
            let off = entry & OFFSET_MASK;
            if off == 0 || (t as u64 + 1) * per <= end {
                continue;
            }
            self.file.read_exact_at(&mut block, off)?;
            for i in (0..per).rev() {
                let c = t as u64 * per + i;
                if c < end {
                    break;
                }
                if self.get_ref(&block, i) != 0 {
                    end = c + 1;
                    break;
                }
            }
        }
        Ok(end)
    }

    /// Allocates `bytes` (rounded up to clusters) of contiguous new
    /// clusters at the end of the image, with refcount 1, and returns
    /// their offset. New refcount blocks are placed at the start of the
    /// range they cover (so they count themselves).
    pub fn allocate(&mut self, bytes: u64) -> io::Result<u64> {
        let cs = self.cluster_size();
        let n = bytes.div_ceil(cs).max(1);
        let per = self.refs_per_block();
        let mut start = self.end_cluster()?;
        // Make sure refcount blocks cover [start, start + n).
        loop {
            let missing = (start / per..=(start + n - 1) / per).find(|&t| {
                self.reftable
                    .get(t as usize)
                    .is_none_or(|e| e & OFFSET_MASK == 0)
            });
            let Some(t) = missing else { break };
            if t as usize >= self.reftable.len() {
                return Err(invalid(
                    "the qcow2 refcount table is full; grow the image's refcount table (qemu-img convert) first",
                ));
            }
            // The new block goes at the first free cluster at or after the
            // start of its range.
            let at = start.max(t * per);
            let mut block = vec![0u8; cs as usize];
            self.set_ref(&mut block, at % per, 1);
            self.write_at(at * cs, &block)?;
            self.sync()?;
            self.reftable[t as usize] = at * cs;
            self.write_u64s(self.header.refcount_table_offset + t * 8, &[at * cs])?;
            self.sync()?;
            // The allocation starts after the new block (the clusters
            // skipped, if any, stay free).
            start = at + 1;
        }
        let deltas = (start..start + n).map(|c| (c, 1)).collect();
        self.apply_refcount_deltas(&deltas)?;
        // Extend the file so that the clusters exist even if nothing is
        // written to them yet (qemu-img check wants referenced clusters
        // inside the file).
        let end = (start + n) * cs;
        if self.file.metadata()?.len() < end {
            self.file.set_len(end)?;
        }
        Ok(start * cs)
    }

    /// Frees the clusters of `bytes` at `off` (refcount - 1).
    pub fn free(&self, off: u64, bytes: u64) -> io::Result<()> {
        if off == 0 || bytes == 0 {
            return Ok(());
        }
        let cb = self.header.cluster_bits;
        let n = bytes.div_ceil(self.cluster_size());
        let deltas = (0..n).map(|i| ((off >> cb) + i, -1)).collect();
        self.apply_refcount_deltas(&deltas)
    }

    /// Sets or clears the dirty bit (v3; v2 images have none and are
    /// changed without it).
    pub fn set_dirty(&mut self, dirty: bool) -> io::Result<()> {
        if self.header.version < 3 {
            return Ok(());
        }
        let mut f = self.header.incompatible_features;
        if dirty {
            f |= INCOMPAT_DIRTY;
        } else {
            f &= !INCOMPAT_DIRTY;
        }
        if f == self.header.incompatible_features {
            return Ok(());
        }
        self.sync()?;
        self.write_at(field::INCOMPATIBLE, &f.to_be_bytes())?;
        self.sync()?;
        self.header.incompatible_features = f;
        Ok(())
    }

    /// Every L1 table in the image: the active one, then each snapshot's
    /// (offset, entries).
    pub fn l1_tables(&self, snapshot_l1s: &[(u64, u32)]) -> Vec<(u64, u32)> {
        let mut v = vec![(self.header.l1_table_offset, self.header.l1_size)];
        v.extend_from_slice(snapshot_l1s);
        v
    }

    /// Counts the references to each host cluster: header, refcount
    /// table and blocks, snapshot table, every L1 table (active and
    /// snapshots'), their L2 tables and data clusters.
    pub fn count_references(
        &self,
        snapshot_table: (u64, u64),
        snapshot_l1s: &[(u64, u32)],
    ) -> io::Result<HashMap<u64, u64>> {
        let cb = self.header.cluster_bits;
        let cs = self.cluster_size();
        let mut refs: HashMap<u64, u64> = HashMap::new();
        let add = |off: u64, bytes: u64, refs: &mut HashMap<u64, u64>| {
            if bytes == 0 {
                return;
            }
            for c in (off >> cb)..=(off.saturating_add(bytes - 1) >> cb) {
                *refs.entry(c).or_default() += 1;
            }
        };
        add(0, cs, &mut refs);
        add(
            self.header.refcount_table_offset,
            u64::from(self.header.refcount_table_clusters) * cs,
            &mut refs,
        );
        for &e in &self.reftable {
            if e & OFFSET_MASK != 0 {
                add(e & OFFSET_MASK, cs, &mut refs);
            }
        }
        add(snapshot_table.0, snapshot_table.1, &mut refs);
        let mut l2_seen: HashMap<u64, Vec<u64>> = HashMap::new();
        for (l1_off, l1_size) in self.l1_tables(snapshot_l1s) {
            add(l1_off, u64::from(l1_size) * 8, &mut refs);
            for e in self.read_l1(l1_off, l1_size)? {
                let l2 = e & OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                add(l2, cs, &mut refs);
                if let std::collections::hash_map::Entry::Vacant(v) = l2_seen.entry(l2) {
                    v.insert(self.read_l2(l2)?);
                }
                for &entry in &l2_seen[&l2] {
                    if let Some((first, n)) = self.l2_entry_clusters(entry) {
                        for c in first..first + n {
                            *refs.entry(c).or_default() += 1;
                        }
                    }
                }
            }
        }
        Ok(refs)
    }

    /// Sets every refcount to the number of references actually found
    /// (so leaks are freed and nothing in use is under-counted), then the
    /// active tables' COPIED flags to match. Returns how many refcounts
    /// changed.
    pub fn rebuild_refcounts(&mut self) -> io::Result<u64> {
        let (table, l1s) = super::snapshots::table_extent(self)?;
        let refs = self.count_references(table, &l1s)?;
        let per = self.refs_per_block();
        let cs = self.cluster_size();
        let mut changed = 0;
        if let Some(&max) = refs.keys().max() {
            if max / per >= self.reftable.len() as u64 {
                return Err(invalid(
                    "qcow2 clusters in use lie beyond the refcount table",
                ));
            }
            for t in 0..=max / per {
                if self.reftable[t as usize] & OFFSET_MASK == 0
                    && (t * per..(t + 1) * per).any(|c| refs.contains_key(&c))
                {
                    return Err(invalid(format!(
                        "qcow2 clusters {:#x}.. are in use but have no refcount block",
                        t * per * cs
                    )));
                }
            }
        }
        let mut block = vec![0u8; cs as usize];
        for t in 0..self.reftable.len() as u64 {
            let off = self.reftable[t as usize] & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            self.file.read_exact_at(&mut block, off)?;
            let mut dirty = false;
            for i in 0..per {
                let want = refs.get(&(t * per + i)).copied().unwrap_or(0);
                if want > self.max_ref() {
                    return Err(invalid(format!(
                        "qcow2 cluster {:#x} has {want} references, more than its {}-bit refcount holds",
                        (t * per + i) << self.header.cluster_bits,
                        self.refcount_bits()
                    )));
                }
                if self.get_ref(&block, i) != want {
                    self.set_ref(&mut block, i, want);
                    dirty = true;
                    changed += 1;
                }
            }
            if dirty {
                self.write_at(off, &block)?;
            }
        }
        self.fix_copied_flags()?;
        self.sync()?;
        Ok(changed)
    }

    /// Sets the COPIED flag of each active L1 and L2 entry exactly where
    /// the cluster it points at has refcount 1 (qcow2.txt: "refcount is
    /// exactly one").
    pub fn fix_copied_flags(&self) -> io::Result<()> {
        let l1_off = self.header.l1_table_offset;
        let mut l1 = self.read_l1(l1_off, self.header.l1_size)?;
        let mut l1_changed = false;
        // Refcount blocks read once each (a cluster's refcount read alone
        // costs a whole block).
        let per = self.refs_per_block();
        let mut blocks: HashMap<u64, Option<Vec<u8>>> = HashMap::new();
        let mut rc = |c: u64, me: &Self| -> io::Result<u64> {
            let t = c / per;
            if let std::collections::hash_map::Entry::Vacant(v) = blocks.entry(t) {
                let off = me.reftable.get(t as usize).map_or(0, |e| e & OFFSET_MASK);
                v.insert(if off == 0 {
                    None
                } else {
                    let mut b = vec![0u8; me.cluster_size() as usize];
                    me.file.read_exact_at(&mut b, off)?;
                    Some(b)
                });
            }
            Ok(blocks[&t].as_ref().map_or(0, |b| me.get_ref(b, c % per)))
        };
        let cb = self.header.cluster_bits;
        for e in l1.iter_mut() {
            let l2_off = *e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let want = rc(l2_off >> cb, self)? == 1;
            let new = if want {
                *e | OFLAG_COPIED
            } else {
                *e & !OFLAG_COPIED
            };
            if new != *e {
                *e = new;
                l1_changed = true;
            }
            let mut l2 = self.read_l2(l2_off)?;
            let mut l2_changed = false;
            for entry in l2.iter_mut() {
                if *entry & OFLAG_COMPRESSED != 0 {
                    continue;
                }
                let off = *entry & OFFSET_MASK;
                if off == 0 {
                    continue;
                }
                let want = rc(off >> cb, self)? == 1;
                let new = if want {
                    *entry | OFLAG_COPIED
                } else {
                    *entry & !OFLAG_COPIED
                };
                if new != *entry {
                    *entry = new;
                    l2_changed = true;
                }
            }
            if l2_changed {
                self.write_u64s(l2_off, &l2)?;
            }
        }
        if l1_changed {
            self.write_u64s(l1_off, &l1)?;
        }
        Ok(())
    }
}
