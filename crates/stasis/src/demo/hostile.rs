//! The demo's look at stasis as a target: a crafted copy of its own
//! snapshot is refused by name, and the VMM processes it starts run with
//! every thread filtered.

use std::path::Path;

use stasis_vmm::persist::restore::{self, RestoreOverrides};

/// Copies the snapshot `snap` to `dir/crafted`, makes its saved serial
/// destination a socket in place of its own `manifest.json` (as an
/// attacker who re-seals the manifest could), and shows that a restore
/// refuses it, naming why, with the copy unchanged.
pub fn crafted_snapshot_refused(snap: &Path, dir: &Path) -> Result<(), String> {
    let crafted = dir.join("crafted");
    std::fs::create_dir_all(&crafted).map_err(|e| e.to_string())?;
    for e in std::fs::read_dir(snap).map_err(|e| e.to_string())? {
        let e = e.map_err(|e| e.to_string())?;
        if e.file_type().map_err(|e| e.to_string())?.is_file() {
            std::fs::copy(e.path(), crafted.join(e.file_name())).map_err(|e| e.to_string())?;
        }
    }
    let manifest = crafted.join(stasis_snapshot::MANIFEST_FILE);
    let text = std::fs::read(&manifest).map_err(|e| e.to_string())?;
    let mut outer: serde_json::Value = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    let version = outer["format_version"].as_u64().unwrap_or(1) as u32;
    let mut body = outer["body"].take();
    body["vm_config"]["serial"] = serde_json::json!({
        "mode": "socket",
        "path": manifest,
    });
    let body = serde_json::to_string(&body).map_err(|e| e.to_string())?;
    std::fs::write(
        &manifest,
        stasis_snapshot::seal_manifest_body(version, &body),
    )
    .map_err(|e| e.to_string())?;
    let before = std::fs::read(&manifest).map_err(|e| e.to_string())?;
    match restore::prepare(&crafted, &RestoreOverrides::default()) {
        Ok(_) => Err(
            "a crafted snapshot whose serial socket would replace its own manifest was accepted"
                .into(),
        ),
        Err(e) => {
            let after = std::fs::read(&manifest).map_err(|e| e.to_string())?;
            if after != before {
                return Err("refusing the crafted snapshot changed it".into());
            }
            println!(
                "stasis demo: a crafted copy of the snapshot (checksums recomputed) whose serial socket would replace its own manifest.json is refused, the copy untouched: {e}"
            );
            Ok(())
        }
    }
}

/// Says how many threads of process `pid` run under a seccomp filter.
pub fn show_filtered_threads(pid: u32) -> Result<(), String> {
    let mut names = Vec::new();
    let (mut filtered, mut total) = (0, 0);
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())? {
        let Ok(status) =
            std::fs::read_to_string(t.map_err(|e| e.to_string())?.path().join("status"))
        else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        names.push(field("Name:"));
        total += 1;
        if field("Seccomp:") == "2" {
            filtered += 1;
        }
    }
    names.sort();
    names.dedup();
    println!(
        "stasis demo: in that process {filtered} of {total} threads run under their seccomp filter ({})",
        names.join(", ")
    );
    if filtered != total {
        return Err(
            "some threads of the receiving stasis process run without a seccomp filter".into(),
        );
    }
    Ok(())
}
