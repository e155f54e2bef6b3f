//! A loop-mounted filesystem for tests that need btrfs or xfs (reflinks)
//! or ext4 (none).

use std::path::PathBuf;
use std::process::Command;

use super::{err_text, Scratch};

/// A filesystem of type `fs` in a sparse image file, loop-mounted for the
/// test and unmounted when dropped. Needs root and mkfs.`fs` (`.ci/run`
/// installs btrfs-progs and xfsprogs).
pub struct LoopFs {
    pub mnt: PathBuf,
    _scratch: Scratch,
}

impl LoopFs {
    pub fn new(tag: &str, fs: &str) -> LoopFs {
        let scratch = Scratch::new(tag);
        let img = scratch.join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(512 << 20)
            .unwrap();
        let mkfs = format!("mkfs.{fs}");
        let out = Command::new(&mkfs)
            .arg(if fs == "ext4" { "-qF" } else { "-q" })
            .arg(&img)
            .output()
            .unwrap_or_else(|e| {
                panic!("{mkfs} is needed for this test ({e}); .ci/run installs it")
            });
        assert!(out.status.success(), "{mkfs}: {}", err_text(&out));
        let mnt = scratch.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", err_text(&out));
        LoopFs {
            mnt,
            _scratch: scratch,
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}
