//! `manifest.json`: its types, how it is sealed with a checksum, and how it
//! is opened and checked.
//!
//! The file is an envelope around a body:
//!
//! ```json
//! {
//!   "format": "stasis-snapshot",
//!   "format_version": 1,
//!   "body_crc32c": "1a2b3c4d",
//!   "body": { ... }
//! }
//! ```
//!
//! `body_crc32c` is the CRC-32C of the exact bytes of the `body` value as
//! they stand in the file, from its `{` to its `}`.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{invalid, Error, Result};
use crate::{
    FORMAT_NAME, FORMAT_VERSION, MAX_FORMAT_VERSION, PAGE_SIZE, REGION_ALIGN, SECTION_ALIGN,
};

/// Who wrote the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Producer {
    /// Program name, `"stasis"`.
    pub name: String,
    /// The writing crate's version, e.g. `"0.1.0"`.
    pub version: String,
}

impl Producer {
    /// This build of stasis.
    pub fn this() -> Producer {
        Producer {
            name: "stasis".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// One CPUID leaf as the guest saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// Leaf (EAX input).
    pub function: u32,
    /// Subleaf (ECX input).
    pub index: u32,
    /// KVM's flags for the entry (e.g. `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`).
    pub flags: u32,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

/// The CPU the snapshot was taken on and the CPUID the guest saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// Vendor string, e.g. `"GenuineIntel"`.
    pub vendor: String,
    /// Brand string, or family/model/stepping.
    pub model: String,
    /// Every CPUID leaf exposed to the guest.
    #[serde(default, deserialize_with = "crate::bounded::cpuid")]
    pub cpuid: Vec<CpuidEntry>,
    /// The CPU model the guest was given; absent in snapshots written
    /// before stasis had CPU models (their guests saw the `host` model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestCpuRecord>,
}

/// The CPU model a guest was given, and what it came to on the host that
/// booted it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCpuRecord {
    /// The model's name, e.g. `"x86-64-v2"` or `"host"`.
    pub model: String,
    /// Feature changes on top of the model, e.g. `["+avx2", "-popcnt"]`.
    #[serde(default, deserialize_with = "crate::bounded::features")]
    pub changes: Vec<String>,
    /// Every feature the guest's CPUID advertises (Linux `/proc/cpuinfo`
    /// names), in CPUID order.
    #[serde(deserialize_with = "crate::bounded::features")]
    pub features: Vec<String>,
    /// Features the host's KVM put into the guest's CPUID although the
    /// model does not have them (a KVM that cannot hide them, such as
    /// PVM, which runs guest code natively); the guest saw them.
    #[serde(default, deserialize_with = "crate::bounded::features")]
    pub added_by_host: Vec<String>,
    /// The XSAVE components the guest may enable (its XCR0 mask).
    #[serde(default)]
    pub xcr0: u64,
}

impl GuestCpuRecord {
    /// The model with its changes as given on the command line, e.g.
    /// `x86-64-v2,+avx2,-popcnt`.
    pub fn spec(&self) -> String {
        std::iter::once(self.model.as_str())
            .chain(self.changes.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// One guest RAM region's place in guest physical memory and in `memory.img`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Region name, e.g. `"ram0"`; unique within the snapshot.
    pub name: String,
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Size in bytes; a multiple of `page_size`.
    pub size: u64,
    /// Offset of the first byte in the memory file; a multiple of 2 MiB.
    pub file_offset: u64,
}

/// The memory image's layout and checksums.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// Page size in bytes (4096): the unit of hole detection.
    pub page_size: u64,
    /// Checksum chunk size in bytes (2 MiB).
    pub chunk_size: u64,
    /// Memory file name inside the snapshot directory (`"memory.img"`).
    pub file: String,
    /// The memory file's length in bytes.
    pub file_size: u64,
    /// The regions, in file order.
    #[serde(deserialize_with = "crate::bounded::regions")]
    pub regions: Vec<MemoryRegion>,
    /// CRC-32C of each `chunk_size` bytes of the file (the last possibly
    /// short), holes read as zeros.
    #[serde(deserialize_with = "crate::bounded::chunks")]
    pub chunk_crc32c: Vec<u32>,
    /// Number of pages that are not all zero (the rest are holes). In a
    /// diff snapshot: the pages stored in this file.
    pub nonzero_pages: u64,
    /// Diff snapshots (format version 2): where each page's contents are
    /// (zero, in this file, or in the parent). Absent from full snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_map: Option<PageMapRef>,
}

/// The page map file of a diff snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageMapRef {
    /// File name inside the snapshot directory (`"page-map.bin"`).
    pub file: String,
    /// Its length: one 2-bit entry per page of all regions, 4 per byte.
    pub size: u64,
    /// CRC-32C of the whole file.
    pub crc32c: u32,
}

/// The snapshot a diff snapshot was taken against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent's `snapshot_id`.
    pub snapshot_id: String,
    /// The parent manifest's `body_crc32c`: the parent must not have
    /// changed since.
    pub body_crc32c: String,
    /// Where it is: relative to this snapshot's directory, or absolute.
    pub path: String,
}

