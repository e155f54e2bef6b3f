//! `manifest.json` as `stasis restore`, `inspect`, `verify` and `check`
//! read it: [`stasis_snapshot::decode_manifest`] (what
//! `SnapshotReader::open` calls on the file's bytes), then what a restore
//! does next with a manifest that passed: the section list against the
//! sections this build knows ([`stasis_snapshot::check_known`] with
//! [`restore::known_section`], as `SnapshotReader::check_known` does) and
//! the saved VM configuration ([`restore::configure`], as `saved_config`
//! does, without overrides).
//!
//! One property is asserted: a manifest stasis accepts, encoded again by
//! [`stasis_snapshot::encode_manifest`] (as a diff merge or a rewrite
//! would), is accepted again with the same body.
//!
//! Input: the bytes of a `manifest.json`. Seeds: `make-seeds.sh` copies
//! the manifests of the repository's snapshot fixtures (or of any
//! snapshot directory given to it).

#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_snapshot::{check_known, decode_manifest, encode_manifest, summarize_warnings};
use stasis_vmm::persist::restore::{self, RestoreOverrides};

fuzz_target!(|data: &[u8]| {
    let manifest = match decode_manifest(data) {
        Ok(m) => m,
        Err(e) => {
            // The message a user sees is built from the input too.
            let _ = e.to_string();
            return;
        }
    };
    match check_known(&manifest.body.sections, &restore::known_section) {
        Ok(warnings) => drop(summarize_warnings(&warnings)),
        Err(e) => drop(e.to_string()),
    }
    if let Err(e) = restore::configure(&manifest.body.vm_config, &RestoreOverrides::default()) {
        let _ = e.to_string();
    }

    // The reader takes at most 1 MiB of `vm_config` text
    // (`bounded::MAX_VM_CONFIG_BYTES`, private); pretty-printing, 4 more
    // spaces a line inside the envelope, can grow a crafted one past that,
    // which is no fault of the encoder.
    let pretty = serde_json::to_string_pretty(&manifest.body.vm_config)
        .expect("a decoded JSON value serializes");
    if pretty.len() + 4 * pretty.matches('\n').count() > 1 << 20 {
        return;
    }
    let text = encode_manifest(&manifest.body).expect("a decoded manifest body serializes");
    let again = decode_manifest(text.as_bytes())
        .unwrap_or_else(|e| panic!("stasis refuses a manifest it encoded itself: {e}"));
    assert_eq!(again.body, manifest.body, "the body changed through encode/decode");
});
