//! Memory sizes as users write them: `512` (MiB), `"512M"`, `"2G"`, `"1GiB"`.

/// A memory size that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size '{0}': expected a number of MiB or a number with a unit M, MiB, G or GiB (e.g. 512, 512M, 2G)")]
pub struct SizeParseError(pub String);

/// Parses a size into MiB. A bare number is MiB; `M`/`MiB`/`MB` and
/// `G`/`GiB`/`GB` are accepted (all binary units). Sizes that are not a
/// whole number of MiB are refused.
pub fn parse_size_mib(text: &str) -> Result<u64, SizeParseError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| SizeParseError(text.to_string()))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mib" | "mb" => 1,
        "g" | "gib" | "gb" => 1024,
        _ => return Err(SizeParseError(text.to_string())),
    };
    n.checked_mul(factor)
        .ok_or_else(|| SizeParseError(text.to_string()))
}

/// serde support for `memory = 512` or `memory = "2G"`; always writes MiB.
pub(crate) mod mib_serde {
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = u64;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of MiB or a string such as \"512M\" or \"2G\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("memory must not be negative ({v})")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
                Ok(v)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
                super::parse_size_mib(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}
