//! Guest memory for a restore, in one of three modes:
//!
//! | mode | guest memory | the guest runs | memory checked |
//! |---|---|---|---|
//! | `background` (default) | anonymous, huge pages, filled by [`super::fill`] | at once; a page not yet filled is filled when touched | chunk by chunk as it is read |
//! | `eager` | anonymous, huge pages, copied in full first | once all of it is copied | whole, before the copy |
//! | `lazy` | the image mapped copy-on-write (`MAP_PRIVATE`) | at once; pages load when touched, every first write copies 4 KiB | whole, before mapping |
//!
//! `lazy` shares clean pages with the page cache (many clones of one
//! snapshot cost little memory) but makes the guest pay a 4 KiB
//! copy-on-write fault per page it writes; `eager` makes it wait for the
//! copy; `background` does neither (docs/PERFORMANCE.md has the figures).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::fill::{FatalHook, FillOptions, MemoryFill};
use super::restore::{RestoreError, RestorePlan};
use crate::memory::{self, GuestRam};

/// How guest memory comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreMode {
    /// Fresh huge-page memory filled while the guest runs: pages the guest
    /// touches first are filled first (userfaultfd), the rest in the
    /// background; resident soon after, with no cost after that.
    #[default]
    Background,
    /// Map the memory image copy-on-write (`MAP_PRIVATE`): restore time does
    /// not grow with memory size; pages are read when the guest touches
    /// them, and each first write copies a 4 KiB page.
    Lazy,
    /// Copy the memory image into fresh (huge-page backed) memory first.
    Eager,
}

impl std::str::FromStr for RestoreMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "background" => Ok(Self::Background),
            "lazy" => Ok(Self::Lazy),
            "eager" => Ok(Self::Eager),
            o => Err(format!(
                "unknown restore mode '{o}' (expected background, lazy or eager)"
            )),
        }
    }
}

impl std::fmt::Display for RestoreMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Background => "background",
            Self::Lazy => "lazy",
            Self::Eager => "eager",
        })
    }
}

/// What a background restore does with the snapshot's working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkingSetUse {
    /// Fill the blocks of a recorded working set first, if there is one.
    #[default]
    Use,
    /// Fill in address order.
    Ignore,
    /// Record a new one: for this long only the blocks the guest touches
    /// are filled, in the order it touches them; that order is stored
    /// beside the snapshot, then the rest is filled.
    Record(Duration),
}

/// How to load guest memory.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// The mode.
    pub mode: RestoreMode,
    /// Do not check the memory image's checksums (faster, at the price of
    /// running a guest on damaged memory).
    pub skip_verify: bool,
    /// Background mode: the working set.
    pub working_set: WorkingSetUse,
    /// Background mode: filler threads (default: one per host CPU, at
    /// most 4).
    pub fill_threads: Option<usize>,
    /// Background mode: what ends the VM when a block cannot be filled
    /// (default: print the message and exit with status
    /// [`EXIT_MEMORY_DAMAGED`]).
    pub on_fatal: Option<FatalHook>,
}

/// Exit status of a VMM whose restored memory turned out damaged while
/// the guest ran (background mode).
pub const EXIT_MEMORY_DAMAGED: i32 = 8;

/// Guest memory for a restore.
pub struct LoadedMemory {
    /// The memory, mapped (and for `lazy`/`eager` complete).
    pub memory: GuestRam,
    /// Background mode: the fill under way; the VM must own it.
    pub fill: Option<MemoryFill>,
    /// How long loading took (for `background`: until the fill started).
    pub elapsed: Duration,
    /// Things the user should know (an unusable working set).
    pub notes: Vec<String>,
    /// Blocks of a recorded working set that will be filled first.
    pub working_set_blocks: usize,
}

