//! Reading and verifying a snapshot. Reading never modifies the snapshot:
//! every file is opened read-only.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::crc;
use crate::error::{invalid, io_ctx, Error, Result};
use crate::fsutil::{self, OpenRegularError};
use crate::manifest::{decode_manifest, Manifest, ManifestBody, MemoryRegion, SectionEntry};
use crate::section::{check_known, decode_section, SectionState, SectionWarning};
use crate::{MANIFEST_FILE, MAX_MANIFEST_SIZE, PAGE_SIZE};

/// Largest single `pread` when reading memory.
const READ_PIECE: usize = 16 << 20;
/// Largest read `verify` makes at once (a chunk may be larger).
const VERIFY_PIECE: u64 = 4 << 20;
/// Data extents shorter than this are read a window at a time.
const SMALL_EXTENT: u64 = 256 << 10;
/// The window read at once where the data is fragmented.
const FRAGMENT_WINDOW: u64 = 2 << 20;

/// Most damaged sections and chunks [`VerifyReport::problems`] lists one
/// by one.
pub const PROBLEMS_LISTED: usize = 20;

/// An open, checked snapshot.
///
/// [`open`](SnapshotReader::open) has verified the manifest's checksum and
/// the consistency of every offset and size in it, and that the data files
/// exist with the recorded sizes. Section and memory checksums are checked
/// on use ([`section_bytes`](SnapshotReader::section_bytes)) or all at once
/// ([`verify`](SnapshotReader::verify)).
#[derive(Debug)]
pub struct SnapshotReader {
    dir: PathBuf,
    manifest: Manifest,
    state: File,
    memory: File,
}

/// A section whose bytes do not match its checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadSection {
    /// Section name.
    pub name: String,
    /// Section instance.
    pub instance: String,
    /// Recorded checksum.
    pub recorded: u32,
    /// Computed checksum.
    pub computed: u32,
}

impl std::fmt::Display for BadSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "section '{}'/'{}': checksum mismatch (recorded {:08x}, computed {:08x})",
            self.name, self.instance, self.recorded, self.computed
        )
    }
}

/// A memory chunk whose bytes do not match its checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadChunk {
    /// Chunk index.
    pub index: u64,
    /// First byte of the chunk in the memory file.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The region the chunk's data belongs to (`None`: padding only).
    pub region: Option<String>,
    /// Guest physical range of the chunk's region data, if any.
    pub gpa: Option<(u64, u64)>,
    /// Recorded checksum.
    pub recorded: u32,
    /// Computed checksum.
    pub computed: u32,
}

impl std::fmt::Display for BadChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "memory chunk {} (file bytes {:#x}..{:#x}",
            self.index, self.start, self.end
        )?;
        match (&self.region, self.gpa) {
            (Some(r), Some((a, b))) => write!(f, ", region '{r}', guest physical {a:#x}..{b:#x}")?,
            (Some(r), None) => write!(f, ", region '{r}'")?,
            _ => write!(f, ", padding between regions")?,
        }
        write!(
            f,
            "): checksum mismatch (recorded {:08x}, computed {:08x})",
            self.recorded, self.computed
        )
    }
}

/// The result of [`SnapshotReader::verify`].
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyReport {
    /// The snapshot checked.
    pub dir: PathBuf,
    /// Sections checked.
    pub sections_checked: usize,
    /// Memory chunks checked.
    pub chunks_checked: u64,
    /// Bytes covered by checksums (state + memory, holes included).
    pub bytes_checked: u64,
    /// Bytes actually read from disk (holes are not read).
    pub bytes_read: u64,
    /// Sections that failed their checksum.
    pub bad_sections: Vec<BadSection>,
    /// Memory chunks that failed their checksum, in file order.
    pub bad_chunks: Vec<BadChunk>,
    /// Wall time.
    pub elapsed: Duration,
}

impl VerifyReport {
    /// True if nothing failed.
    pub fn is_ok(&self) -> bool {
        self.bad_sections.is_empty() && self.bad_chunks.is_empty()
    }

