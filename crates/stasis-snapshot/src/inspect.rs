//! `stasis inspect`: a human-readable and a JSON summary of a snapshot.

use std::fmt::Write as _;

use serde_json::json;

use crate::error::Result;
use crate::reader::SnapshotReader;

/// Formats milliseconds since the Unix epoch as UTC ISO-8601, e.g.
/// `2025-01-02T03:04:05.678Z` (proleptic Gregorian calendar).
pub fn format_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Formats a byte count with a binary unit, e.g. `1.50 GiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", UNITS[u])
}

/// A multi-line human-readable description of a snapshot: format version,
/// producer, creation time, CPU, memory regions and their on-disk use, and
/// every section.
pub fn summary(reader: &SnapshotReader) -> String {
    let m = reader.manifest();
    let b = &m.body;
    let mem = &b.memory;
    let mut s = String::new();
    let allocated = reader.memory_allocated_bytes();
    let _ = writeln!(s, "stasis snapshot {}", reader.dir().display());
    let _ = writeln!(s, "  format version: {}", m.format_version);
    let _ = writeln!(
        s,
        "  producer:       {} {}",
        b.producer.name, b.producer.version
    );
    let _ = writeln!(
        s,
        "  created:        {} (unix ms {})",
        format_unix_ms(b.created_unix_ms),
        b.created_unix_ms
    );
    let _ = writeln!(s, "  cpu:            {} / {}", b.cpu.vendor, b.cpu.model);
    let _ = writeln!(s, "  cpuid leaves:   {}", b.cpu.cpuid.len());
    match &b.cpu.guest {
        Some(g) => {
            let _ = writeln!(s, "  cpu model:      {}", g.spec());
            let _ = writeln!(
                s,
                "  guest features: {} ({})",
                g.features.len(),
                g.features.join(" ")
            );
            if !g.added_by_host.is_empty() {
                let _ = writeln!(
                    s,
                    "  added by host:  {} (the host's KVM put these into the guest's CPUID beyond the model)",
                    g.added_by_host.join(" ")
                );
            }
            let _ = writeln!(s, "  xcr0 mask:      {:#x}", g.xcr0);
        }
        None => {
            let _ = writeln!(s, "  cpu model:      host (recorded before CPU models)");
        }
    }
    if let Some(id) = &b.snapshot_id {
        let _ = writeln!(s, "  snapshot id:    {id}");
    }
    if let Some(p) = &b.parent {
        let _ = writeln!(
            s,
            "  parent:         {} (diff snapshot: id {}, manifest checksum {})",
            p.path, p.snapshot_id, p.body_crc32c
        );
    }
    let total_pages = mem.regions.iter().map(|r| r.size).sum::<u64>() / mem.page_size;
    let _ = writeln!(s, "memory ({}):", mem.file);
    let _ = writeln!(
        s,
        "  file size:      {} ({} bytes)",
        format_bytes(mem.file_size),
        mem.file_size
    );
    match allocated {
        Ok(a) => {
            let _ = writeln!(s, "  on disk:        {} ({a} bytes)", format_bytes(a));
        }
        Err(e) => {
            let _ = writeln!(s, "  on disk:        unknown ({e})");
        }
    }
    let pct = if total_pages == 0 {
        0.0
    } else {
        mem.nonzero_pages as f64 * 100.0 / total_pages as f64
    };
    let _ = writeln!(
        s,
        "  nonzero pages:  {} of {total_pages} ({pct:.1}%), {} chunks of {}",
        mem.nonzero_pages,
        mem.chunk_crc32c.len(),
        format_bytes(mem.chunk_size)
    );
    for r in &mem.regions {
        let _ = writeln!(
            s,
            "  region {}: guest {:#x}..{:#x} ({}) at file offset {:#x}",
            r.name,
            r.gpa,
            r.gpa + r.size,
            format_bytes(r.size),
            r.file_offset
        );
    }
    let _ = writeln!(
        s,
        "sections ({}, {} bytes): {}",
        b.state_file,
        b.state_size,
        b.sections.len()
    );
    let rows: Vec<[String; 6]> = b
        .sections
        .iter()
        .map(|e| {
            [
                e.name.clone(),
                e.instance.clone(),
                e.version.to_string(),
                if e.optional { "yes" } else { "no" }.to_string(),
                e.size.to_string(),
                format!("{:08x}", e.crc32c),
            ]
        })
        .collect();
    let header = ["NAME", "INSTANCE", "VERSION", "OPTIONAL", "SIZE", "CRC32C"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::from(" ");
        for (c, w) in row.iter().zip(widths) {
            let _ = write!(line, " {c:<w$}");
        }
        let _ = writeln!(s, "{}", line.trim_end());
    }
    if !b.notes.is_empty() {
        let _ = writeln!(s, "notes:");
        for (k, v) in &b.notes {
            let _ = writeln!(s, "  {k}: {v}");
        }
    }
    s
}

/// The same summary as JSON (for `stasis inspect --json`). Includes the VM
/// configuration; leaves out the per-chunk checksums and CPUID leaves (only
/// their counts).
pub fn summary_json(reader: &SnapshotReader) -> serde_json::Value {
    let m = reader.manifest();
    let b = &m.body;
    let mem = &b.memory;
    let allocated: Option<u64> = reader.memory_allocated_bytes().ok();
    json!({
        "dir": reader.dir().display().to_string(),
        "format_version": m.format_version,
        "producer": b.producer,
        "created_unix_ms": b.created_unix_ms,
        "created": format_unix_ms(b.created_unix_ms),
        "cpu": {
            "vendor": b.cpu.vendor,
            "model": b.cpu.model,
            "cpuid_leaves": b.cpu.cpuid.len(),
            "guest": b.cpu.guest,
        },
        "memory": {
            "file": mem.file,
            "file_size": mem.file_size,
            "allocated_bytes": allocated,
            "page_size": mem.page_size,
            "chunk_size": mem.chunk_size,
            "chunks": mem.chunk_crc32c.len(),
            "nonzero_pages": mem.nonzero_pages,
            "regions": mem.regions,
        },
        "state_file": b.state_file,
        "state_size": b.state_size,
        "sections": b.sections.iter().map(|e| json!({
            "name": e.name,
            "instance": e.instance,
            "version": e.version,
            "optional": e.optional,
            "offset": e.offset,
            "size": e.size,
            "crc32c": format!("{:08x}", e.crc32c),
        })).collect::<Vec<_>>(),
        "parent": b.parent,
        "notes": b.notes,
        "vm_config": b.vm_config,
    })
}

/// Opens `dir` and returns its [`summary`].
pub fn summary_of(dir: &std::path::Path) -> Result<String> {
    Ok(summary(&SnapshotReader::open(dir)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(format_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            format_unix_ms(1_735_787_045_678),
            "2025-01-02T03:04:05.678Z"
        );
        assert_eq!(
            format_unix_ms(4_102_444_799_999),
            "2099-12-31T23:59:59.999Z"
        );
        // Far future values must not panic.
        let _ = format_unix_ms(u64::MAX);
    }

    #[test]
    fn bytes() {
        assert_eq!(format_bytes(10), "10 bytes");
        assert_eq!(format_bytes(1536), "1.50 KiB");
        assert_eq!(format_bytes(1 << 30), "1.00 GiB");
    }
}
