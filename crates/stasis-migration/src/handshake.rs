//! The opening of a migration, both sides: versions (hello, welcome or
//! refuse), then the VM (vm-description, accept or refuse). Nothing of
//! guest memory moves before both are settled, and a refusal's reason
//! travels to the other side so that the person starting the migration
//! sees why.

use std::io::{Read, Write};

use crate::error::{Error, Result};
use crate::frame::{Frame, FrameKind, FrameReader, FrameWriter};
use crate::message::{Hello, Join, Message, Refusal, VmDescription, Welcome};
use crate::{negotiate, FILES_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

fn send<W: Write>(w: &mut FrameWriter<W>, m: &Message) -> Result<()> {
    let (kind, payload) = m.encode()?;
    w.write(kind, &payload)?;
    w.flush()
}

/// The next frame; the end of the stream here is an error naming what was
/// awaited.
fn expect_frame<R: Read>(r: &mut FrameReader<R>, expected: &str) -> Result<Frame> {
    r.next_frame()?.ok_or_else(|| Error::Truncated {
        what: format!("the handshake (the peer closed the connection before its {expected})"),
    })
}

fn unexpected(expected: &str, got: FrameKind) -> Error {
    let article = if got.name().starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    Error::Unexpected {
        expected: expected.into(),
        got: format!("{article} {got} frame"),
    }
}

/// Source side of the version handshake: sends hello, returns the
/// destination's welcome, or its refusal as [`Error::Refused`].
pub fn source_hello<R: Read, W: Write>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    software: &str,
) -> Result<Welcome> {
    send(
        w,
        &Message::Hello(Hello {
            protocol_min: MIN_PROTOCOL_VERSION,
            protocol_max: PROTOCOL_VERSION,
            software: software.into(),
        }),
    )?;
    let f = expect_frame(r, "welcome")?;
    match Message::decode(&f)? {
        Message::Welcome(w) => {
            // The destination must have picked a version we speak.
            if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&w.protocol) {
                return Err(Error::NoCommonVersion {
                    ours: (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
                    theirs: (w.protocol, w.protocol),
                });
            }
            Ok(w)
        }
        Message::Refuse(r) => Err(Error::Refused { reason: r.reason }),
        m => Err(unexpected("a welcome or refuse frame", m.kind())),
    }
}

/// Destination side of the version handshake: reads hello, answers
/// welcome with the version chosen (and, from version 2, a fresh session
/// token for further connections), or refuse naming both ranges (and
/// returns that error).
pub fn destination_hello<R: Read, W: Write>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    software: &str,
) -> Result<(Hello, Welcome)> {
    let f = expect_frame(r, "hello")?;
    let hello = match Message::decode(&f)? {
        Message::Hello(h) => h,
        m => return Err(unexpected("a hello frame", m.kind())),
    };
    match negotiate(hello.protocol_min, hello.protocol_max) {
        Ok(v) => {
            let session = match v >= FILES_PROTOCOL_VERSION {
                true => Some(
                    crate::auth::random_nonce()?[..16]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect(),
                ),
                false => None,
            };
            let welcome = Welcome {
                protocol: v,
                software: software.into(),
                session,
            };
            send(w, &Message::Welcome(welcome.clone()))?;
            Ok((hello, welcome))
        }
        Err(e) => {
            let _ = send(
                w,
                &Message::Refuse(Refusal {
                    reason: e.to_string(),
                }),
            );
            Err(e)
        }
    }
}

/// Source side: describes the VM; `Ok` once the destination accepted it,
/// its refusal as [`Error::Refused`] (before any memory moved).
pub fn source_offer<R: Read, W: Write>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    vm: VmDescription,
) -> Result<()> {
    send(w, &Message::VmDescription(vm))?;
    let f = expect_frame(r, "answer to the VM description")?;
    match Message::decode(&f)? {
        Message::Accept => Ok(()),
        Message::Refuse(r) => Err(Error::Refused { reason: r.reason }),
        m => Err(unexpected("an accept or refuse frame", m.kind())),
    }
}

/// Destination side: reads the VM description and asks `check` whether
/// this host can run it; answers accept, or refuse with the reason `check`
/// gave (returned as [`Error::Refused`]).
pub fn destination_check<R: Read, W: Write>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    check: impl FnOnce(&VmDescription) -> std::result::Result<(), String>,
) -> Result<VmDescription> {
    let f = expect_frame(r, "VM description")?;
    let vm = match Message::decode(&f)? {
        Message::VmDescription(d) => d,
        m => return Err(unexpected("a vm-description frame", m.kind())),
    };
    match check(&vm) {
        Ok(()) => {
            send(w, &Message::Accept)?;
            Ok(vm)
        }
        Err(reason) => {
            let _ = send(
                w,
                &Message::Refuse(Refusal {
                    reason: reason.clone(),
                }),
            );
            Err(Error::Refused { reason })
        }
    }
}

/// Source side of a further connection (`--connections N`): joins the
/// migration `session` as connection `index`; `Ok` once the destination
/// accepted it.
pub fn source_join<R: Read, W: Write>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    session: &str,
    index: u32,
) -> Result<()> {
    send(
        w,
        &Message::Join(Join {
            session: session.into(),
            index,
        }),
    )?;
    let f = expect_frame(r, "answer to the join")?;
    match Message::decode(&f)? {
        Message::Accept => Ok(()),
        Message::Refuse(r) => Err(Error::Refused { reason: r.reason }),
        m => Err(unexpected("an accept or refuse frame", m.kind())),
    }
}

/// Destination side of a further connection: reads its join, checks the
/// session token, answers accept or refuse; returns the connection's
/// number.
pub fn destination_join<R: Read, W: Write>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    session: &str,
) -> Result<u32> {
    let f = expect_frame(r, "join")?;
    let join = match Message::decode(&f)? {
        Message::Join(j) => j,
        m => return Err(unexpected("a join frame", m.kind())),
    };
    if join.session != session {
        let reason = "a connection joined with the wrong session token".to_string();
        let _ = send(
            w,
            &Message::Refuse(Refusal {
                reason: reason.clone(),
            }),
        );
        return Err(Error::Refused { reason });
    }
    send(w, &Message::Accept)?;
    Ok(join.index)
}