/// Where one state section lives in `state.bin`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionEntry {
    /// Section name, e.g. `"vcpu"`, `"serial"`, `"kvm.pit2"`.
    pub name: String,
    /// Instance key, e.g. `"0"`, `"com1"`, a disk id.
    pub instance: String,
    /// Version of the payload's encoding, owned by the section's code.
    pub version: u32,
    /// Whether restore may go on without understanding this section.
    pub optional: bool,
    /// Offset of the payload in `state.bin`; a multiple of 8.
    pub offset: u64,
    /// Payload size in bytes.
    pub size: u64,
    /// CRC-32C of the payload.
    pub crc32c: u32,
}

/// The manifest body: everything about the snapshot but the bulk data.
///
/// Readers ignore fields they do not know, so later versions of stasis may
/// add optional fields (with `#[serde(default)]`) without bumping the
/// format version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestBody {
    /// Who wrote the snapshot.
    pub producer: Producer,
    /// When, in milliseconds since the Unix epoch (UTC).
    pub created_unix_ms: u64,
    /// The VMM's configuration of the VM, opaque to this crate.
    #[serde(default, deserialize_with = "crate::bounded::vm_config")]
    pub vm_config: serde_json::Value,
    /// The CPU and the guest's CPUID.
    pub cpu: CpuInfo,
    /// The memory image.
    pub memory: MemoryLayout,
    /// The state sections, in `state.bin` order.
    #[serde(deserialize_with = "crate::bounded::sections")]
    pub sections: Vec<SectionEntry>,
    /// State file name inside the snapshot directory (`"state.bin"`).
    pub state_file: String,
    /// The state file's length in bytes.
    pub state_size: u64,
    /// A random id (32 hex digits) given to every snapshot when written;
    /// children name their parent by it. Absent from older snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// Diff snapshots (format version 2): the snapshot whose memory pages
    /// marked "in the parent" come from. `None` for a full snapshot.
    #[serde(default)]
    pub parent: Option<ParentRef>,
    /// Free-form notes.
    #[serde(default, deserialize_with = "crate::bounded::notes")]
    pub notes: BTreeMap<String, String>,
}

/// A decoded, checked manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    /// The `format_version` of the file.
    pub format_version: u32,
    /// The checksum recorded (and verified) for the body.
    pub body_crc32c: u32,
    /// The body.
    pub body: ManifestBody,
}

/// The longest CPU model or feature name a manifest may hold.
const MAX_CPU_NAME_LEN: usize = 64;
/// The most feature names a list in `cpu.guest` may hold (x86 has fewer
/// than 1,000 feature bits).
pub(crate) const MAX_CPU_FEATURES: usize = 2048;

fn validate_guest_cpu(g: &GuestCpuRecord) -> Result<()> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= MAX_CPU_NAME_LEN
            && n.bytes().all(|c| c.is_ascii_graphic() || c == b' ')
    };
    if !name_ok(&g.model) {
        return Err(invalid(
            "cpu.guest.model",
            format!("must be 1-{MAX_CPU_NAME_LEN} printable ASCII characters"),
        ));
    }
    for (field, list) in [
        ("cpu.guest.changes", &g.changes),
        ("cpu.guest.features", &g.features),
        ("cpu.guest.added_by_host", &g.added_by_host),
    ] {
        if list.len() > MAX_CPU_FEATURES {
            return Err(invalid(
                field,
                format!("has {} entries (at most {MAX_CPU_FEATURES})", list.len()),
            ));
        }
        if let Some(i) = list.iter().position(|n| !name_ok(n)) {
            return Err(invalid(
                format!("{field}[{i}]"),
                format!("must be 1-{MAX_CPU_NAME_LEN} printable ASCII characters"),
            ));
        }
    }
    Ok(())
}

