//! State sections: named, instance-keyed, versioned blobs, and the rules
//! for sections a reader does not know.
//!
//! # Owning a section
//!
//! The code that saves a piece of state owns its section: it defines a
//! state struct, gives it a [`SectionState::NAME`] and a
//! [`SectionState::VERSION`], and the payload is that struct as JSON.
//!
//! * Adding a field: give it `#[serde(default)]` (so payloads written before
//!   it still decode). No version bump.
//! * Changing a field's meaning or type, removing or renaming one: bump
//!   `VERSION`, keep the old struct (renamed, e.g. `SerialStateV1`), and
//!   teach [`SectionState::upgrade`] to decode the old payload and turn it
//!   into the current struct. Old decoders are never deleted.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use stasis_snapshot::{decode_json, SectionState};
//!
//! #[derive(Serialize, Deserialize)]
//! struct SerialStateV1 { ier: u8 }
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct SerialState { ier: u8, fifo: Vec<u8> }
//!
//! impl SectionState for SerialState {
//!     const NAME: &'static str = "serial";
//!     const VERSION: u32 = 2;
//!     fn upgrade(version: u32, payload: &[u8]) -> Result<Self, String> {
//!         match version {
//!             1 => {
//!                 let old: SerialStateV1 = decode_json(payload)?;
//!                 Ok(SerialState { ier: old.ier, fifo: Vec::new() })
//!             }
//!             v => Err(format!("no decoder for version {v}")),
//!         }
//!     }
//! }
//!
//! let v1 = br#"{"ier": 3}"#;
//! let s = stasis_snapshot::decode_section::<SerialState>("com1", 1, v1).unwrap();
//! assert_eq!(s, SerialState { ier: 3, fifo: vec![] });
//! ```

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::manifest::SectionEntry;

/// A state struct stored as one section.
pub trait SectionState: Serialize + DeserializeOwned {
    /// The section name, e.g. `"serial"`.
    const NAME: &'static str;
    /// The current payload version, starting at 1.
    const VERSION: u32;

    /// Decodes a payload written with an older `version` (below
    /// [`Self::VERSION`]) and converts it to the current struct.
    ///
    /// The default knows no older versions. Implementations match on the
    /// version, decode the old struct with [`decode_json`], and convert.
    fn upgrade(version: u32, payload: &[u8]) -> Result<Self, String> {
        let _ = payload;
        Err(format!(
            "no decoder for version {version} (current is {})",
            Self::VERSION
        ))
    }
}

/// Decodes a JSON payload into `T`; the error is a plain message, as
/// [`SectionState::upgrade`] wants.
pub fn decode_json<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    crate::text::from_json_slice(payload)
}

/// Encodes a state struct as a section payload (compact JSON).
pub fn encode_section<T: SectionState>(state: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(state).map_err(|e| Error::BadSection {
        name: T::NAME.to_string(),
        instance: String::new(),
        detail: format!("cannot serialize: {e}"),
    })
}

/// Decodes a payload of section `T::NAME`/`instance` written with
/// `version`: the current version directly, older ones through
/// [`SectionState::upgrade`]; newer ones are an [`Error::SectionTooNew`].
pub fn decode_section<T: SectionState>(instance: &str, version: u32, payload: &[u8]) -> Result<T> {
    let fail = |detail: String| Error::SectionDecode {
        name: T::NAME.to_string(),
        instance: instance.to_string(),
        version,
        detail,
    };
    if version > T::VERSION {
        Err(Error::SectionTooNew {
            name: T::NAME.to_string(),
            instance: instance.to_string(),
            version,
            max: T::VERSION,
        })
    } else if version == T::VERSION {
        decode_json(payload).map_err(fail)
    } else {
        T::upgrade(version, payload).map_err(fail)
    }
}

/// The set of sections (and the newest version of each) that a restoring
/// stasis understands. Build it from the state types:
///
/// ```
/// # use stasis_snapshot::KnownSections;
/// let known = KnownSections::new().with_name("vcpu", 1).with_name("serial", 2);
/// assert_eq!(known.max_version("serial"), Some(2));
/// assert_eq!(known.max_version("nvme"), None);
/// ```
#[derive(Clone, Debug, Default)]
pub struct KnownSections {
    max: BTreeMap<String, u32>,
}

impl KnownSections {
    /// An empty set.
    pub fn new() -> KnownSections {
        KnownSections::default()
    }

    /// Adds a section type.
    pub fn with<T: SectionState>(self) -> KnownSections {
        self.with_name(T::NAME, T::VERSION)
    }

    /// Adds a section by name and newest understood version.
    pub fn with_name(mut self, name: &str, max_version: u32) -> KnownSections {
        self.max.insert(name.to_string(), max_version);
        self
    }

    /// The newest understood version of `name`, or `None` if unknown.
    pub fn max_version(&self, name: &str) -> Option<u32> {
        self.max.get(name).copied()
    }
}

