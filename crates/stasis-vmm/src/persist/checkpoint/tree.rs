//! A checkpoint store: a directory with one snapshot directory per
//! checkpoint and `tree.json`, the list of checkpoints with their parents
//! and the one the VM runs from. `tree.json` is the only index: it is
//! replaced atomically (written beside, `fsync`, renamed, directory
//! `fsync`), so a crash leaves the old list or the new one.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::CheckpointDisk;

/// The index's file name in a store.
pub const TREE_FILE: &str = "tree.json";
/// The index format's version.
pub const TREE_VERSION: u32 = 1;
/// The largest index accepted (a hostile file must not cost more).
const MAX_TREE_BYTES: u64 = 16 << 20;

/// One checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointNode {
    /// Its name (its directory in the store).
    pub name: String,
    /// The checkpoint the VM ran from when this one was taken.
    pub parent: Option<String>,
    /// When, in ms since the UNIX epoch.
    pub created_unix_ms: u64,
    /// Taken with `--external`.
    pub external: bool,
    /// How each writable disk is kept.
    pub disks: Vec<CheckpointDisk>,
    /// How long the guest was paused, in ms.
    pub pause_ms: f64,
}

/// A store's index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointTree {
    /// [`TREE_VERSION`].
    pub version: u32,
    /// The VM the store belongs to.
    pub vm: String,
    /// The checkpoint the VM runs from (its last checkpoint or the one
    /// it was rolled back or forward to); new checkpoints are its
    /// children.
    pub current: Option<String>,
    /// Every checkpoint, oldest first.
    pub checkpoints: Vec<CheckpointNode>,
}

impl CheckpointTree {
    /// An empty tree for VM `vm`.
    pub fn new(vm: &str) -> Self {
        Self {
            version: TREE_VERSION,
            vm: vm.to_string(),
            current: None,
            checkpoints: Vec::new(),
        }
    }

    /// Reads the store's index; `Ok(None)` when the store has none yet.
    pub fn load(store: &Path) -> Result<Option<Self>, String> {
        let path = store.join(TREE_FILE);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        if !meta.is_file() {
            return Err(format!("{} is not a regular file", path.display()));
        }
        if meta.len() > MAX_TREE_BYTES {
            return Err(format!("{} is larger than 16 MiB", path.display()));
        }
        let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let tree: Self = serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a checkpoint index: {e}", path.display()))?;
        if tree.version != TREE_VERSION {
            return Err(format!(
                "{} has version {}; this stasis reads version {TREE_VERSION}",
                path.display(),
                tree.version
            ));
        }
        Ok(Some(tree))
    }

    /// Writes the index atomically.
    pub fn save(&self, store: &Path) -> Result<(), String> {
        let path = store.join(TREE_FILE);
        let tmp = store.join(format!(".{TREE_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        let write = || -> std::io::Result<()> {
            std::fs::write(&tmp, &text)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(store)?.sync_all()
        };
        write().map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// The checkpoint named `name`.
    pub fn get(&self, name: &str) -> Option<&CheckpointNode> {
        self.checkpoints.iter().find(|c| c.name == name)
    }

    /// The checkpoint named `name`, or an error listing the others.
    pub fn require(&self, name: &str) -> Result<&CheckpointNode, String> {
        self.get(name).ok_or_else(|| {
            let names: Vec<&str> = self.checkpoints.iter().map(|c| c.name.as_str()).collect();
            format!(
                "no checkpoint '{}' (the store has: {})",
                name.escape_debug(),
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )
        })
    }

    /// The children of `name`.
    pub fn children(&self, name: &str) -> impl Iterator<Item = &CheckpointNode> {
        let name = name.to_string();
        self.checkpoints
            .iter()
            .filter(move |c| c.parent.as_deref() == Some(name.as_str()))
    }
}

/// Now, in ms since the UNIX epoch.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The default store of VM `vm`: `<directory of its first writable
/// disk>/<vm>.checkpoints`.
pub fn default_store(vm: &str, first_disk: Option<&Path>) -> Result<PathBuf, String> {
    let disk = first_disk.ok_or(
        "the VM has no writable disk, so there is no default checkpoint store: give one with --store DIR",
    )?;
    let dir = disk.parent().unwrap_or(Path::new("."));
    Ok(dir.join(format!("{vm}.checkpoints")))
}
