//! A minimal, strict HTTP/1.1 message layer for one request per connection.
//!
//! The server side reads one request ([`read_request`]) and writes one
//! response ([`write_response`]); the client side writes one request
//! ([`write_request`]) and reads one response ([`read_response`]). Heads are
//! parsed with `httparse`; bodies are delimited by `Content-Length` only
//! (chunked transfer coding is refused with 501). Every response says
//! `Connection: close`.
//!
//! Limits: a request head is at most [`MAX_HEAD_BYTES`], a request body at
//! most [`MAX_BODY_BYTES`]. A request with `Expect: 100-continue` gets an
//! interim `100 Continue` before its body is read (curl sends that header
//! for bodies over 1 KiB and otherwise waits a second before sending).

use std::io::{self, Read, Write};

/// The largest request (or response) head accepted, in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The largest response body the client side accepts, in bytes.
pub const MAX_RESPONSE_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The most header fields a message may have.
pub const MAX_HEADERS: usize = 64;

/// How much is read from the stream at a time.
const READ_CHUNK: usize = 8 * 1024;

/// Why a message could not be read.
///
/// [`HttpError::status`] tells which response, if any, a server should send.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The peer closed the connection before sending a single byte.
    #[error("the connection was closed before a message was received")]
    Closed,
    /// The peer sent nothing for too long.
    #[error("timed out waiting for the peer")]
    TimedOut,
    /// Reading or writing the stream failed.
    #[error("I/O error: {0}")]
    Io(#[source] io::Error),
    /// The message does not parse, or its framing is inconsistent.
    #[error("{0}")]
    Malformed(String),
    /// The head did not end within [`MAX_HEAD_BYTES`].
    #[error("the message head is larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// The head has more than [`MAX_HEADERS`] header fields.
    #[error("the message has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    /// The declared body is larger than allowed.
    #[error("the body of {len} bytes is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The declared length.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// Body bytes arrived without a `Content-Length` header.
    #[error("a request body needs a Content-Length header")]
    LengthRequired,
    /// The request used a `Transfer-Encoding` (such as chunked).
    #[error("Transfer-Encoding {0:?} is not supported; send the body with Content-Length")]
    UnsupportedTransferEncoding(String),
    /// The request had an `Expect` other than `100-continue`.
    #[error("Expect {0:?} is not supported (only 100-continue is)")]
    ExpectationFailed(String),
    /// The peer closed the connection before the whole body arrived.
    #[error("the connection was closed after {got} of {expected} body bytes")]
    TruncatedBody {
        /// Body bytes received.
        got: usize,
        /// Body bytes announced.
        expected: usize,
    },
}

impl HttpError {
    /// The status a server should answer with, or `None` when the peer is
    /// gone or answering is pointless.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Closed | HttpError::Io(_) | HttpError::TruncatedBody { .. } => None,
            HttpError::TimedOut => Some(408),
            HttpError::Malformed(_) => Some(400),
            HttpError::HeadTooLarge | HttpError::TooManyHeaders => Some(431),
            HttpError::BodyTooLarge { .. } => Some(413),
            HttpError::LengthRequired => Some(411),
            HttpError::UnsupportedTransferEncoding(_) => Some(501),
            HttpError::ExpectationFailed(_) => Some(417),
        }
    }
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HttpError::TimedOut,
            _ => HttpError::Io(e),
        }
    }
}

/// The standard reason phrase of a status code (empty if unknown).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Finds a header by name, ignoring ASCII case.
fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One request as received by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (methods are case-sensitive).
    pub method: String,
    /// The path: the request target up to `?`.
    pub path: String,
    /// What followed `?` in the request target, if there was a `?`.
    pub query: Option<String>,
    /// The header fields in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body (empty if there was none).
    pub body: Vec<u8>,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// One response to be written by the server.