/// Loads guest memory for `plan`, checking the memory image's checksums
/// as the mode needs: whole and first for `lazy` and `eager` (reporting
/// `progress(done, total)`), chunk by chunk as it is read for
/// `background`.
pub fn load_memory(
    plan: &RestorePlan,
    options: &LoadOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<LoadedMemory, RestoreError> {
    let started = Instant::now();
    let chain = &plan.chain;
    let by_block = options.mode == RestoreMode::Background && chain.checks_by_block();
    if !options.skip_verify && !by_block {
        for member in chain.members() {
            member.verify(&mut *progress)?.into_result()?;
        }
    }
    let base = chain.base();
    let path = base.memory_file_path();
    let err = |message: String| RestoreError::Memory {
        path: path.clone(),
        message,
    };
    let mut notes = Vec::new();
    let mut fill = None;
    let mut working_set_blocks = 0;
    let memory = match options.mode {
        RestoreMode::Lazy => {
            let mut regions = Vec::new();
            for r in base.regions() {
                let file = base
                    .memory_file()
                    .try_clone()
                    .map_err(|e| err(e.to_string()))?;
                let mapping = MmapRegionBuilder::new(r.size as usize)
                    .with_file_offset(FileOffset::new(file, r.file_offset))
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                    .build()
                    .map_err(|e| err(format!("mmap of region {}: {e}", r.name)))?;
                regions.push(
                    GuestRegionMmap::new(mapping, GuestAddress(r.gpa))
                        .ok_or_else(|| err(format!("region {} overflows", r.name)))?,
                );
            }
            let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))?;
            // A chain: the base is mapped; the diffs' pages are copied
            // over it (copy-on-write of the pages they change only).
            if chain.len() > 1 {
                for (i, region) in vm_memory::GuestMemoryBackend::iter(&mem).enumerate() {
                    // SAFETY: the private mapping was just made by us and
                    // nothing else refers to it yet.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            region.as_ptr(),
                            vm_memory::GuestMemoryRegion::len(region) as usize,
                        )
                    };
                    chain.apply_diffs(i, 0, dst)?;
                }
            }
            mem
        }
        RestoreMode::Eager => {
            let mem = memory::allocate(plan.config.memory_mib, plan.config.memory_backend)
                .map_err(|e| err(e.to_string()))?;
            for (i, region) in vm_memory::GuestMemoryBackend::iter(&mem).enumerate() {
                // SAFETY: the region was just mapped by us, nothing else
                // refers to it yet, and its length is what we pass.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        region.as_ptr(),
                        vm_memory::GuestMemoryRegion::len(region) as usize,
                    )
                };
                chain.read_region_into(i, dst, true)?;
            }
            mem
        }
        RestoreMode::Background => {
            let mem = memory::allocate(plan.config.memory_mib, plan.config.memory_backend)
                .map_err(|e| err(e.to_string()))?;
            let (prefetch, record) = match options.working_set {
                WorkingSetUse::Ignore => (Vec::new(), None),
                WorkingSetUse::Record(d) => (Vec::new(), Some(d)),
                WorkingSetUse::Use => match stasis_snapshot::read_working_set(chain.newest()) {
                    Ok(Some(ws)) => (ws.blocks, None),
                    Ok(None) => (Vec::new(), None),
                    Err(message) => {
                        notes.push(format!("working set: {message}"));
                        (Vec::new(), None)
                    }
                },
            };
            working_set_blocks = prefetch.len();
            let threads = options.fill_threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
                    .min(4)
            });
            let on_fatal = options.on_fatal.clone().unwrap_or_else(|| {
                Arc::new(|message: String| {
                    eprintln!("stasis: {message} (exit status {EXIT_MEMORY_DAMAGED})");
                    std::process::exit(EXIT_MEMORY_DAMAGED);
                })
            });
            fill = Some(
                MemoryFill::start(
                    &mem,
                    chain.clone(),
                    FillOptions {
                        prefetch,
                        record,
                        verify: by_block && !options.skip_verify,
                        fillers: threads,
                        on_fatal,
                    },
                )
                .map_err(|e| {
                    err(format!(
                        "cannot fill guest memory in the background: {e} (use --mode eager or --mode lazy)"
                    ))
                })?,
            );
            mem
        }
    };
    Ok(LoadedMemory {
        memory,
        fill,
        elapsed: started.elapsed(),
        notes,
        working_set_blocks,
    })
}
