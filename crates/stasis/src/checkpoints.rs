//! `stasis checkpoint`, `stasis checkpoints` and the disk half of
//! `stasis restore --checkpoint`.

use std::path::{Path, PathBuf};

use stasis_api::types::CheckpointRequest;
use stasis_api::ApiClient;
use stasis_vmm::persist::checkpoint::{revert, tree::CheckpointTree};
use stasis_vmm::persist::restore::RestoreOverrides;

use crate::cli::{CheckpointArgs, CheckpointsArgs};

/// Exit status when a checkpoint operation fails.
pub const EXIT_CHECKPOINT_FAILED: i32 = 1;

fn fail(e: impl std::fmt::Display) -> i32 {
    eprintln!("stasis: {e}");
    EXIT_CHECKPOINT_FAILED
}

fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// `stasis checkpoint NAME CKPT [--external]` and `stasis checkpoint
/// delete NAME CKPT`.
pub fn checkpoint(args: &CheckpointArgs) -> i32 {
    let (vm, name, delete) = if args.name == "delete" {
        match &args.delete_checkpoint {
            Some(c) => (args.checkpoint.clone(), c.clone(), true),
            None => return fail("usage: stasis checkpoint delete NAME CKPT"),
        }
    } else {
        if let Some(extra) = &args.delete_checkpoint {
            return fail(format!(
                "unexpected argument '{extra}' (usage: stasis checkpoint NAME CKPT [--external])"
            ));
        }
        (args.name.clone(), args.checkpoint.clone(), false)
    };
    if delete && args.external {
        return fail("--external is for taking a checkpoint, not deleting one");
    }
    let store = match args.store.as_deref().map(absolute).transpose() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let client = match ApiClient::for_vm(&vm).and_then(|c| c.ping().map(|()| c)) {
        Ok(c) => c.with_timeout(std::time::Duration::from_secs(3600)),
        Err(e) => {
            // A stopped VM's checkpoint can be deleted from its store.
            if let (true, Some(store)) = (delete, &store) {
                return match revert::delete(store, &name, None) {
                    Ok(d) => {
                        println!("deleted checkpoint '{name}' from {}", store.display());
                        for k in d.kept_images {
                            println!("kept {} (backing file of later overlays)", k.display());
                        }
                        0
                    }
                    Err(e) => fail(e),
                };
            }
            return fail(e);
        }
    };
    let request = CheckpointRequest {
        name: name.clone(),
        external: args.external,
        store: store.map(|s| s.display().to_string()),
        delete,
        detach: false,
    };
    let body = serde_json::to_value(&request).expect("serializes");
    let answer: serde_json::Value = match client.call("PUT", "/v1/vm/checkpoint", Some(&body)) {
        Ok(v) => v,
        Err(e) => return fail(format!("checkpoint '{name}' of '{vm}': {e}")),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).expect("serializes")
        );
        return 0;
    }
    if delete {
        println!("deleted checkpoint '{name}' of '{vm}'");
        return 0;
    }
    let snap = &answer["snapshot"];
    let kinds: Vec<String> = answer["disks"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|d| {
                    format!(
                        "{} {}",
                        d["id"].as_str().unwrap_or("?"),
                        d["kind"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "checkpoint '{name}' of '{vm}' in {}: paused {:.1} ms, {} in {:.1} ms total; disks: {}",
        answer["store"].as_str().unwrap_or("?"),
        snap["pause_ms"].as_f64().unwrap_or(0.0),
        snap["mode"].as_str().unwrap_or("?"),
        snap["total_ms"].as_f64().unwrap_or(0.0),
        if kinds.is_empty() {
            "none".to_string()
        } else {
            kinds.join(", ")
        }
    );
    0
}

/// The default store of running VM `vm`: `<vm>.checkpoints` beside its
/// first writable disk.
fn store_of_running(vm: &str) -> Result<PathBuf, String> {
    let info = ApiClient::for_vm(vm)
        .and_then(|c| c.get_vm())
        .map_err(|e| e.to_string())?;
    let first = info
        .devices
        .iter()
        .find(|d| d.kind == "disk" && !d.backend.ends_with(" (read-only)"))
        .map(|d| PathBuf::from(&d.backend));
    stasis_vmm::persist::checkpoint::tree::default_store(&info.name, first.as_deref())
}

/// `stasis checkpoints [NAME] [--store DIR] [--disk PATH]`.
pub fn list(args: &CheckpointsArgs) -> i32 {
    if let Some(disk) = &args.disk {
        return list_disk(disk, args.json);
    }
    let store = match (&args.store, &args.name) {
        (Some(s), _) => s.clone(),
        (None, Some(vm)) => match store_of_running(vm) {
            Ok(s) => s,
            Err(e) => return fail(e),
        },
        (None, None) => return fail("give a running VM's name, --store DIR or --disk PATH"),
    };
    let tree = match CheckpointTree::load(&store) {
        Ok(Some(t)) => t,
        Ok(None) => {
            return fail(format!(
                "{} has no checkpoints (no tree.json)",
                store.display()
            ))
        }
        Err(e) => return fail(e),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&tree).expect("serializes")
        );
        return 0;
    }
    println!("checkpoints of '{}' in {}", tree.vm, store.display());
    let roots: Vec<&str> = tree
        .checkpoints
        .iter()
        .filter(|c| c.parent.as_deref().is_none_or(|p| tree.get(p).is_none()))
        .map(|c| c.name.as_str())
        .collect();
    for r in roots {
        print_node(&tree, &store, r, 0);
    }
    0
}