///
/// [`write_response`] adds `Content-Type: application/json`,
/// `Content-Length` and `Connection: close` itself; `headers` holds only
/// extra fields (such as `Allow`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Extra header fields.
    pub headers: Vec<(String, String)>,
    /// The body (JSON).
    pub body: Vec<u8>,
}

/// One response as received by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedResponse {
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: String,
    /// The header fields in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl ReceivedResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// Reads up to [`READ_CHUNK`] more bytes into `buf`, never growing it past
/// `limit`. Returns how many bytes were read (0 at end of stream).
fn read_more<R: Read>(r: &mut R, buf: &mut Vec<u8>, limit: usize) -> Result<usize, HttpError> {
    let start = buf.len();
    let want = limit.saturating_sub(start).min(READ_CHUNK);
    buf.resize(start + want, 0);
    let result = loop {
        match r.read(&mut buf[start..]) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    match result {
        Ok(n) => {
            buf.truncate(start + n);
            Ok(n)
        }
        Err(e) => {
            buf.truncate(start);
            Err(e.into())
        }
    }
}

/// Copies httparse's borrowed headers into owned pairs.
fn own_headers(headers: &[httparse::Header<'_>]) -> Result<Vec<(String, String)>, HttpError> {
    headers
        .iter()
        .map(|h| {
            let value = std::str::from_utf8(h.value).map_err(|_| {
                HttpError::Malformed(format!("header {} is not valid UTF-8", h.name))
            })?;
            Ok((h.name.to_string(), value.trim().to_string()))
        })
        .collect()
}

/// The body length declared by `Content-Length`, if any. Several fields
/// must agree; the value must be plain decimal digits.
fn content_length(headers: &[(String, String)]) -> Result<Option<u64>, HttpError> {
    let mut length = None;
    for (_, value) in headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        let parsed = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
            value.parse::<u64>().ok()
        } else {
            None
        };
        let Some(parsed) = parsed else {
            return Err(HttpError::Malformed(format!(
                "invalid Content-Length {value:?}"
            )));
        };
        if length.is_some_and(|l| l != parsed) {
            return Err(HttpError::Malformed(
                "conflicting Content-Length headers".to_string(),
            ));
        }
        length = Some(parsed);
    }
    Ok(length)
}

/// Reads from `r` into `buf` until `parse` finds a complete head, and
/// returns what `parse` made of it plus the head's length in bytes.
fn read_head<R: Read, T>(
    r: &mut R,
    buf: &mut Vec<u8>,
    mut parse: impl FnMut(&[u8]) -> Result<Option<(T, usize)>, HttpError>,
) -> Result<(T, usize), HttpError> {
    loop {
        if !buf.is_empty() {
            if let Some(done) = parse(buf)? {
                return Ok(done);
            }
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(HttpError::HeadTooLarge);
        }
        if read_more(r, buf, MAX_HEAD_BYTES)? == 0 {
            return Err(if buf.is_empty() {
                HttpError::Closed
            } else {
                HttpError::Malformed("the connection was closed in the middle of the head".into())
            });
        }
    }
}

/// Maps an httparse error on a head.
fn head_error(e: httparse::Error) -> HttpError {
    match e {
        httparse::Error::TooManyHeaders => HttpError::TooManyHeaders,
        e => HttpError::Malformed(format!("malformed message head: {e}")),
    }
}

/// Reads the rest of a body of `len` bytes, `buf` holding its start.
fn read_body<R: Read>(r: &mut R, mut buf: Vec<u8>, len: usize) -> Result<Vec<u8>, HttpError> {
    buf.reserve_exact(len.saturating_sub(buf.len()));
    while buf.len() < len {
        if read_more(r, &mut buf, len)? == 0 {
            return Err(HttpError::TruncatedBody {
                got: buf.len(),
                expected: len,
            });
        }
    }
    Ok(buf)
}

/// The parsed request line and header fields.
struct RequestHead {
    method: String,
    target: String,
    minor_version: u8,
    headers: Vec<(String, String)>,
}

