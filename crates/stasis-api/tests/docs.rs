//! The documents describe every endpoint the router serves.

use stasis_api::routes::endpoints;

fn doc(name: &str) -> String {
    let path = format!("{}/../../docs/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

#[test]
fn api_md_lists_every_endpoint() {
    let text = doc("API.md");
    for (method, path) in endpoints() {
        assert!(
            text.contains(&format!("### `{method} {path}`")),
            "docs/API.md has no section for {method} {path}"
        );
    }
}

#[test]
fn openapi_lists_every_endpoint() {
    let text = doc("openapi.yaml");
    assert!(text.starts_with("openapi: 3.0."));
    for (method, path) in endpoints() {
        let section = text
            .split(&format!("\n  {path}:\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("docs/openapi.yaml has no path {path}"));
        // The operations of this path come before the next path.
        let ops = format!("\n{}", section.split("\n  /").next().unwrap());
        assert!(
            ops.contains(&format!("\n    {}:\n", method.to_lowercase())),
            "docs/openapi.yaml has no {method} for {path}"
        );
    }
}