    /// One human-readable line per failure, the first
    /// [`PROBLEMS_LISTED`] of them, then a line counting the rest (a
    /// wholly damaged 1 TiB image has half a million bad chunks).
    pub fn problems(&self) -> Vec<String> {
        let all = self.bad_sections.len() + self.bad_chunks.len();
        let mut lines: Vec<String> = self
            .bad_sections
            .iter()
            .map(ToString::to_string)
            .chain(self.bad_chunks.iter().map(ToString::to_string))
            .take(PROBLEMS_LISTED)
            .collect();
        if all > PROBLEMS_LISTED {
            lines.push(format!(
                "... and {} more damaged sections or memory chunks ({} sections and {} chunks in all)",
                all - PROBLEMS_LISTED,
                self.bad_sections.len(),
                self.bad_chunks.len()
            ));
        }
        lines
    }

    /// `Ok(self)` if nothing failed, else [`Error::VerifyFailed`] listing
    /// every failure.
    pub fn into_result(self) -> Result<VerifyReport> {
        if self.is_ok() {
            Ok(self)
        } else {
            Err(Error::VerifyFailed {
                dir: self.dir.clone(),
                problems: self.problems(),
            })
        }
    }

    /// Throughput over the bytes covered, in MB/s (10⁶ bytes).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes_checked as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Looks for leftovers of an interrupted replacement next to a missing
/// snapshot directory, to tell the user how to recover.
fn recovery_hint(dir: &Path) -> String {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return String::new();
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(parent) else {
        return String::new();
    };
    let mut found: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&prefix) && e.path().join(MANIFEST_FILE).exists()
        })
        .map(|e| e.path().display().to_string())
        .collect();
    found.sort();
    if found.is_empty() {
        String::new()
    } else {
        format!(
            " (an interrupted replacement left complete snapshot(s) at {}; rename one to {} to recover)",
            found.join(", "),
            dir.display()
        )
    }
}

fn open_data_file(dir: &Path, name: &str, expected: u64) -> Result<File> {
    let path = dir.join(name);
    let f = match fsutil::open_regular(&path) {
        Ok(f) => f,
        Err(OpenRegularError::Missing) => {
            return Err(Error::FileMissing {
                dir: dir.to_path_buf(),
                file: name.to_string(),
            })
        }
        Err(OpenRegularError::Io(e)) => {
            return Err(io_ctx(format!("opening {}", path.display()))(e))
        }
        Err(e) => {
            return Err(Error::NotRegularFile {
                file: name.to_string(),
                detail: e.to_string(),
            })
        }
    };
    let md = f
        .metadata()
        .map_err(io_ctx(format!("examining {}", path.display())))?;
    if md.len() != expected {
        return Err(Error::FileSize {
            file: name.to_string(),
            expected,
            actual: md.len(),
        });
    }
    Ok(f)
}

