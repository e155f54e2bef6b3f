//! A VM configuration file as `stasis run --config FILE` reads it:
//! [`VmConfig::from_toml_str`] (what [`VmConfig::from_toml_file`] calls on
//! the file's text; the file version then only joins relative paths to
//! the file's directory), then the checks `build_config` runs,
//! [`VmConfig::validate`] (which includes
//! [`VmConfig::validate_for_restore`]; it looks at the kernel, initrd and
//! disk paths with `stat`, nothing more), and what a VM is built from:
//! [`VmConfig::cpu_spec`], [`VmConfig::virtio_devices`].
//!
//! One property is asserted: a configuration that passes
//! `validate_for_restore`, printed by [`VmConfig::to_toml_string`] (what
//! `--print-config` prints, documented as what `--config` reads), parses
//! back to the same configuration.
//!
//! Input: TOML text. Seeds: the examples of docs/CONFIG.md and a few
//! more, in `corpus/config_toml/`; `make-seeds.sh` also extracts the
//! TOML blocks of docs/CONFIG.md.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_config::VmConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let config = match VmConfig::from_toml_str(text) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    if let Err(e) = config.validate() {
        let _ = e.to_string();
    }
    let _ = config.cpu_spec().to_string();
    let _ = config.virtio_devices().len();
    if config.validate_for_restore().is_err() {
        return;
    }
    let printed = config.to_toml_string();
    let again = VmConfig::from_toml_str(&printed)
        .unwrap_or_else(|e| panic!("--print-config output does not parse: {e}\n{printed}"));
    assert_eq!(again, config, "the configuration changed through --print-config:\n{printed}");
});
