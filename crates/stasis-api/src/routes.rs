//! The endpoint table: from (method, path, body) to an [`ApiRequest`].
//!
//! Adding an endpoint is three small steps: a variant in [`ApiRequest`], a
//! row in `ENDPOINTS` (method, path, body parser), and the VM core's
//! handling of the new variant. A path may end in one parameter, `{id}`,
//! which matches one non-empty segment. Unknown paths get 404, a known path
//! with another method gets 405 with an `Allow` header, and a body (or
//! parameter) that does not parse gets 400 with the reason.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::http;
use crate::types::{
    ActionResponse, CheckpointRequest, EmptyRequest, ErrorBody, MigrateRequest, RollbackRequest,
    SnapshotRequest, VmState,
};

/// The parameter placeholder a path may end with.
const PARAM: &str = "{id}";

/// A request the API understood, ready for the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApiRequest {
    /// `GET /v1/ping`: is the API alive? Answered by the server itself
    /// with `{"ok": true}`; it never reaches an
    /// [`ApiHandler`](crate::server::ApiHandler).
    Ping,
    /// `GET /v1/vm`: describe the VM ([`VmInfo`](crate::types::VmInfo)).
    GetVm,
    /// `PUT /v1/vm/pause`: stop the vCPUs ([`ActionResponse`]).
    Pause,
    /// `PUT /v1/vm/resume`: restart the vCPUs ([`ActionResponse`]).
    Resume,
    /// `PUT /v1/vm/shutdown`: stop the VM; the process exits
    /// ([`ActionResponse`] with state `stopping`).
    Shutdown,
    /// `PUT /v1/vm/snapshot`: write a snapshot to a directory, optionally
    /// ending the VM afterwards ([`SnapshotResponse`](crate::types::SnapshotResponse)),
    /// or with `detach` start it as a job (`202` with a
    /// [`JobAccepted`](crate::types::JobAccepted)).
    Snapshot(SnapshotRequest),
    /// `PUT /v1/vm/checkpoint`: take (or with `delete`, delete) a
    /// checkpoint of the VM and its disks, as a job like a snapshot.
    Checkpoint(CheckpointRequest),
    /// `PUT /v1/vm/rollback`: end the VM and start it again from a
    /// checkpoint, its disks brought back to it (`202` with an
    /// [`ActionResponse`] once the checkpoint is found; the VM answers
    /// again on the same socket when it runs from it).
    Rollback(RollbackRequest),
    /// `PUT /v1/vm/migrate`: send the VM to another stasis as a job; the
    /// answer is the job's result (a migration report) once the VM runs
    /// there, or with `detach` a `202` with a
    /// [`JobAccepted`](crate::types::JobAccepted).
    Migrate(Box<MigrateRequest>),
    /// `GET /v1/jobs`: the VM's jobs, newest first
    /// ([`JobList`](crate::types::JobList)).
    ListJobs,
    /// `GET /v1/jobs/{id}`: one job ([`JobInfo`](crate::types::JobInfo)).
    GetJob(u64),
    /// `DELETE /v1/jobs/{id}`: cancel a job (`202` with its
    /// [`JobInfo`](crate::types::JobInfo) once asked).
    CancelJob(u64),
}

/// A response to send: a status, extra headers and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    /// The HTTP status code.
    pub status: u16,
    /// Extra header fields (such as `Allow`); `Content-Type`,
    /// `Content-Length` and `Connection` are added when it is written.
    pub headers: Vec<(String, String)>,
    /// The JSON body.
    pub body: serde_json::Value,
}

impl ApiResponse {
    /// A response with `status` and `body` serialized to JSON. If `body`
    /// cannot be serialized, the result is a 500 error saying so.
    pub fn json<T: Serialize + ?Sized>(status: u16, body: &T) -> Self {
        match serde_json::to_value(body) {
            Ok(body) => ApiResponse {
                status,
                headers: Vec::new(),
                body,
            },
            Err(e) => ApiResponse::error(500, format!("cannot serialize the response: {e}")),
        }
    }

    /// `200 OK` with `body`.
    pub fn ok<T: Serialize + ?Sized>(body: &T) -> Self {
        Self::json(200, body)
    }

    /// An error: `status` with `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(
            status,
            &ErrorBody {
                error: message.into(),
            },
        )
    }

    /// `200 OK` with an [`ActionResponse`]: what pause, resume and shutdown
    /// return on success.
    pub fn action(state: VmState, message: impl Into<String>) -> Self {
        Self::ok(&ActionResponse {
            state,
            message: message.into(),
            quiesce_us: None,
        })
    }

    /// Adds a header field.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The HTTP message: the body as compact JSON plus a newline (so that
    /// `curl` output ends its line).
    pub fn to_http(&self) -> http::Response {
        let mut body = serde_json::to_vec(&self.body).unwrap_or_else(|_| b"null".to_vec());
        body.push(b'\n');
        http::Response {
            status: self.status,
            headers: self.headers.clone(),
            body,
        }
    }
}