impl SnapshotReader {
    /// Opens the snapshot directory `dir`, checking in order: the directory
    /// and `manifest.json` exist; it is JSON; it is a stasis snapshot; its
    /// format version is supported; the body checksum matches; the body
    /// parses and is consistent; the data files exist with their recorded
    /// sizes. Each failure has its own error.
    pub fn open(dir: &Path) -> Result<SnapshotReader> {
        match fs::metadata(dir) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(Error::NotASnapshot(format!(
                    "{} is not a directory",
                    dir.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::DirMissing {
                    dir: dir.to_path_buf(),
                    hint: recovery_hint(dir),
                })
            }
            Err(e) => return Err(io_ctx(format!("examining {}", dir.display()))(e)),
        }
        let mpath = dir.join(MANIFEST_FILE);
        let mut mfile = match fsutil::open_regular(&mpath) {
            Ok(f) => f,
            Err(OpenRegularError::Missing) => {
                return Err(Error::ManifestMissing {
                    dir: dir.to_path_buf(),
                })
            }
            Err(OpenRegularError::Io(e)) => {
                return Err(io_ctx(format!("opening {}", mpath.display()))(e))
            }
            Err(e) => {
                return Err(Error::NotRegularFile {
                    file: MANIFEST_FILE.to_string(),
                    detail: e.to_string(),
                })
            }
        };
        let len = mfile
            .metadata()
            .map_err(io_ctx(format!("examining {}", mpath.display())))?
            .len();
        if len > MAX_MANIFEST_SIZE {
            return Err(Error::ManifestInvalid(format!(
                "manifest.json is {len} bytes, more than the {MAX_MANIFEST_SIZE} allowed"
            )));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        (&mut mfile)
            .take(MAX_MANIFEST_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(io_ctx(format!("reading {}", mpath.display())))?;
        let manifest = decode_manifest(&bytes)?;
        let b = &manifest.body;
        let state = open_data_file(dir, &b.state_file, b.state_size)?;
        let memory = open_data_file(dir, &b.memory.file, b.memory.file_size)?;
        if let Some(pm) = &b.memory.page_map {
            open_data_file(dir, &pm.file, pm.size)?;
        }
        Ok(SnapshotReader {
            dir: dir.to_path_buf(),
            manifest,
            state,
            memory,
        })
    }

    /// A diff snapshot's page map (checked against its crc32c), or `None`
    /// for a full snapshot.
    pub fn page_map(&self) -> Result<Option<crate::page_map::PageMap>> {
        let Some(pm) = &self.manifest.body.memory.page_map else {
            return Ok(None);
        };
        let path = self.dir.join(&pm.file);
        let f = open_data_file(&self.dir, &pm.file, pm.size)?;
        let mut bytes = vec![0u8; pm.size as usize];
        f.read_exact_at(&mut bytes, 0)
            .map_err(io_ctx(format!("reading {}", path.display())))?;
        let crc = crc32c::crc32c(&bytes);
        if crc != pm.crc32c {
            return Err(invalid(
                &pm.file,
                format!(
                    "checksum {crc:08x} does not match the manifest's {:08x}",
                    pm.crc32c
                ),
            ));
        }
        let pages = self.regions().iter().map(|r| r.size / PAGE_SIZE).sum();
        crate::page_map::PageMap::from_bytes(bytes, pages).map(Some)
    }

    /// The snapshot directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The checked manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest body.
    pub fn body(&self) -> &ManifestBody {
        &self.manifest.body
    }

    /// Every section, known or not, in `state.bin` order.
    pub fn sections(&self) -> &[SectionEntry] {
        &self.manifest.body.sections
    }

    /// The section `name`/`instance`, if present.
    pub fn find_section(&self, name: &str, instance: &str) -> Option<&SectionEntry> {
        self.sections()
            .iter()
            .find(|s| s.name == name && s.instance == instance)
    }

    /// The instances of section `name`, in file order.
    pub fn instances(&self, name: &str) -> Vec<&SectionEntry> {
        self.sections().iter().filter(|s| s.name == name).collect()
    }

    /// Reads a section's payload and checks its checksum.
    pub fn section_bytes(&self, entry: &SectionEntry) -> Result<Vec<u8>> {
        let state_size = self.manifest.body.state_size;
        let end = entry.offset.checked_add(entry.size);
        if !matches!(end, Some(e) if e <= state_size) {
            return Err(invalid(
                format!("section '{}'/'{}'", entry.name, entry.instance),
                format!(
                    "offset {} + size {} is beyond the end of {} ({state_size} bytes)",
                    entry.offset, entry.size, self.manifest.body.state_file
                ),
            ));
        }
        let mut buf = vec![0u8; entry.size as usize];
        self.state
            .read_exact_at(&mut buf, entry.offset)
            .map_err(io_ctx(format!(
                "reading section '{}'/'{}' from {}",
                entry.name,
                entry.instance,
                self.state_file_path().display()
            )))?;
        let computed = crc32c::crc32c(&buf);
        if computed != entry.crc32c {
            return Err(Error::SectionChecksum {
                name: entry.name.clone(),
                instance: entry.instance.clone(),
                recorded: entry.crc32c,
                computed,
            });
        }
        Ok(buf)
    }

    /// Reads and decodes section `T::NAME`/`instance`, upgrading an older
    /// version through [`SectionState::upgrade`]. Returns the version that
    /// was stored and the state, or `None` if the snapshot has no such
    /// section.
    pub fn read_section<T: SectionState>(&self, instance: &str) -> Result<Option<(u32, T)>> {
        crate::section::read_section::<T, Self>(self, instance)
    }

    /// Reads and decodes every instance of section `T::NAME`, in file order.
    pub fn read_all<T: SectionState>(&self) -> Result<Vec<(String, T)>> {
        self.instances(T::NAME)
            .into_iter()
            // An optional section newer than this build is skipped.
            .filter(|e| !(e.optional && e.version > T::VERSION))
            .map(|e| {
                let bytes = self.section_bytes(e)?;
                Ok((
                    e.instance.clone(),
                    decode_section::<T>(&e.instance, e.version, &bytes)?,
                ))
            })
            .collect()
    }

    /// Checks the sections against what this build understands; see
    /// [`check_known`](crate::check_known). `known(name)` returns the newest
    /// version of `name` that restore decodes, or `None`.
    pub fn check_known(&self, known: &dyn Fn(&str) -> Option<u32>) -> Result<Vec<SectionWarning>> {
        check_known(self.sections(), known)
    }

    /// Path of the state file.
    pub fn state_file_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.body.state_file)
    }