/// Serializes a body into a complete `manifest.json` text with the current
/// [`FORMAT_VERSION`] and the body checksum.
///
/// The body is pretty-printed (for people and `jq`) and indented by two
/// spaces inside the envelope; the checksum covers exactly those bytes.
pub fn encode_manifest(body: &ManifestBody) -> Result<String> {
    let pretty = serde_json::to_string_pretty(body)
        .map_err(|e| Error::ManifestBody(format!("cannot serialize: {e}")))?;
    // JSON strings cannot hold a raw newline, so this only re-indents.
    let body_text = pretty.replace('\n', "\n  ");
    let version = if body.parent.is_some() {
        crate::DIFF_FORMAT_VERSION
    } else {
        FORMAT_VERSION
    };
    Ok(seal_manifest_body(version, &body_text))
}

/// Wraps already-serialized body text in the envelope, computing its
/// checksum. `body_text` must be one JSON object; it is kept byte for byte.
pub fn seal_manifest_body(format_version: u32, body_text: &str) -> String {
    let crc = crc32c::crc32c(body_text.as_bytes());
    format!(
        "{{\n  \"format\": \"{FORMAT_NAME}\",\n  \"format_version\": {format_version},\n  \"body_crc32c\": \"{crc:08x}\",\n  \"body\": {body_text}\n}}\n"
    )
}

