//! Serde helper: byte arrays as lowercase hex strings.
//!
//! Section payloads are JSON; a `Vec<u8>` would otherwise become an array
//! of numbers, four to five times larger and unreadable. Use it on a field:
//!
//! ```
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct LapicState {
//!     #[serde(with = "stasis_snapshot::hex_bytes")]
//!     regs: Vec<u8>,
//!     #[serde(with = "stasis_snapshot::hex_bytes")]
//!     id: [u8; 4],
//! }
//! let s = LapicState { regs: vec![0xde, 0xad], id: [1, 2, 3, 4] };
//! let json = serde_json::to_string(&s).unwrap();
//! assert_eq!(json, r#"{"regs":"dead","id":"01020304"}"#);
//! let back: LapicState = serde_json::from_str(&json).unwrap();
//! assert_eq!(back.id, [1, 2, 3, 4]);
//! ```
//!
//! Serializing works for anything that is `AsRef<[u8]>`; deserializing for
//! anything that is `TryFrom<Vec<u8>>` (`Vec<u8>`, `[u8; N]`, ...). Upper-
//! and lowercase digits are accepted on input.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serializer};

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Encodes bytes as a lowercase hex string.
pub fn encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// Decodes a hex string (either case) into bytes.
pub fn decode(s: &str) -> Result<Vec<u8>, String> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return Err(format!("hex string has odd length {}", s.len()));
    }
    fn nibble(c: u8, at: usize) -> Result<u8, String> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!(
                "invalid hex digit {:?} at position {at}",
                c as char
            )),
        }
    }
    s.chunks_exact(2)
        .enumerate()
        .map(|(i, p)| Ok(nibble(p[0], 2 * i)? << 4 | nibble(p[1], 2 * i + 1)?))
        .collect()
}

/// Serde `serialize_with` function: writes the bytes as a hex string.
pub fn serialize<T, S>(bytes: &T, serializer: S) -> Result<S::Ok, S::Error>
where
    T: AsRef<[u8]> + ?Sized,
    S: Serializer,
{
    serializer.serialize_str(&encode(bytes.as_ref()))
}

/// Serde `deserialize_with` function: reads a hex string into bytes.
pub fn deserialize<'de, T, D>(deserializer: D) -> Result<T, D::Error>
where
    T: TryFrom<Vec<u8>>,
    D: Deserializer<'de>,
{
    let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
    let bytes = decode(&s).map_err(D::Error::custom)?;
    let len = bytes.len();
    T::try_from(bytes)
        .map_err(|_| D::Error::custom(format!("hex string of {len} bytes has the wrong length")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(&encode(&all)).unwrap(), all);
        assert_eq!(decode("ABcd").unwrap(), vec![0xab, 0xcd]);
        assert!(decode("abc").is_err());
        assert!(decode("zz").is_err());
    }

    #[test]
    fn fixed_array_length_checked() {
        #[derive(serde::Deserialize, Debug)]
        struct A {
            #[serde(with = "super")]
            #[allow(dead_code)]
            a: [u8; 2],
        }
        assert!(serde_json::from_str::<A>(r#"{"a":"0102"}"#).is_ok());
        let e = serde_json::from_str::<A>(r#"{"a":"010203"}"#).unwrap_err();
        assert!(e.to_string().contains("wrong length"), "{e}");
    }
}