/// Reads one request from `stream`.
///
/// The stream is also written to: a request carrying
/// `Expect: 100-continue` and a body is answered with an interim
/// `HTTP/1.1 100 Continue` before the body is read. Errors carry the status
/// to answer with ([`HttpError::status`]); nothing is written for them here.
pub fn read_request<S: Read + Write>(stream: &mut S) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(READ_CHUNK);
    let (head, head_len) = read_head(stream, &mut buf, |bytes| {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(bytes).map_err(head_error)? {
            httparse::Status::Partial => Ok(None),
            httparse::Status::Complete(n) => {
                let head = RequestHead {
                    method: req.method.unwrap_or_default().to_string(),
                    target: req.path.unwrap_or_default().to_string(),
                    minor_version: req.version.unwrap_or(1),
                    headers: own_headers(req.headers)?,
                };
                Ok(Some((head, n)))
            }
        }
    })?;
    let RequestHead {
        method,
        target,
        minor_version,
        headers,
    } = head;

    if !target.starts_with('/') {
        return Err(HttpError::Malformed(format!(
            "request target {target:?} must be a path starting with '/'"
        )));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target, None),
    };

    if let Some(te) = find_header(&headers, "transfer-encoding") {
        return Err(HttpError::UnsupportedTransferEncoding(te.to_string()));
    }
    let received = buf.split_off(head_len);
    let len = match content_length(&headers)? {
        Some(len) => len,
        None if received.is_empty() => 0,
        None => return Err(HttpError::LengthRequired),
    };
    if len > MAX_BODY_BYTES as u64 {
        return Err(HttpError::BodyTooLarge {
            len,
            limit: MAX_BODY_BYTES,
        });
    }
    let len = len as usize;
    if received.len() > len {
        return Err(HttpError::Malformed(
            "unexpected data after the request body (one request per connection)".into(),
        ));
    }
    if minor_version >= 1 {
        if let Some(expect) = find_header(&headers, "expect") {
            if !expect.eq_ignore_ascii_case("100-continue") {
                return Err(HttpError::ExpectationFailed(expect.to_string()));
            }
            // A client that already started sending the body needs no go-ahead.
            if len > 0 && received.is_empty() {
                stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
                stream.flush()?;
            }
        }
    }
    let body = read_body(stream, received, len)?;
    Ok(Request {
        method,
        path,
        query,
        headers,
        body,
    })
}

/// Checks that a header name or value cannot break the message framing.
fn check_header_text(text: &str) -> io::Result<()> {
    if text.bytes().any(|b| b == b'\r' || b == b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("header text {text:?} contains a line break"),
        ));
    }
    Ok(())
}

/// Writes `resp` with `Content-Type: application/json`, its
/// `Content-Length` and `Connection: close`, in one write.
pub fn write_response<W: Write>(w: &mut W, resp: &Response) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        reason_phrase(resp.status),
        resp.body.len()
    );
    for (name, value) in &resp.headers {
        check_header_text(name)?;
        check_header_text(value)?;
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&resp.body);
    w.write_all(&bytes)?;
    w.flush()
}

/// Writes one request: `Host: localhost`, `Connection: close`, and with a
/// body `Content-Type: application/json` and its `Content-Length`. A
/// bodiless request other than `GET`/`HEAD` says `Content-Length: 0`.
pub fn write_request<W: Write>(
    w: &mut W,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> io::Result<()> {
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid method {method:?}"),
        ));
    }
    if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid request path {path:?}"),
        ));
    }
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: stasis/{}\r\n\
         Accept: application/json\r\nConnection: close\r\n",
        env!("CARGO_PKG_VERSION")
    );
    match body {
        Some(body) => out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )),
        None if method != "GET" && method != "HEAD" => out.push_str("Content-Length: 0\r\n"),
        None => {}
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    w.write_all(&bytes)?;
    w.flush()
}

