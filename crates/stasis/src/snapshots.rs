//! `stasis snapshot`, `verify` and `inspect`.

use std::io::Write;
use std::sync::atomic::Ordering;

use stasis_api::{ApiClient, SnapshotRequest};
use stasis_snapshot::{format_bytes, summary, summary_json, SnapshotReader};

use crate::cli::{InspectArgs, SnapshotArgs, VerifyArgs};
use crate::jobs::EXIT_INTERRUPTED;

/// Exit status when a snapshot cannot be taken, read or verified.
pub const EXIT_SNAPSHOT_FAILED: i32 = 1;

fn fail(e: impl std::fmt::Display) -> i32 {
    eprintln!("stasis: {e}");
    EXIT_SNAPSHOT_FAILED
}

/// `stasis snapshot NAME DIR [--stop] [--detach]`. The path is made
/// absolute here: the VMM may run in another working directory.
pub fn snapshot(args: &SnapshotArgs) -> i32 {
    if args.name == "merge" {
        return merge(&args.dir);
    }
    let interrupts = crate::signals::count_interrupts();
    let dir = match std::path::absolute(&args.dir) {
        Ok(d) => d,
        Err(e) => return fail(format!("{}: {e}", args.dir.display())),
    };
    let client = match ApiClient::for_vm(&args.name) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let path = dir.display().to_string();
    let request = SnapshotRequest {
        path: path.clone(),
        stop: args.stop,
        detach: args.detach,
        mode: Some(args.mode.clone()),
        disk_mode: Some(args.disk_mode.clone()),
        parent: match &args.parent {
            None => None,
            Some(p) => match std::path::absolute(p) {
                Ok(p) => Some(p.display().to_string()),
                Err(e) => return fail(format!("{}: {e}", p.display())),
            },
        },
    };
    if args.detach {
        return match client.start_snapshot(&request) {
            Ok(a) if args.json => {
                println!("{}", serde_json::to_string_pretty(&a).expect("serializes"));
                0
            }
            Ok(a) => {
                println!(
                    "snapshot of '{}' to {path} started as job {}; follow it with `stasis jobs {} {} --wait`",
                    args.name, a.job, args.name, a.job
                );
                0
            }
            Err(e) => fail(e),
        };
    }
    // The request waits for the snapshot; meanwhile its job is followed
    // for the progress bar and for Ctrl-C, which cancels it.
    let result = {
        let client = client.clone();
        let follower = client.clone();
        crate::jobs::follow_request(&follower, &path, &interrupts, move || {
            client.take_snapshot(&request)
        })
    };
    let Some(result) = result else {
        eprintln!(
            "stasis: stopped waiting; the snapshot goes on in VM '{}'",
            args.name
        );
        return EXIT_INTERRUPTED;
    };
    if result.is_err() && interrupts.load(Ordering::SeqCst) > 0 {
        if let Err(e) = &result {
            eprintln!("stasis: {e}");
        }
        return EXIT_INTERRUPTED;
    }
    match result {
        Ok(r) if args.json => {
            println!("{}", serde_json::to_string_pretty(&r).expect("serializes"));
            0
        }
        Ok(r) => {
            println!(
                "snapshot of '{}' written to {}{}",
                args.name,
                r.path,
                if r.stopped { "; VM stopped" } else { "" }
            );
            println!(
                "  guest paused {:.1} ms (quiesced in {:.2} ms), total {:.1} ms (fsync {:.1} ms)",
                r.pause_ms, r.quiesce_ms, r.total_ms, r.sync_ms
            );
            if r.mode == "background" {
                println!(
                    "  background copy: RAM write-protected in {:.2} ms, copied in {:.1} ms while the guest ran; {} copied early ({} write faults)",
                    r.protect_ms,
                    r.background_copy_ms,
                    format_bytes(r.early_copied_bytes),
                    r.write_faults
                );
            } else {
                println!(
                    "  stop-copy: the guest was paused while memory was copied{}",
                    r.mode_note
                        .as_deref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default()
                );
            }
            println!(
                "  memory {} ({} written, zero pages left as holes), state {}, copy {:.0} MB/s",
                format_bytes(r.memory_bytes),
                format_bytes(r.memory_written_bytes),
                format_bytes(r.state_bytes),
                r.copy_mb_per_s
            );
            if let Some(p) = &r.parent {
                println!("  diff snapshot: only pages that differ from its parent {p} are stored");
            }
            for d in &r.disks {
                println!(
                    "  disk {}: {}{}",
                    d.id,
                    match d.saved.as_str() {
                        "clone" => "reflink clone",
                        "copy" => "full copy made while the guest was paused",
                        "in-place" => "left in place (the VM ended), identity recorded",
                        _ => "not kept (--disk-mode=skip)",
                    },
                    d.file
                        .as_deref()
                        .map(|f| format!(" in {}/{f}", r.path))
                        .unwrap_or_default()
                );
            }
            0
        }
        Err(e) => fail(e),
    }
}