fn print_node(tree: &CheckpointTree, store: &Path, name: &str, depth: usize) {
    let Some(n) = tree.get(name) else { return };
    let size = dir_size(&store.join(name));
    let kinds: Vec<&str> = n.disks.iter().map(|d| d.kind.as_str()).collect();
    println!(
        "{:indent$}{}{} {}  parent {}  {:.1} MiB  disks: {}{}",
        "",
        if depth > 0 { "└─ " } else { "" },
        n.name,
        format_time(n.created_unix_ms),
        n.parent.as_deref().unwrap_or("-"),
        size as f64 / (1 << 20) as f64,
        if kinds.is_empty() {
            "none".to_string()
        } else {
            kinds.join(",")
        },
        if tree.current.as_deref() == Some(name) {
            "  <- current"
        } else {
            ""
        },
        indent = depth * 3
    );
    let children: Vec<String> = tree.children(name).map(|c| c.name.clone()).collect();
    for c in children {
        print_node(tree, store, &c, depth + 1);
    }
}

fn format_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Bytes the files under `dir` occupy on disk.
fn dir_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

fn list_disk(disk: &Path, json: bool) -> i32 {
    let list = match stasis_disk::qcow2::list_snapshots(disk) {
        Ok(l) => l,
        Err(e) => return fail(format!("{}: {e}", disk.display())),
    };
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|s| serde_json::json!({"id": s.id, "name": s.name, "date_unix": s.date_sec, "disk_size": s.disk_size, "vm_state_size": s.vm_state_size}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
        return 0;
    }
    println!(
        "internal snapshots of {} (disk-only: stasis keeps VM state in its checkpoint store)",
        disk.display()
    );
    println!(
        "{:<6} {:<24} {:<19} {:>12}",
        "ID", "NAME", "DATE", "DISK SIZE"
    );
    for s in list {
        println!(
            "{:<6} {:<24} {:<19} {:>12}",
            s.id,
            s.name.escape_debug().to_string(),
            format_time(s.date_sec * 1000),
            s.disk_size
        );
    }
    0
}

/// `stasis restore --checkpoint STORE/CKPT`: brings the disks back to
/// the checkpoint and points the restore at them.
pub fn prepare_restore(dir: &Path, overrides: &mut RestoreOverrides) -> Result<(), String> {
    let dir = absolute(dir)?;
    let (Some(store), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(format!(
            "{} is not a checkpoint directory (STORE/CKPT)",
            dir.display()
        ));
    };
    let name = name.to_string_lossy();
    let prepared = revert::prepare_disks(store, &name)?;
    // The user's own --disk-path entries come last and win (with the
    // format the snapshot records for the disk).
    let user: Vec<String> = overrides
        .disk_paths
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    let mut paths = prepared.disk_paths;
    paths.append(&mut overrides.disk_paths);
    overrides.disk_paths = paths;
    overrides.disk_formats = prepared
        .disk_formats
        .into_iter()
        .filter(|(id, _)| !user.contains(id))
        .collect();
    overrides.checkpoint_disks = true;
    for (id, p) in &overrides.disk_paths {
        eprintln!(
            "stasis: checkpoint '{name}': disk '{id}' is {}",
            p.display()
        );
    }
    Ok(())
}
