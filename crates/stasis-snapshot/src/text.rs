//! Turning what a file says into what a person reads: JSON errors that
//! name the field (`memory.regions[0].size must be an unsigned integer`)
//! instead of a line and column, and strings from a file quoted, escaped
//! and cut short so that a crafted name can neither fill the screen nor
//! send escape sequences to the user's terminal.

use serde::de::DeserializeOwned;

/// Longest piece of a string from a file shown in a message.
pub const SHOWN_CHARS: usize = 64;

/// `s` in double quotes, every control or non-printing character escaped,
/// at most [`SHOWN_CHARS`] characters of it (then `…` and its length).
pub fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(SHOWN_CHARS * 2) + 2);
    out.push('"');
    for (shown, c) in s.chars().enumerate() {
        if shown == SHOWN_CHARS {
            out.push_str(&format!("\"… ({} bytes)", s.len()));
            return out;
        }
        out.extend(c.escape_debug());
    }
    out.push('"');
    out
}

/// Like [`quoted`], for bytes that may not be UTF-8.
pub fn quoted_bytes(b: &[u8]) -> String {
    quoted(&String::from_utf8_lossy(b))
}

/// Parses JSON text into `T`; an error names the field by its path.
pub fn from_json_str<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let v = serde_path_to_error::deserialize(&mut de).map_err(describe)?;
    de.end().map_err(|e| describe_plain("", &e))?;
    Ok(v)
}

/// Parses JSON bytes into `T`; an error names the field by its path.
pub fn from_json_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = serde_path_to_error::deserialize(&mut de).map_err(describe)?;
    de.end().map_err(|e| describe_plain("", &e))?;
    Ok(v)
}

/// Converts a JSON value into `T`; an error names the field by its path.
pub fn from_json_value<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(v).map_err(describe)
}

fn describe(e: serde_path_to_error::Error<serde_json::Error>) -> String {
    // The path holds map keys from the input: escaped and cut like any
    // other string from a file.
    let path = shorten(&e.path().to_string());
    let path = if path == "." { String::new() } else { path };
    describe_plain(&path, e.inner())
}

/// `e`'s message without its position, about the field at `path` (empty:
/// the whole value).
fn describe_plain(path: &str, e: &serde_json::Error) -> String {
    let mut msg = e.to_string();
    let at = format!(" at line {} column {}", e.line(), e.column());
    if let Some(stripped) = msg.strip_suffix(&at) {
        msg = stripped.to_string();
    }
    let subject = if path.is_empty() {
        "the value".to_string()
    } else {
        path.to_string()
    };
    if let Some(rest) = msg
        .strip_prefix("invalid type: ")
        .or_else(|| msg.strip_prefix("invalid value: "))
    {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return format!(
                "{subject} must be {} (found {})",
                expected_in_words(expected),
                shorten(found)
            );
        }
    }
    if let Some(field) = msg
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        return if path.is_empty() {
            format!("{field} is missing")
        } else {
            format!("{path}.{field} is missing")
        };
    }
    if e.is_syntax() || e.is_eof() {
        return format!(
            "{} (line {}, column {})",
            shorten(&msg),
            e.line(),
            e.column()
        );
    }
    format!("{subject}: {}", shorten(&msg))
}

/// serde's name of an expected type, as a person says it.
fn expected_in_words(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => {
            let bits = expected.trim_start_matches('u');
            let bits = if bits == "size" { "64" } else { bits };
            format!("an unsigned integer of at most {bits} bits")
        }
        "i8" | "i16" | "i32" | "i64" | "isize" => "an integer".into(),
        "a borrowed string" => "a string".into(),
        "a sequence" => "an array".into(),
        "a map" => "an object".into(),
        e if e.starts_with("struct ") => "an object".into(),
        e => shorten(e),
    }
}

/// At most 80 characters of a message piece, control characters escaped.
fn shorten(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(80)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_debug().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if s.chars().nth(80).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Region {
        size: u64,
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Memory {
        regions: Vec<Region>,
    }

    #[test]
    fn errors_name_the_field_not_the_position() {
        let e = from_json_str::<Memory>(r#"{"regions":[{"size":"big"}]}"#).unwrap_err();
        assert_eq!(
            e,
            r#"regions[0].size must be an unsigned integer of at most 64 bits (found string "big")"#
        );
        let e = from_json_str::<Memory>(r#"{"regions":[{"size":-1}]}"#).unwrap_err();
        assert!(
            e.starts_with("regions[0].size must be an unsigned integer"),
            "{e}"
        );
        let e = from_json_str::<Memory>(r#"{"regions":[{}]}"#).unwrap_err();
        assert_eq!(e, "regions[0].size is missing");
        let e = from_json_value::<Memory>(serde_json::json!({"regions": 3})).unwrap_err();
        assert!(e.starts_with("regions must be an array"), "{e}");
    }

    #[test]
    fn strings_from_files_are_escaped_and_cut() {
        assert_eq!(quoted("vcpu"), "\"vcpu\"");
        assert_eq!(quoted("a\u{1b}[2Jb"), "\"a\\u{1b}[2Jb\"");
        let long = "x".repeat(1 << 20);
        let q = quoted(&long);
        assert!(q.len() < 100, "{q}");
        assert!(q.ends_with("(1048576 bytes)"), "{q}");
    }
}