/// `s` as a checksum: exactly 8 hex digits (`from_str_radix` alone would
/// also take a sign, `+1234567`).
fn hex8(s: &str) -> Option<u32> {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// Parses and checks `manifest.json` bytes, in this order, with a distinct
/// error for each: not JSON or truncated; `format` missing or wrong;
/// `format_version` too new; checksum mismatch; body does not parse;
/// body values inconsistent (see [`validate_body`]).
pub fn decode_manifest(bytes: &[u8]) -> Result<Manifest> {
    // Well-formed JSON at all? (Catches truncation.)
    let whole: &RawValue =
        serde_json::from_slice(bytes).map_err(|e| Error::ManifestNotJson(e.to_string()))?;
    let fields: HashMap<String, &RawValue> = serde_json::from_str(whole.get())
        .map_err(|_| Error::NotASnapshot("manifest.json is not a JSON object".to_string()))?;

    match fields
        .get("format")
        .map(|v| serde_json::from_str::<String>(v.get()))
    {
        Some(Ok(f)) if f == FORMAT_NAME => {}
        Some(Ok(f)) => {
            return Err(Error::NotASnapshot(format!(
                "manifest format is {f:?}, expected {FORMAT_NAME:?}"
            )))
        }
        Some(Err(_)) => {
            return Err(Error::NotASnapshot(
                "manifest \"format\" is not a string".to_string(),
            ))
        }
        None => {
            return Err(Error::NotASnapshot(
                "manifest.json has no \"format\" field".to_string(),
            ))
        }
    }

    let version: u64 = match fields.get("format_version") {
        Some(v) => serde_json::from_str(v.get()).map_err(|_| {
            Error::ManifestInvalid(format!(
                "\"format_version\" is not an unsigned integer: {}",
                v.get()
            ))
        })?,
        None => {
            return Err(Error::ManifestInvalid(
                "no \"format_version\" field".to_string(),
            ))
        }
    };
    if version > u64::from(MAX_FORMAT_VERSION) {
        return Err(Error::FormatTooNew {
            found: version,
            max: MAX_FORMAT_VERSION,
        });
    }
    if version == 0 {
        return Err(Error::ManifestInvalid(
            "\"format_version\" 0 does not exist".to_string(),
        ));
    }

    let recorded = match fields.get("body_crc32c") {
        Some(v) => {
            let s: String = serde_json::from_str(v.get()).map_err(|_| {
                Error::ManifestInvalid("\"body_crc32c\" is not a string".to_string())
            })?;
            hex8(&s).ok_or_else(|| {
                Error::ManifestInvalid(format!("\"body_crc32c\" {s:?} is not 8 hex digits"))
            })?
        }
        None => {
            return Err(Error::ManifestInvalid(
                "no \"body_crc32c\" field".to_string(),
            ))
        }
    };
    let body_raw = fields
        .get("body")
        .ok_or_else(|| Error::ManifestInvalid("no \"body\" field".to_string()))?;
    let computed = crc32c::crc32c(body_raw.get().as_bytes());
    if computed != recorded {
        return Err(Error::ManifestChecksum { recorded, computed });
    }

    let body: ManifestBody =
        crate::text::from_json_str(body_raw.get()).map_err(Error::ManifestBody)?;
    // First: a diff snapshot must never be read as a full one (its
    // pages in the parent would read as zeros).
    if body.parent.is_some() && version < u64::from(crate::DIFF_FORMAT_VERSION) {
        return Err(invalid(
            "parent",
            format!(
                "a version-{version} snapshot cannot have a parent (diff snapshots are version {})",
                crate::DIFF_FORMAT_VERSION
            ),
        ));
    }
    validate_body(&body)?;
    Ok(Manifest {
        // Checked above: 1 ..= MAX_FORMAT_VERSION.
        format_version: version as u32,
        body_crc32c: recorded,
        body,
    })
}

/// Whether `s` is 1 to `max` bytes of printable text: no control
/// characters (which could reach a terminal when shown).
fn printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

/// Checks the free-text fields a person may be shown: the producer, the
/// CPU's vendor and model, region names, notes, section names and
/// instances (by the rules a writer follows).
fn validate_strings(b: &ManifestBody) -> Result<()> {
    let text = |field: &str, s: &str, max: usize| {
        if printable(s, max) {
            Ok(())
        } else {
            Err(invalid(
                field,
                format!(
                    "{} must be 1-{max} bytes without control characters",
                    crate::text::quoted(s)
                ),
            ))
        }
    };
    text("producer.name", &b.producer.name, 64)?;
    text("producer.version", &b.producer.version, 64)?;
    if !b.cpu.vendor.is_empty() {
        text("cpu.vendor", &b.cpu.vendor, 64)?;
    }
    if !b.cpu.model.is_empty() {
        text("cpu.model", &b.cpu.model, 256)?;
    }
    for (i, r) in b.memory.regions.iter().enumerate() {
        text(&format!("memory.regions[{i}].name"), &r.name, 64)?;
    }
    for (k, v) in &b.notes {
        text("notes", k, 64)?;
        if v.len() > 4096 || v.chars().any(|c| c.is_control() && c != '\n') {
            return Err(invalid(
                format!("notes[{}]", crate::text::quoted(k)),
                "must be at most 4096 bytes without control characters other than newlines",
            ));
        }
    }
    for (i, s) in b.sections.iter().enumerate() {
        if let Err(Error::BadSection { detail, .. }) =
            crate::section::check_key(&s.name, &s.instance)
        {
            return Err(invalid(
                format!("sections[{i}]"),
                format!(
                    "{}/{}: {detail}",
                    crate::text::quoted(&s.name),
                    crate::text::quoted(&s.instance)
                ),
            ));
        }
        if s.size > MAX_SECTION_SIZE {
            return Err(invalid(
                format!("sections[{i}].size"),
                format!(
                    "{} bytes; a section is at most {} MiB",
                    s.size,
                    MAX_SECTION_SIZE >> 20
                ),
            ));
        }
    }
    Ok(())
}

/// The largest state section a reader accepts: a whole section is read
/// into memory, so a snapshot must not choose how much (the largest a
/// stasis VM writes is tens of KiB).
pub const MAX_SECTION_SIZE: u64 = 16 << 20;

/// Checks a snapshot id: 32 lowercase hex digits.
fn check_snapshot_id(field: &str, id: &str) -> Result<()> {
    if id.len() != 32
        || !id
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return Err(invalid(field, "is not 32 lowercase hex digits"));
    }
    Ok(())
}

/// Checks that a file name from the manifest is a plain name inside the
/// snapshot directory (no path separators, not `.`/`..`, not hidden).
fn check_file_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('.')
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 255
    {
        return Err(invalid(
            field,
            format!("{name:?} is not a plain file name inside the snapshot directory"),
        ));
    }
    Ok(())
}