/// `stasis snapshot merge DIR`: the chain ending at DIR becomes one full
/// snapshot at DIR (atomically; the other snapshots are untouched).
fn merge(dir: &std::path::Path) -> i32 {
    let members = match stasis_snapshot::SnapshotChain::open(dir) {
        Ok(c) => c.len(),
        Err(e) => return fail(e),
    };
    match stasis_snapshot::merge_chain(dir) {
        Ok(c) => {
            println!(
                "merged a chain of {members} snapshots into a full snapshot at {} (memory image {})",
                c.dir.display(),
                format_bytes(c.memory_file_size)
            );
            0
        }
        Err(e) => fail(e),
    }
}

/// `stasis verify DIR`: every section and memory chunk checksum.
pub fn verify(args: &VerifyArgs) -> i32 {
    let reader = match SnapshotReader::open(&args.dir) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    // A diff snapshot is only as good as its chain: every member is
    // verified, and a broken link is an error.
    let chain = match reader.body().parent {
        None => None,
        Some(_) => match stasis_snapshot::SnapshotChain::open(&args.dir) {
            Ok(c) => Some(c),
            Err(e) => {
                verify_one(&reader);
                return fail(e);
            }
        },
    };
    let ok = match &chain {
        None => verify_one(&reader),
        // Every member is verified (and reported), not just up to the first bad one.
        Some(c) => c.members().filter(|m| !verify_one(m)).count() == 0,
    };
    if let Some(c) = &chain {
        println!(
            "{}: chain of {} snapshots {}",
            args.dir.display(),
            c.len(),
            if ok { "OK" } else { "DAMAGED" }
        );
    }
    if ok {
        0
    } else {
        EXIT_SNAPSHOT_FAILED
    }
}

/// Verifies one snapshot's checksums and says so; false if damaged.
fn verify_one(reader: &SnapshotReader) -> bool {
    let dir = reader.dir();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last = 0u64;
    let report = reader.verify(|done, total| {
        let pct = done * 100 / total.max(1);
        if tty && pct != last {
            last = pct;
            eprint!("\rverifying {}: {pct:3}%", dir.display());
            let _ = std::io::stderr().flush();
        }
    });
    if tty {
        eprintln!();
    }
    match report {
        Ok(r) if r.is_ok() => {
            println!(
                "{}: OK ({} sections, {} memory chunks, {:.0} MB/s)",
                dir.display(),
                reader.sections().len(),
                reader.body().memory.chunk_crc32c.len(),
                r.mb_per_s()
            );
            true
        }
        Ok(r) => {
            for p in r.problems() {
                eprintln!("stasis: {}: {p}", dir.display());
            }
            false
        }
        Err(e) => {
            eprintln!("stasis: {}: {e}", dir.display());
            false
        }
    }
}

/// `stasis inspect DIR [--json]`.
pub fn inspect(args: &InspectArgs) -> i32 {
    let reader = match SnapshotReader::open(&args.dir) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    // A diff snapshot: the chain it restores from, or why it cannot.
    let chain = reader.body().parent.as_ref().map(|_| {
        stasis_snapshot::SnapshotChain::open(&args.dir).map(|c| {
            c.members()
                .map(|m| {
                    (
                        m.dir().display().to_string(),
                        m.body().snapshot_id.clone().unwrap_or_default(),
                        if m.body().parent.is_some() {
                            "diff"
                        } else {
                            "full"
                        },
                        m.memory_allocated_bytes().unwrap_or(0),
                    )
                })
                .collect::<Vec<_>>()
        })
    });
    if args.json {
        let mut v = summary_json(&reader);
        match chain {
            Some(Ok(members)) => {
                v["chain"] = members
                    .iter()
                    .map(|(dir, id, kind, bytes)| {
                        serde_json::json!({"dir": dir, "snapshot_id": id, "kind": kind, "memory_allocated_bytes": bytes})
                    })
                    .collect();
            }
            Some(Err(e)) => v["chain_error"] = e.to_string().into(),
            None => {}
        }
        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
    } else {
        print!("{}", summary(&reader));
        match chain {
            Some(Ok(members)) => {
                println!("chain ({} snapshots, newest first):", members.len());
                for (dir, id, kind, bytes) in &members {
                    println!(
                        "  {kind:4}  {}  {}  {dir}",
                        &id[..id.len().min(8)],
                        format_bytes(*bytes)
                    );
                }
            }
            Some(Err(e)) => println!("chain: broken: {e}"),
            None => {}
        }
    }
    0
}