/// One row of the endpoint table.
struct Endpoint {
    /// The method (case-sensitive).
    method: &'static str,
    /// The path, exact or ending in `{id}`.
    path: &'static str,
    /// Makes the request from the body and the path's parameter (empty if
    /// it has none), or says what is wrong with them.
    parse: fn(&[u8], &str) -> Result<ApiRequest, String>,
}

/// Every endpoint. Paths match exactly (no trailing slash) but for a final
/// `{id}`; a query string is ignored.
const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        method: "GET",
        path: "/v1/ping",
        parse: |body, _| no_body(body).map(|()| ApiRequest::Ping),
    },
    Endpoint {
        method: "GET",
        path: "/v1/vm",
        parse: |body, _| no_body(body).map(|()| ApiRequest::GetVm),
    },
    Endpoint {
        method: "PUT",
        path: "/v1/vm/pause",
        parse: |body, _| optional_json::<EmptyRequest>(body).map(|_| ApiRequest::Pause),
    },
    Endpoint {
        method: "PUT",
        path: "/v1/vm/resume",
        parse: |body, _| optional_json::<EmptyRequest>(body).map(|_| ApiRequest::Resume),
    },
    Endpoint {
        method: "PUT",
        path: "/v1/vm/shutdown",
        parse: |body, _| optional_json::<EmptyRequest>(body).map(|_| ApiRequest::Shutdown),
    },
    Endpoint {
        method: "PUT",
        path: "/v1/vm/snapshot",
        parse: |body, _| json_body::<SnapshotRequest>(body).map(ApiRequest::Snapshot),
    },
    Endpoint {
        method: "PUT",
        path: "/v1/vm/checkpoint",
        parse: |body, _| json_body::<CheckpointRequest>(body).map(ApiRequest::Checkpoint),
    },
    Endpoint {
        method: "PUT",
        path: "/v1/vm/rollback",
        parse: |body, _| json_body::<RollbackRequest>(body).map(ApiRequest::Rollback),
    },
    Endpoint {
        method: "PUT",
        path: "/v1/vm/migrate",
        parse: |body, _| {
            json_body::<MigrateRequest>(body).map(|m| ApiRequest::Migrate(Box::new(m)))
        },
    },
    Endpoint {
        method: "GET",
        path: "/v1/jobs",
        parse: |body, _| no_body(body).map(|()| ApiRequest::ListJobs),
    },
    Endpoint {
        method: "GET",
        path: "/v1/jobs/{id}",
        parse: |body, id| no_body(body).and(job_id(id)).map(ApiRequest::GetJob),
    },
    Endpoint {
        method: "DELETE",
        path: "/v1/jobs/{id}",
        parse: |body, id| no_body(body).and(job_id(id)).map(ApiRequest::CancelJob),
    },
];

/// A job id from a path.
fn job_id(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| format!("invalid job id {s:?}: expected a number"))
}

/// Whether `path` matches `pattern`; the parameter's value, if any.
fn match_path<'p>(pattern: &str, path: &'p str) -> Option<&'p str> {
    match pattern.strip_suffix(PARAM) {
        None => (pattern == path).then_some(""),
        Some(prefix) => path
            .strip_prefix(prefix)
            .filter(|v| !v.is_empty() && !v.contains('/')),
    }
}

/// Every (method, path) the API serves, in table order.
pub fn endpoints() -> impl Iterator<Item = (&'static str, &'static str)> {
    ENDPOINTS.iter().map(|e| (e.method, e.path))
}

/// Whether a body is absent (empty or only whitespace).
fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

/// Accepts only an absent body.
fn no_body(body: &[u8]) -> Result<(), String> {
    if is_blank(body) {
        Ok(())
    } else {
        Err("this endpoint takes no request body".to_string())
    }
}

/// Parses a required JSON body, which must be an object.
fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    if is_blank(body) {
        return Err("this endpoint needs a JSON request body".to_string());
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON request body: {e}"))?;
    if !value.is_object() {
        return Err("invalid JSON request body: expected a JSON object".to_string());
    }
    serde_json::from_value(value).map_err(|e| format!("invalid JSON request body: {e}"))
}

/// Parses an optional JSON body; an absent body is `T::default()`.
fn optional_json<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, String> {
    if is_blank(body) {
        Ok(T::default())
    } else {
        json_body(body)
    }
}