/// Reads one response. Interim `1xx` responses are skipped; the body is
/// read by `Content-Length`, or until the end of the stream without one.
pub fn read_response<R: Read>(r: &mut R) -> Result<ReceivedResponse, HttpError> {
    let mut buf = Vec::with_capacity(READ_CHUNK);
    loop {
        let ((status, reason, headers), head_len) = read_head(r, &mut buf, |bytes| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(bytes).map_err(head_error)? {
                httparse::Status::Partial => Ok(None),
                httparse::Status::Complete(n) => Ok(Some((
                    (
                        resp.code.unwrap_or_default(),
                        resp.reason.unwrap_or_default().to_string(),
                        own_headers(resp.headers)?,
                    ),
                    n,
                ))),
            }
        })?;
        let rest = buf.split_off(head_len);
        if status == 101 {
            return Err(HttpError::Malformed(
                "unexpected 101 Switching Protocols".into(),
            ));
        }
        if (100..200).contains(&status) {
            buf = rest;
            continue;
        }
        if let Some(te) = find_header(&headers, "transfer-encoding") {
            return Err(HttpError::Malformed(format!(
                "unsupported response Transfer-Encoding {te:?}"
            )));
        }
        let body = if status == 204 || status == 304 {
            Vec::new()
        } else if let Some(len) = content_length(&headers)? {
            if len > MAX_RESPONSE_BODY_BYTES as u64 {
                return Err(HttpError::BodyTooLarge {
                    len,
                    limit: MAX_RESPONSE_BODY_BYTES,
                });
            }
            let mut body = read_body(r, rest, len as usize)?;
            // Anything after the declared body is ignored.
            body.truncate(len as usize);
            body
        } else {
            let mut body = rest;
            while read_more(r, &mut body, MAX_RESPONSE_BODY_BYTES + 1)? > 0 {
                if body.len() > MAX_RESPONSE_BODY_BYTES {
                    return Err(HttpError::BodyTooLarge {
                        len: body.len() as u64,
                        limit: MAX_RESPONSE_BODY_BYTES,
                    });
                }
            }
            body
        };
        return Ok(ReceivedResponse {
            status,
            reason,
            headers,
            body,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::thread;

    /// Sends `raw` from a client socket and runs `read_request` on the
    /// server end; returns the result and whatever the server wrote back.
    fn serve_raw(raw: &[u8]) -> (Result<Request, HttpError>, Vec<u8>) {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        let raw = raw.to_vec();
        let writer = thread::spawn(move || {
            // The server may stop reading early; a failed write is fine here.
            let _ = client.write_all(&raw);
            let _ = client.shutdown(std::net::Shutdown::Write);
            let mut back = Vec::new();
            let _ = client.read_to_end(&mut back);
            back
        });
        let result = read_request(&mut server);
        drop(server);
        (result, writer.join().unwrap())
    }

    #[test]
    fn simple_get() {
        let (req, back) = serve_raw(b"GET /v1/vm?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let req = req.unwrap();
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/v1/vm");
        assert_eq!(req.query.as_deref(), Some("x=1"));
        assert_eq!(req.header("HOST"), Some("localhost"));
        assert!(req.body.is_empty());
        assert!(back.is_empty());
    }

    #[test]
    fn body_by_content_length() {
        let (req, _) = serve_raw(b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!(req.unwrap().body, b"{}");
    }

    #[test]
    fn framing_errors() {
        let status = |raw: &[u8]| serve_raw(raw).0.unwrap_err().status();
        assert_eq!(
            status(b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
            Some(501)
        );
        assert_eq!(status(b"PUT /a HTTP/1.1\r\n\r\n{}"), Some(411));
        assert_eq!(
            status(b"PUT /a HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status(b"PUT /a HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status(b"PUT /a HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status(b"PUT /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            status(b"PUT /a HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n"),
            Some(413)
        );
        assert_eq!(
            status(b"PUT /a HTTP/1.1\r\nContent-Length: 1\r\n\r\n{}"),
            Some(400)
        );
        assert_eq!(status(b"GET a HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(
            status(b"GET /a HTTP/1.1\r\nExpect: magic\r\n\r\n"),
            Some(417)
        );
        assert_eq!(status(b"NOT HTTP AT ALL\r\n\r\n"), Some(400));
        let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            status(format!("GET /a HTTP/1.1\r\n{many}\r\n").as_bytes()),
            Some(431)
        );
        let big = format!(
            "GET /a HTTP/1.1\r\nX: {}\r\n\r\n",
            "y".repeat(MAX_HEAD_BYTES)
        );
        assert_eq!(status(big.as_bytes()), Some(431));
    }

    #[test]
    fn peer_gone() {
        assert!(matches!(serve_raw(b"").0, Err(HttpError::Closed)));
        let (r, _) = serve_raw(b"GET /a HT");
        assert_eq!(r.unwrap_err().status(), Some(400));
        let (r, _) = serve_raw(b"PUT /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}");
        assert!(matches!(
            r,
            Err(HttpError::TruncatedBody {
                got: 2,
                expected: 10
            })
        ));
    }

    #[test]
    fn expect_continue_is_answered_before_the_body() {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || read_request(&mut server).map(|r| r.body));
        client
            .write_all(b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
            .unwrap();
        let mut interim = [0u8; 25];
        client.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        client.write_all(b"{}").unwrap();
        assert_eq!(t.join().unwrap().unwrap(), b"{}");
    }

    #[test]
    fn expect_continue_not_sent_when_body_already_there() {
        let (req, back) =
            serve_raw(b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n{}");
        assert_eq!(req.unwrap().body, b"{}");
        assert!(back.is_empty());
    }

    #[test]
    fn response_round_trip_skips_interim() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
        write_response(
            &mut a,
            &Response {
                status: 405,
                headers: vec![("Allow".into(), "GET".into())],
                body: b"{\"error\":\"x\"}\n".to_vec(),
            },
        )
        .unwrap();
        drop(a);
        let resp = read_response(&mut b).unwrap();
        assert_eq!(resp.status, 405);
        assert_eq!(resp.reason, "Method Not Allowed");
        assert_eq!(resp.header("allow"), Some("GET"));
        assert_eq!(resp.header("content-type"), Some("application/json"));
        assert_eq!(resp.header("connection"), Some("close"));
        assert_eq!(resp.body, b"{\"error\":\"x\"}\n");
    }

    #[test]
    fn response_without_length_reads_to_eof() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(b"HTTP/1.1 200 OK\r\n\r\n{\"ok\":true}")
            .unwrap();
        drop(a);
        assert_eq!(read_response(&mut b).unwrap().body, b"{\"ok\":true}");
    }

    #[test]
    fn request_round_trip() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        write_request(&mut a, "PUT", "/v1/vm/pause", Some(b"{}")).unwrap();
        let req = read_request(&mut b).unwrap();
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/v1/vm/pause");
        assert_eq!(req.body, b"{}");
        assert_eq!(req.header("content-type"), Some("application/json"));

        write_request(&mut a, "PUT", "/x", None).unwrap();
        let req = read_request(&mut b).unwrap();
        assert_eq!(req.header("content-length"), Some("0"));
    }

    #[test]
    fn write_refuses_header_injection() {
        let mut out = Vec::new();
        let resp = Response {
            status: 200,
            headers: vec![("X".into(), "a\r\nEvil: 1".into())],
            body: Vec::new(),
        };
        assert!(write_response(&mut out, &resp).is_err());
        assert!(write_request(&mut out, "GET", "/a b", None).is_err());
        assert!(write_request(&mut out, "G\nET", "/a", None).is_err());
    }
}