/// A section that restore will skip, reported by [`check_known`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionWarning {
    /// Section name.
    pub name: String,
    /// Section instance.
    pub instance: String,
    /// Its version in the snapshot.
    pub version: u32,
    /// Human-readable explanation.
    pub message: String,
}

impl std::fmt::Display for SectionWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Most warnings [`summarize_warnings`] lists one by one.
pub const WARNINGS_LISTED: usize = 5;

/// The lines to show for `warnings`: each of the first few, then one line
/// counting the rest and naming (some of) their sections, so that a
/// snapshot with 100,000 unknown sections prints a few lines, not
/// megabytes.
pub fn summarize_warnings(warnings: &[SectionWarning]) -> Vec<String> {
    let mut lines: Vec<String> = warnings
        .iter()
        .take(WARNINGS_LISTED)
        .map(|w| w.message.clone())
        .collect();
    if warnings.len() > WARNINGS_LISTED {
        let rest = &warnings[WARNINGS_LISTED..];
        let mut names: Vec<&str> = rest.iter().map(|w| w.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let shown = names.len().min(5);
        lines.push(format!(
            "skipping {} more optional sections ({}{})",
            rest.len(),
            names[..shown].join(", "),
            if names.len() > shown {
                format!(" and {} other names", names.len() - shown)
            } else {
                String::new()
            }
        ));
    }
    lines
}

/// Checks a snapshot's sections against what this build understands.
///
/// `known(name)` returns the newest version of `name` that restore can
/// decode, or `None` if it does not know the section at all. For each
/// section that is unknown or newer than known:
///
/// * optional: a [`SectionWarning`] (shown by the caller, through
///   [`summarize_warnings`]); restore skips the section;
/// * required: an error naming the section, instance and version
///   ([`Error::UnknownSection`] or [`Error::SectionTooNew`]); the first such
///   section in file order is reported.
pub fn check_known(
    sections: &[SectionEntry],
    known: &dyn Fn(&str) -> Option<u32>,
) -> Result<Vec<SectionWarning>> {
    let mut warnings = Vec::new();
    for s in sections {
        let max = known(&s.name);
        if matches!(max, Some(max) if s.version <= max) {
            continue;
        }
        if !s.optional {
            return Err(match max {
                Some(max) => Error::SectionTooNew {
                    name: s.name.clone(),
                    instance: s.instance.clone(),
                    version: s.version,
                    max,
                },
                None => Error::UnknownSection {
                    name: s.name.clone(),
                    instance: s.instance.clone(),
                    version: s.version,
                },
            });
        }
        let message = match max {
            Some(max) => format!(
                "skipping optional section '{}'/'{}' version {}: this stasis reads it only up to version {max}",
                s.name, s.instance, s.version
            ),
            None => format!(
                "skipping optional section '{}'/'{}' version {}, which this stasis does not know",
                s.name, s.instance, s.version
            ),
        };
        warnings.push(SectionWarning {
            name: s.name.clone(),
            instance: s.instance.clone(),
            version: s.version,
            message,
        });
    }
    Ok(warnings)
}

/// Checks a section name and instance before writing: the name is
/// non-empty ASCII letters, digits, `.`, `_`, `-` (at most 64 bytes); the
/// instance is at most 255 bytes without control characters.
pub(crate) fn check_key(name: &str, instance: &str) -> Result<()> {
    let bad = |detail: &str| {
        Err(Error::BadSection {
            name: name.to_string(),
            instance: instance.to_string(),
            detail: detail.to_string(),
        })
    };
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    {
        return bad("section names are 1-64 ASCII letters, digits, '.', '_' or '-'");
    }
    if instance.len() > 255 || instance.chars().any(char::is_control) {
        return bad("instances are at most 255 bytes without control characters");
    }
    Ok(())
}

/// Where a VM's state sections go: a snapshot's `state.bin`
/// ([`crate::SnapshotWriter`]) or a migration stream. A VM's state is
/// serialised once, by the code that owns each section, whatever it goes
/// to.
pub trait SectionSink {
    /// Adds a section whose payload is already encoded.
    fn add_raw_section(
        &mut self,
        name: &str,
        instance: &str,
        version: u32,
        optional: bool,
        bytes: &[u8],
    ) -> Result<()>;
}

/// Adds `state` to `sink` as section `T::NAME`/`instance`, version
/// `T::VERSION`.
pub fn add_section<T: SectionState>(
    sink: &mut dyn SectionSink,
    instance: &str,
    optional: bool,
    state: &T,
) -> Result<()> {
    let bytes = encode_section(state)?;
    sink.add_raw_section(T::NAME, instance, T::VERSION, optional, &bytes)
}

/// Where a VM's state sections come from: a snapshot
/// ([`crate::SnapshotReader`]) or the sections a migration received
/// ([`SectionSet`]).
pub trait SectionSource {
    /// Every section, in the order written.
    fn entries(&self) -> &[SectionEntry];
    /// A section's payload, its checksum checked.
    fn payload(&self, entry: &SectionEntry) -> Result<Vec<u8>>;
}

/// Reads and decodes section `T::NAME`/`instance` from `source`, upgrading
/// an older version through [`SectionState::upgrade`]: the version stored
/// and the state, or `None` when there is no such section.
pub fn read_section<T: SectionState, S: SectionSource + ?Sized>(
    source: &S,
    instance: &str,
) -> Result<Option<(u32, T)>> {
    let Some(entry) = source
        .entries()
        .iter()
        .find(|s| s.name == T::NAME && s.instance == instance)
    else {
        return Ok(None);
    };
    if entry.version > T::VERSION {
        // An optional section of a newer version is skipped, as
        // `check_known` promised: the reader goes on as if it were absent.
        if entry.optional {
            return Ok(None);
        }
        return Err(Error::SectionTooNew {
            name: entry.name.clone(),
            instance: entry.instance.clone(),
            version: entry.version,
            max: T::VERSION,
        });
    }
    let bytes = source.payload(entry)?;
    let state = decode_section::<T>(instance, entry.version, &bytes)?;
    Ok(Some((entry.version, state)))
}

/// Sections held in memory, as a migration receives them; bounded in
/// count and in bytes, names checked as a snapshot's are.
#[derive(Debug, Default)]
pub struct SectionSet {
    entries: Vec<SectionEntry>,
    payloads: Vec<Vec<u8>>,
    bytes: u64,
}

impl SectionSet {
    /// The most sections a set holds.
    pub const MAX_SECTIONS: usize = 4096;
    /// The most payload bytes a set holds in all.
    pub const MAX_BYTES: u64 = 256 << 20;

    /// An empty set.
    pub fn new() -> SectionSet {
        SectionSet::default()
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl SectionSink for SectionSet {
    fn add_raw_section(
        &mut self,
        name: &str,
        instance: &str,
        version: u32,
        optional: bool,
        bytes: &[u8],
    ) -> Result<()> {
        check_key(name, instance)?;
        let refuse = |detail: String| {
            Err(Error::BadSection {
                name: name.to_string(),
                instance: instance.to_string(),
                detail,
            })
        };
        if self
            .entries
            .iter()
            .any(|s| s.name == name && s.instance == instance)
        {
            return refuse("sent twice".into());
        }
        if self.entries.len() >= Self::MAX_SECTIONS {
            return refuse(format!("more than {} sections", Self::MAX_SECTIONS));
        }
        if self.bytes + bytes.len() as u64 > Self::MAX_BYTES {
            return refuse(format!(
                "state sections exceed {} MiB in all",
                Self::MAX_BYTES >> 20
            ));
        }
        self.bytes += bytes.len() as u64;
        self.entries.push(SectionEntry {
            name: name.to_string(),
            instance: instance.to_string(),
            version,
            optional,
            offset: 0,
            size: bytes.len() as u64,
            crc32c: crc32c::crc32c(bytes),
        });
        self.payloads.push(bytes.to_vec());
        Ok(())
    }
}

impl SectionSource for SectionSet {
    fn entries(&self) -> &[SectionEntry] {
        &self.entries
    }

    fn payload(&self, entry: &SectionEntry) -> Result<Vec<u8>> {
        let i = self
            .entries
            .iter()
            .position(|s| s.name == entry.name && s.instance == entry.instance)
            .ok_or_else(|| Error::BadSection {
                name: entry.name.clone(),
                instance: entry.instance.clone(),
                detail: "not in this set".into(),
            })?;
        Ok(self.payloads[i].clone())
    }
}

#[cfg(test)]
mod set_tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Uart {
        ier: u8,
    }
    impl SectionState for Uart {
        const NAME: &'static str = "serial";
        const VERSION: u32 = 2;
    }

    #[test]
    fn a_set_round_trips_sections_and_refuses_duplicates_and_bad_names() {
        let mut set = SectionSet::new();
        add_section(&mut set, "com1", false, &Uart { ier: 5 }).unwrap();
        let (v, got) = read_section::<Uart, _>(&set, "com1").unwrap().unwrap();
        assert_eq!((v, got), (2, Uart { ier: 5 }));
        assert!(read_section::<Uart, _>(&set, "com2").unwrap().is_none());
        let e = add_section(&mut set, "com1", false, &Uart { ier: 1 }).unwrap_err();
        assert!(e.to_string().contains("sent twice"), "{e}");
        assert!(set
            .add_raw_section("bad name", "x", 1, false, b"{}")
            .is_err());
        set.add_raw_section("serial", "com3", 3, false, b"{}")
            .unwrap();
        let e = read_section::<Uart, _>(&set, "com3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 3"), "{e}");
    }
}