/// Finds the endpoint for `method` and `path` and parses `body` for it.
///
/// Errors are ready-made responses: 404 for an unknown path, 405 with an
/// `Allow` header for a known path with another method, 400 for a bad body.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiResponse> {
    let mut allowed: Vec<&str> = Vec::new();
    for endpoint in ENDPOINTS {
        let Some(param) = match_path(endpoint.path, path) else {
            continue;
        };
        if endpoint.method == method {
            return (endpoint.parse)(body, param).map_err(|msg| ApiResponse::error(400, msg));
        }
        allowed.push(endpoint.method);
    }
    if allowed.is_empty() {
        return Err(ApiResponse::error(404, format!("no endpoint at {path}")));
    }
    let allow = allowed.join(", ");
    Err(ApiResponse::error(
        405,
        format!("method {method} is not allowed on {path} (allowed: {allow})"),
    )
    .with_header("Allow", allow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_endpoint_routes() {
        assert_eq!(route("GET", "/v1/ping", b""), Ok(ApiRequest::Ping));
        assert_eq!(route("GET", "/v1/vm", b""), Ok(ApiRequest::GetVm));
        assert_eq!(route("PUT", "/v1/vm/pause", b""), Ok(ApiRequest::Pause));
        assert_eq!(route("PUT", "/v1/vm/resume", b"{}"), Ok(ApiRequest::Resume));
        assert_eq!(
            route("PUT", "/v1/vm/shutdown", b" { }\n"),
            Ok(ApiRequest::Shutdown)
        );
        for (body, stop, detach) in [
            (&br#"{"path": "/s/a", "stop": true}"#[..], true, false),
            (br#"{"path": "/s/a"}"#, false, false),
            (br#"{"path": "/s/a", "detach": true}"#, false, true),
        ] {
            assert_eq!(
                route("PUT", "/v1/vm/snapshot", body),
                Ok(ApiRequest::Snapshot(SnapshotRequest {
                    path: "/s/a".into(),
                    stop,
                    detach,
                    mode: None,
                    disk_mode: None,
                    parent: None,
                }))
            );
        }
        match route(
            "PUT",
            "/v1/vm/migrate",
            br#"{"destination": "tcp:10.0.0.2:4444", "mode": "warm"}"#,
        ) {
            Ok(ApiRequest::Migrate(m)) => {
                assert_eq!(m.destination, "tcp:10.0.0.2:4444");
                assert_eq!(m.mode.as_deref(), Some("warm"));
                assert!(!m.insecure && !m.detach && m.psk_file.is_none());
            }
            other => panic!("{other:?}"),
        }
        assert!(route("PUT", "/v1/vm/migrate", br#"{"dest": "x"}"#).is_err());
        assert_eq!(route("GET", "/v1/jobs", b""), Ok(ApiRequest::ListJobs));
        assert_eq!(route("GET", "/v1/jobs/7", b""), Ok(ApiRequest::GetJob(7)));
        assert_eq!(
            route("DELETE", "/v1/jobs/12", b""),
            Ok(ApiRequest::CancelJob(12))
        );
        assert_eq!(
            route("PUT", "/v1/vm/snapshot", b"").unwrap_err().status,
            400
        );
    }

    #[test]
    fn unknown_path_is_404() {
        for path in [
            "/",
            "/v1",
            "/v1/vm/",
            "/v2/vm",
            "/v1/vm/pause/x",
            "/v1/jobs/",
            "/v1/jobs/1/x",
        ] {
            let resp = route("GET", path, b"").unwrap_err();
            assert_eq!(resp.status, 404, "{path}");
            assert_eq!(
                resp.body,
                json!({ "error": format!("no endpoint at {path}") })
            );
        }
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        let resp = route("POST", "/v1/vm/pause", b"").unwrap_err();
        assert_eq!(resp.status, 405);
        assert_eq!(resp.headers, vec![("Allow".into(), "PUT".into())]);
        assert!(resp.body["error"]
            .as_str()
            .unwrap()
            .contains("allowed: PUT"));
        let resp = route("get", "/v1/vm", b"").unwrap_err();
        assert_eq!(resp.status, 405);
        assert_eq!(resp.headers, vec![("Allow".into(), "GET".into())]);
        let resp = route("PUT", "/v1/jobs/3", b"").unwrap_err();
        assert_eq!(resp.headers, vec![("Allow".into(), "GET, DELETE".into())]);
    }

    #[test]
    fn bad_bodies_are_400() {
        let msg = |method, path, body: &[u8]| {
            let resp = route(method, path, body).unwrap_err();
            assert_eq!(resp.status, 400);
            resp.body["error"].as_str().unwrap().to_string()
        };
        assert!(msg("PUT", "/v1/vm/pause", b"{").contains("invalid JSON request body"));
        assert!(msg("PUT", "/v1/vm/pause", b"[]").contains("invalid JSON"));
        assert_eq!(
            msg("PUT", "/v1/vm/pause", b"{\"force\":true}"),
            "invalid JSON request body: unknown field `force`, there are no fields"
        );
        assert!(msg("GET", "/v1/vm", b"{}").contains("takes no request body"));
        assert_eq!(
            msg("GET", "/v1/jobs/abc", b""),
            "invalid job id \"abc\": expected a number"
        );
    }

    #[test]
    fn response_helpers() {
        let r = ApiResponse::action(VmState::Paused, "paused");
        assert!(r.is_success());
        assert_eq!(r.body, json!({"state": "paused", "message": "paused"}));
        let http = ApiResponse::error(409, "already paused").to_http();
        assert_eq!(http.status, 409);
        assert_eq!(http.body, b"{\"error\":\"already paused\"}\n");
    }
}
