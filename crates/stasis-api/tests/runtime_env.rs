//! The runtime directory as chosen from the environment. This file holds a
//! single test so that it owns its process's environment.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use stasis_api::{
    ensure_runtime_dir, list_vm_sockets, runtime_dir, socket_path_for, ApiClient, ApiServer,
};

use common::TempDir;

#[test]
fn runtime_dir_from_environment() {
    let base = TempDir::new();
    let dir = base.join("run/stasis");
    // Set before any thread of this test process starts.
    std::env::set_var("STASIS_RUNTIME_DIR", &dir);

    assert_eq!(runtime_dir(), dir);
    assert!(!dir.exists());
    assert_eq!(ensure_runtime_dir().unwrap(), dir);
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(socket_path_for("vm1").unwrap(), dir.join("vm1.sock"));
    assert!(socket_path_for("-x").is_err());
    assert!(list_vm_sockets().unwrap().is_empty());

    fs::remove_dir_all(base.join("run")).unwrap();
    // bind_vm creates the directory itself.
    let handle = ApiServer::bind_vm("vm1")
        .unwrap()
        .serve(common::TestVm::new("vm1", &dir.join("vm1.sock")))
        .unwrap();
    let listed = list_vm_sockets().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "vm1");
    let client = ApiClient::for_vm("vm1").unwrap();
    assert_eq!(client.get_vm().unwrap().name, "vm1");
    assert!(ApiServer::bind_vm("bad/name").is_err());
    drop(handle);
    assert!(list_vm_sockets().unwrap().is_empty());
}