/// Checks every value of a body for consistency, so that readers can trust
/// offsets and sizes afterwards: files are plain names, regions are aligned,
/// inside the memory file, in file order, and do not overlap in the file or
/// in guest physical memory; the chunk list has the right length; sections
/// are aligned, inside `state.bin`, do not overlap, and are unique.
///
/// File sizes on disk are checked separately when a snapshot is opened.
pub fn validate_body(b: &ManifestBody) -> Result<()> {
    if let Some(g) = &b.cpu.guest {
        validate_guest_cpu(g)?;
    }
    validate_strings(b)?;
    let m = &b.memory;
    check_file_name("memory.file", &m.file)?;
    if let Some(id) = &b.snapshot_id {
        check_snapshot_id("snapshot_id", id)?;
    }
    match (&b.parent, &m.page_map) {
        (Some(p), Some(pm)) => {
            check_snapshot_id("parent.snapshot_id", &p.snapshot_id)?;
            if hex8(&p.body_crc32c).is_none() {
                return Err(invalid("parent.body_crc32c", "is not 8 hex digits"));
            }
            if p.path.is_empty() || p.path.len() > 4096 || p.path.contains('\0') {
                return Err(invalid("parent.path", "must be 1-4096 bytes without NUL"));
            }
            check_file_name("memory.page_map.file", &pm.file)?;
            if [crate::MANIFEST_FILE, m.file.as_str(), b.state_file.as_str()]
                .contains(&pm.file.as_str())
            {
                return Err(invalid("memory.page_map.file", "must be a file of its own"));
            }
            let pages = m
                .regions
                .iter()
                .try_fold(0u64, |n, r| n.checked_add(r.size / m.page_size.max(1)));
            let Some(pages) = pages else {
                return Err(invalid("memory.regions", "sizes overflow"));
            };
            if pm.size != pages.div_ceil(4) {
                return Err(invalid(
                    "memory.page_map.size",
                    format!(
                        "{} bytes, but {pages} pages need {}",
                        pm.size,
                        pages.div_ceil(4)
                    ),
                ));
            }
        }
        (None, None) => {}
        (Some(_), None) => {
            return Err(invalid(
                "memory.page_map",
                "a diff snapshot needs a page map",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                "memory.page_map",
                "only a diff snapshot (with a parent) has a page map",
            ))
        }
    }
    check_file_name("state_file", &b.state_file)?;
    if m.file == b.state_file
        || m.file == crate::MANIFEST_FILE
        || b.state_file == crate::MANIFEST_FILE
    {
        return Err(invalid(
            "memory.file",
            "memory file, state file and manifest must be different files",
        ));
    }
    if m.page_size != PAGE_SIZE {
        return Err(invalid(
            "memory.page_size",
            format!("{} is not supported (must be {PAGE_SIZE})", m.page_size),
        ));
    }
    if !m.chunk_size.is_power_of_two() || m.chunk_size < m.page_size || m.chunk_size > 1 << 30 {
        return Err(invalid(
            "memory.chunk_size",
            format!(
                "{} is not a power of two between page_size and 1 GiB",
                m.chunk_size
            ),
        ));
    }
    let chunks = m.file_size.div_ceil(m.chunk_size);
    if chunks != m.chunk_crc32c.len() as u64 {
        return Err(invalid(
            "memory.chunk_crc32c",
            format!(
                "has {} entries, but file_size {} needs {chunks} chunks of {}",
                m.chunk_crc32c.len(),
                m.file_size,
                m.chunk_size
            ),
        ));
    }
    if m.nonzero_pages > m.file_size / m.page_size {
        return Err(invalid(
            "memory.nonzero_pages",
            format!(
                "{} is more than the {} pages in the file",
                m.nonzero_pages,
                m.file_size / m.page_size
            ),
        ));
    }
    let mut names = HashSet::new();
    let mut file_end = 0u64;
    for (i, r) in m.regions.iter().enumerate() {
        let f = |name: &str| format!("memory.regions[{i}].{name}");
        if r.name.is_empty() || !names.insert(r.name.as_str()) {
            return Err(invalid(
                f("name"),
                format!("{:?} is empty or not unique", r.name),
            ));
        }
        if r.size == 0 || r.size % m.page_size != 0 {
            return Err(invalid(
                f("size"),
                format!(
                    "{} is not a non-zero multiple of page_size {}",
                    r.size, m.page_size
                ),
            ));
        }
        if r.file_offset % REGION_ALIGN != 0 {
            return Err(invalid(
                f("file_offset"),
                format!("{:#x} is not a multiple of 2 MiB", r.file_offset),
            ));
        }
        if r.gpa % m.page_size != 0 {
            return Err(invalid(
                f("gpa"),
                format!("{:#x} is not page aligned", r.gpa),
            ));
        }
        if r.gpa.checked_add(r.size).is_none() {
            return Err(invalid(
                f("size"),
                format!("gpa {:#x} + size {:#x} overflows", r.gpa, r.size),
            ));
        }
        if r.file_offset < file_end {
            return Err(invalid(
                f("file_offset"),
                format!(
                    "{:#x} overlaps the previous region (which ends at {file_end:#x}) or is out of order",
                    r.file_offset
                ),
            ));
        }
        let end = r
            .file_offset
            .checked_add(r.size)
            .filter(|&e| e <= m.file_size);
        match end {
            Some(e) => file_end = e,
            None => {
                return Err(invalid(
                    f("size"),
                    format!(
                        "region at file offset {:#x} of size {:#x} extends beyond the memory file (file_size {:#x})",
                        r.file_offset, r.size, m.file_size
                    ),
                ))
            }
        }
    }
    let mut by_gpa: Vec<&crate::MemoryRegion> = m.regions.iter().collect();
    by_gpa.sort_by_key(|r| r.gpa);
    for w in by_gpa.windows(2) {
        if w[0].gpa + w[0].size > w[1].gpa {
            return Err(invalid(
                "memory.regions",
                format!(
                    "regions {:?} and {:?} overlap in guest physical memory",
                    w[0].name, w[1].name
                ),
            ));
        }
    }

    let mut keys = HashSet::new();
    let mut state_end = 0u64;
    for (i, s) in b.sections.iter().enumerate() {
        let f = |name: &str| format!("sections[{i}].{name} ('{}'/'{}')", s.name, s.instance);
        if s.name.is_empty() {
            return Err(invalid(f("name"), "empty section name"));
        }
        if !keys.insert((s.name.as_str(), s.instance.as_str())) {
            return Err(invalid(
                f("instance"),
                "duplicate section name and instance",
            ));
        }
        if s.offset % SECTION_ALIGN != 0 {
            return Err(invalid(
                f("offset"),
                format!("{} is not a multiple of {SECTION_ALIGN}", s.offset),
            ));
        }
        if s.offset < state_end {
            return Err(invalid(
                f("offset"),
                format!(
                    "{} overlaps the previous section (which ends at {state_end}) or is out of order",
                    s.offset
                ),
            ));
        }
        match s.offset.checked_add(s.size).filter(|&e| e <= b.state_size) {
            Some(e) => state_end = e,
            None => {
                return Err(invalid(
                    f("offset"),
                    format!(
                        "offset {} + size {} is beyond the end of {} (state_size {})",
                        s.offset, s.size, b.state_file, b.state_size
                    ),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> ManifestBody {
        ManifestBody {
            producer: Producer::this(),
            created_unix_ms: 1,
            vm_config: serde_json::json!({"vcpus": 2, "name": "a\nb"}),
            cpu: CpuInfo::default(),
            memory: MemoryLayout {
                page_size: 4096,
                chunk_size: 2 << 20,
                file: "memory.img".into(),
                file_size: 0,
                regions: vec![],
                chunk_crc32c: vec![],
                nonzero_pages: 0,
                page_map: None,
            },
            sections: vec![],
            state_file: "state.bin".into(),
            state_size: 0,
            snapshot_id: None,
            parent: None,
            notes: BTreeMap::new(),
        }
    }

    #[test]
    fn seal_and_open() {
        let text = encode_manifest(&body()).unwrap();
        let m = decode_manifest(text.as_bytes()).unwrap();
        assert_eq!(m.body, body());
        assert_eq!(m.format_version, FORMAT_VERSION);
        // jq-readable: plain JSON with the body as an object.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["body"]["vm_config"]["vcpus"], 2);
    }

    #[test]
    fn a_checksum_is_exactly_eight_hex_digits() {
        // A body whose checksum starts with 0, so that `+` and its other
        // seven digits name the same number.
        let (text, crc) = (1u64..)
            .map(|ms| {
                let mut b = body();
                b.created_unix_ms = ms;
                let text = encode_manifest(&b).unwrap();
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                (text, v["body_crc32c"].as_str().unwrap().to_string())
            })
            .find(|(_, crc)| crc.starts_with('0'))
            .unwrap();
        assert!(decode_manifest(text.as_bytes()).is_ok());
        for bad in [
            format!("+{}", &crc[1..]),
            format!(" {}", &crc[1..]),
            crc.to_uppercase() + "0",
        ] {
            let forged = text.replacen(&crc, &bad, 1);
            let e = decode_manifest(forged.as_bytes()).unwrap_err().to_string();
            assert!(e.contains("is not 8 hex digits"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn unknown_body_fields_are_ignored() {
        let mut v = serde_json::to_value(body()).unwrap();
        v["some_future_field"] = serde_json::json!({"x": 1});
        let text = seal_manifest_body(1, &serde_json::to_string(&v).unwrap());
        assert!(decode_manifest(text.as_bytes()).is_ok());
    }
}