    /// Path of the memory image, for mapping it (`MAP_PRIVATE` at each
    /// region's `file_offset`, which is 2 MiB aligned).
    pub fn memory_file_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.body.memory.file)
    }

    /// The open memory image (read-only), e.g. to mmap it.
    pub fn memory_file(&self) -> &File {
        &self.memory
    }

    /// The memory regions, in file order.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.manifest.body.memory.regions
    }

    /// The region called `name`.
    pub fn region(&self, name: &str) -> Option<&MemoryRegion> {
        self.regions().iter().find(|r| r.name == name)
    }

    /// Bytes the memory image occupies on disk (`st_blocks` × 512); much
    /// less than its length when most pages are holes.
    pub fn memory_allocated_bytes(&self) -> Result<u64> {
        let md = self.memory.metadata().map_err(io_ctx(format!(
            "examining {}",
            self.memory_file_path().display()
        )))?;
        Ok(md.blocks() * 512)
    }

    /// Reads a region's contents into `dst` (of exactly the region's size),
    /// for eager restore. Holes are found with `SEEK_DATA`/`SEEK_HOLE`: if
    /// `dst_is_zeroed` (e.g. fresh anonymous memory) the destination's zero
    /// pages are never written, so they stay unallocated; otherwise they
    /// are zero-filled. Long data extents are read straight into `dst` with
    /// large preads; where data is fragmented into short extents, 2 MiB
    /// windows are read at once. Returns the bytes read from the file.
    pub fn read_region_into(
        &self,
        region: &MemoryRegion,
        dst: &mut [u8],
        dst_is_zeroed: bool,
    ) -> Result<u64> {
        if dst.len() as u64 != region.size {
            return Err(Error::Usage(format!(
                "read_region_into: destination is {} bytes but region '{}' is {}",
                dst.len(),
                region.name,
                region.size
            )));
        }
        let file_size = self.manifest.body.memory.file_size;
        let start = region.file_offset;
        let end = start.checked_add(region.size).filter(|&e| e <= file_size);
        let Some(end) = end else {
            return Err(invalid(
                format!("region '{}'", region.name),
                format!("extends beyond the memory file ({file_size} bytes)"),
            ));
        };
        let path = self.memory_file_path();
        let pread = |buf: &mut [u8], at: u64| -> Result<()> {
            self.memory.read_exact_at(buf, at).map_err(|e| Error::Io {
                context: format!(
                    "reading region '{}' from {} at offset {at:#x}",
                    region.name,
                    path.display()
                ),
                source: e,
            })
        };
        let page = PAGE_SIZE;
        let mut bounce: Vec<u8> = Vec::new();
        let mut read = 0u64;
        let mut pos = start;
        let mut can_seek = true;
        while pos < end {
            // The next data extent, [data, hole).
            let (data, hole) = if can_seek {
                match fsutil::seek_data(&self.memory, pos) {
                    Ok(None) => (end, end),
                    Ok(Some(d)) if d >= end => (end, end),
                    Ok(Some(d)) => match fsutil::seek_hole(&self.memory, d) {
                        Ok(Some(h)) => (d, h.clamp(d + 1, end)),
                        _ => (d, end),
                    },
                    Err(_) => {
                        can_seek = false;
                        (pos, end)
                    }
                }
            } else {
                (pos, end)
            };
            if data > pos && !dst_is_zeroed {
                dst[(pos - start) as usize..(data - start) as usize].fill(0);
            }
            if data >= end {
                break;
            }
            if hole - data >= SMALL_EXTENT || !can_seek {
                // A long extent: straight into place, in large preads.
                let mut at = data;
                while at < hole {
                    let n = ((hole - at) as usize).min(READ_PIECE);
                    let d = (at - start) as usize;
                    pread(&mut dst[d..d + n], at)?;
                    at += n as u64;
                    read += n as u64;
                }
                pos = hole;
                continue;
            }
            // Fragmented data (many short extents): take a whole window in
            // one pread instead of two lseeks and a pread per extent. The
            // window starts on a page boundary; re-reading bytes before
            // `pos` is harmless, they are the same bytes.
            let a = start + (data - start) / page * page;
            let wend = (a + FRAGMENT_WINDOW).min(end);
            let (da, dw) = ((a - start) as usize, (wend - start) as usize);
            if dst_is_zeroed {
                // Copy only the non-zero pages, so that the zero pages of
                // the destination are never touched (nor faulted in).
                bounce.resize(FRAGMENT_WINDOW as usize, 0);
                let buf = &mut bounce[..dw - da];
                pread(buf, a)?;
                for (src, out) in buf
                    .chunks(page as usize)
                    .zip(dst[da..dw].chunks_mut(page as usize))
                {
                    if !crc::is_zero(src) {
                        out.copy_from_slice(src);
                    }
                }
            } else {
                pread(&mut dst[da..dw], a)?;
            }
            read += wend - a;
            pos = wend;
        }
        Ok(read)
    }

    /// Checks every section and every memory chunk against its checksum.
    /// Failures are listed in the report (see [`VerifyReport::is_ok`] and
    /// [`VerifyReport::into_result`]); `Err` is only for I/O errors.
    ///
    /// `progress(done, total)` is called from this thread as bytes are
    /// checked (holes count as checked). Memory is checked by up to two
    /// threads; chunks that are entirely holes are not read.
    pub fn verify(&self, mut progress: impl FnMut(u64, u64)) -> Result<VerifyReport> {
        let start = Instant::now();
        let body = &self.manifest.body;
        let mem = &body.memory;
        let total = body.state_size + mem.file_size;
        let mut report = VerifyReport {
            dir: self.dir.clone(),
            sections_checked: 0,
            chunks_checked: 0,
            bytes_checked: 0,
            bytes_read: 0,
            bad_sections: Vec::new(),
            bad_chunks: Vec::new(),
            elapsed: Duration::ZERO,
        };
        let mut done = 0u64;
        progress(0, total);
        for s in &body.sections {
            match self.section_bytes(s) {
                Ok(_) => {}
                Err(Error::SectionChecksum {
                    name,
                    instance,
                    recorded,
                    computed,
                }) => report.bad_sections.push(BadSection {
                    name,
                    instance,
                    recorded,
                    computed,
                }),
                Err(e) => return Err(e),
            }
            report.sections_checked += 1;
            report.bytes_read += s.size;
            done += s.size;
            progress(done, total);
        }
        done = body.state_size;

        let chunks = mem.chunk_crc32c.len();
        let next = AtomicUsize::new(0);
        let mem_done = AtomicU64::new(0);
        let bytes_read = AtomicU64::new(0);
        let abort = AtomicBool::new(false);
        let bad: Mutex<Vec<BadChunk>> = Mutex::new(Vec::new());
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let path = self.memory_file_path();
        let work = |on_chunk: &mut dyn FnMut()| {
            // A chunk is read a piece at a time: a manifest may claim
            // chunks of up to 1 GiB, and memory must not follow it.
            let mut buf =
                vec![0u8; mem.chunk_size.min(VERIFY_PIECE).min(mem.file_size.max(1)) as usize];
            loop {
                if abort.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= chunks {
                    return;
                }
                let cstart = i as u64 * mem.chunk_size;
                let cend = (cstart + mem.chunk_size).min(mem.file_size);
                let len = (cend - cstart) as usize;
                let has_data = match fsutil::seek_data(&self.memory, cstart) {
                    Ok(None) => false,
                    Ok(Some(d)) => d < cend,
                    Err(_) => true,
                };
                let computed = if has_data {
                    let mut crc = 0;
                    let mut at = cstart;
                    while at < cend {
                        let n = ((cend - at) as usize).min(buf.len());
                        if let Err(e) = self.memory.read_exact_at(&mut buf[..n], at) {
                            abort.store(true, Ordering::Relaxed);
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(Error::Io {
                                    context: format!(
                                        "reading {} at offset {at:#x}",
                                        path.display()
                                    ),
                                    source: e,
                                });
                            return;
                        }
                        crc = crc::append(crc, &buf[..n]);
                        at += n as u64;
                    }
                    bytes_read.fetch_add(len as u64, Ordering::Relaxed);
                    crc
                } else {
                    crc::append_zeros(0, len as u64)
                };
                let recorded = mem.chunk_crc32c[i];
                if computed != recorded {
                    let chunk = self.describe_chunk(i as u64, cstart, cend, recorded, computed);
                    bad.lock().unwrap_or_else(|p| p.into_inner()).push(chunk);
                }
                mem_done.fetch_add(len as u64, Ordering::Relaxed);
                on_chunk();
            }
        };
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(2)
            .min(chunks.max(1));
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(|| work(&mut || {}));
            }
            work(&mut || progress(done + mem_done.load(Ordering::Relaxed), total));
        });
        if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        progress(total, total);
        let mut bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
        bad.sort_by_key(|c| c.index);
        report.bad_chunks = bad;
        report.chunks_checked = chunks as u64;
        report.bytes_checked = total;
        report.bytes_read += bytes_read.into_inner();
        report.elapsed = start.elapsed();

        Ok(report)
    }

    /// Names the region (and guest range) a chunk's data belongs to.
    pub(crate) fn describe_chunk(
        &self,
        index: u64,
        start: u64,
        end: u64,
        recorded: u32,
        computed: u32,
    ) -> BadChunk {
        let region = self
            .regions()
            .iter()
            .find(|r| r.file_offset < end && start < r.file_offset + r.size);
        let (name, gpa) = match region {
            Some(r) => {
                let a = start.max(r.file_offset);
                let b = end.min(r.file_offset + r.size);
                (
                    Some(r.name.clone()),
                    Some((r.gpa + (a - r.file_offset), r.gpa + (b - r.file_offset))),
                )
            }
            None => (None, None),
        };
        BadChunk {
            index,
            start,
            end,
            region: name,
            gpa,
            recorded,
            computed,
        }
    }
}

impl crate::section::SectionSource for SnapshotReader {
    fn entries(&self) -> &[SectionEntry] {
        self.sections()
    }

    fn payload(&self, entry: &SectionEntry) -> Result<Vec<u8>> {
        self.section_bytes(entry)
    }
}
