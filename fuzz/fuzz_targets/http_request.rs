//! The control API as its server reads requests off a VM's socket:
//! [`http::read_request`] (the head with `httparse`, `Content-Length`,
//! `Expect: 100-continue`, the body), then [`routes::route`], which picks
//! the endpoint and decodes its JSON body into the request types of
//! `stasis_api::types` (snapshot, checkpoint, rollback, migrate, ...), and
//! the answer as `serve_connection` writes it ([`ApiResponse::to_http`],
//! [`http::write_response`]). What the server writes must read back with
//! the client's [`http::read_response`] as the same status and body.
//!
//! Input: a mode byte, then
//! * `E`: a selector byte (an index into [`routes::endpoints`]), then for
//!   a path ending in `{id}` the id up to a newline, then the body: the
//!   body goes to [`routes::route`] directly, past the HTTP layer, so that
//!   the fuzzer need not keep `Content-Length` right;
//! * `C`: a response, as the client (`stasis` subcommands) reads it with
//!   [`http::read_response`];
//! * anything else: the bytes a client sends, arriving in reads of at
//!   most `CHUNKS[mode % 4]` bytes (a socket delivers requests in pieces).
//!
//! The handler is not called (it is the VM); a request that routes is
//! answered as `/v1/ping` is. Seeds: the requests of docs/API.md, in
//! `corpus/http_request/`.

#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use stasis_api::{http, routes, ApiResponse, PingResponse};

/// How many bytes one read returns at most, by `mode % 4`.
const CHUNKS: [usize; 4] = [13, 256, 4096, usize::MAX];

/// A connection: reads return the client's bytes in pieces of at most
/// `chunk`; what the server writes (an interim `100 Continue`) is dropped.
struct Conn<'a> {
    input: &'a [u8],
    chunk: usize,
}

impl Read for Conn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Conn<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes `resp` as the server does and reads it back as the client does.
fn answer(resp: ApiResponse) {
    let msg = resp.to_http();
    let mut out = Vec::new();
    http::write_response(&mut out, &msg).expect("the API's own headers have no line breaks");
    let back = http::read_response(&mut out.as_slice()).expect("the client reads the server");
    assert_eq!((back.status, &back.body), (msg.status, &msg.body));
}

/// Routes a request as the server's `respond` does, the VM left out.
fn respond(method: &str, path: &str, body: &[u8]) {
    answer(match routes::route(method, path, body) {
        Err(resp) => resp,
        Ok(_) => ApiResponse::ok(&PingResponse { ok: true }),
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode {
        b'E' => {
            let Some((&sel, rest)) = rest.split_first() else { return };
            let endpoints: Vec<_> = routes::endpoints().collect();
            let (method, pattern) = endpoints[usize::from(sel) % endpoints.len()];
            let (path, body) = match pattern.strip_suffix("{id}") {
                Some(prefix) => {
                    let cut = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
                    let id = String::from_utf8_lossy(&rest[..cut]);
                    (format!("{prefix}{id}"), rest.get(cut + 1..).unwrap_or_default())
                }
                None => (pattern.to_string(), rest),
            };
            respond(method, &path, body);
        }
        b'C' => {
            let _ = http::read_response(&mut Conn { input: rest, chunk: usize::MAX });
        }
        _ => {
            let mut conn = Conn { input: rest, chunk: CHUNKS[usize::from(mode) % 4] };
            match http::read_request(&mut conn) {
                Ok(req) => respond(&req.method, &req.path, &req.body),
                Err(e) => {
                    if let Some(status) = e.status() {
                        answer(ApiResponse::error(status, e.to_string()));
                    }
                }
            }
        }
    }
});
