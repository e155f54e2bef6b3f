//! QEMU's own tools as independent checkers of the images stasis writes
//! (`.ci/run` installs qemu-utils).

use std::path::Path;
use std::process::Command;

use super::err_text;

/// Runs `qemu-img ARGS`; its exit status and output (stdout + stderr).
pub fn qemu_img_output(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("qemu-img is needed for this test ({e}); .ci/run installs qemu-utils")
        });
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &err_text(&out);
    (out.status.code(), text)
}

/// Runs `qemu-img ARGS`, which must succeed; its output.
pub fn qemu_img(args: &[&str]) -> String {
    let (code, text) = qemu_img_output(args);
    assert_eq!(code, Some(0), "qemu-img {args:?}: {text}");
    text
}

/// Whether `qemu-img snapshot -l` output lists a snapshot tagged `tag`.
pub fn has_tag(list: &str, tag: &str) -> bool {
    list.lines()
        .skip(2)
        .any(|l| l.split_whitespace().nth(1) == Some(tag))
}

/// Whether the qcow2 header's dirty bit (incompatible feature 0: "refcounts
/// may be inconsistent, repair before use") is set.
pub fn qcow2_dirty(img: &Path) -> bool {
    let b = std::fs::read(img).unwrap();
    b[79] & 1 != 0
}

/// `qemu-img check` finds nothing at all, and the image is not dirty.
pub fn check_clean(img: &Path) {
    let (code, text) = qemu_img_output(&["check", img.to_str().unwrap()]);
    assert!(
        code == Some(0) && text.contains("No errors were found"),
        "{}: {text}",
        img.display()
    );
    assert!(!qcow2_dirty(img), "{} is marked dirty", img.display());
}
