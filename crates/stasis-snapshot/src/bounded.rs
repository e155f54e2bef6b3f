//! Deserializers with limits, for the arrays, maps and free-form values
//! of a manifest: a file may claim a hundred million elements, and the
//! limit must stop the parse before they are all in memory, not after.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

/// Most memory regions in one snapshot.
pub const MAX_REGIONS: usize = 256;
/// Most state sections in one snapshot.
pub const MAX_SECTIONS: usize = 65_536;
/// Most memory chunk checksums (16 TiB of memory in 2 MiB chunks).
pub const MAX_CHUNKS: usize = 8 << 20;
/// Most CPUID leaves recorded for a CPU.
pub const MAX_CPUID_LEAVES: usize = 4096;
/// Most entries of `notes`.
pub const MAX_NOTES: usize = 256;
/// Largest `vm_config`, in bytes of JSON text.
pub const MAX_VM_CONFIG_BYTES: usize = 1 << 20;

struct SeqVisitor<T>(usize, PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for SeqVisitor<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an array of at most {} elements", self.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(x) = seq.next_element()? {
            if out.len() == self.0 {
                return Err(A::Error::custom(format!(
                    "has more than {} elements",
                    self.0
                )));
            }
            out.push(x);
        }
        Ok(out)
    }
}

/// A JSON array of at most `max` elements, refused at element `max + 1`.
pub fn seq<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    max: usize,
) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(SeqVisitor(max, PhantomData))
}

/// `regions`: at most [`MAX_REGIONS`].
pub fn regions<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    seq(d, MAX_REGIONS)
}

/// `sections`: at most [`MAX_SECTIONS`].
pub fn sections<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    seq(d, MAX_SECTIONS)
}

/// `chunk_crc32c`: at most [`MAX_CHUNKS`].
pub fn chunks<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    seq(d, MAX_CHUNKS)
}

/// `cpu.cpuid`: at most [`MAX_CPUID_LEAVES`].
pub fn cpuid<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    seq(d, MAX_CPUID_LEAVES)
}

/// Lists of CPU feature names: at most [`crate::manifest::MAX_CPU_FEATURES`].
pub fn features<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    seq(d, crate::manifest::MAX_CPU_FEATURES)
}

struct MapVisitor(usize);

impl<'de> Visitor<'de> for MapVisitor {
    type Value = BTreeMap<String, String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an object of at most {} strings", self.0)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some((k, v)) = map.next_entry::<String, String>()? {
            if out.len() == self.0 {
                return Err(A::Error::custom(format!(
                    "has more than {} entries",
                    self.0
                )));
            }
            out.insert(k, v);
        }
        Ok(out)
    }
}

/// `notes`: at most [`MAX_NOTES`] string entries.
pub fn notes<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    d.deserialize_map(MapVisitor(MAX_NOTES))
}

/// A free-form JSON value of at most [`MAX_VM_CONFIG_BYTES`] of text: its
/// text is taken whole (without building anything), measured, and only
/// then parsed.
pub fn vm_config<'de, D: Deserializer<'de>>(d: D) -> Result<serde_json::Value, D::Error> {
    let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
    if raw.get().len() > MAX_VM_CONFIG_BYTES {
        return Err(D::Error::custom(format!(
            "is {} bytes of JSON, more than the {MAX_VM_CONFIG_BYTES} allowed",
            raw.get().len()
        )));
    }
    serde_json::from_str(raw.get()).map_err(D::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct Three {
        #[serde(deserialize_with = "three")]
        #[allow(dead_code)]
        v: Vec<u32>,
    }

    fn three<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        seq(d, 3)
    }

    #[test]
    fn a_long_array_is_refused_at_the_first_element_too_many() {
        assert!(serde_json::from_str::<Three>(r#"{"v":[1,2,3]}"#).is_ok());
        let e = serde_json::from_str::<Three>(r#"{"v":[1,2,3,4,"not even parsed"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("has more than 3 elements"), "{e}");
    }
}
