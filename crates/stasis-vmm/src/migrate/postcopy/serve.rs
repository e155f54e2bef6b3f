//! The source's side of post-copy (see [`super`]): once the state is sent
//! it answers the destination's page requests, and after the destination
//! said the VM runs there it streams every stale page in address order,
//! requested ones first, until the destination has them all.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::{Duration, Instant};

use stasis_migration::{FrameReader, FrameWriter, Message, PAGE_SIZE};
use stasis_snapshot::Progress;

use super::StaleSet;
use crate::migrate::pages::PageSender;
use crate::migrate::{MigrateError, IO_TIMEOUT};

/// How a post-copy ended badly.
#[derive(Debug)]
pub enum ServeError {
    /// Before the destination said the VM runs there: the source still
    /// has all of it and resumes it.
    BeforeResume(MigrateError),
    /// After: the VM ran at the destination and part of its memory is
    /// here only; it is lost.
    Lost(MigrateError),
}

/// What post-copy did, for the report.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServeStats {
    /// When the destination said the VM runs there (the end of the
    /// guest's pause).
    pub resumed: Option<Instant>,
    /// Stale pages sent.
    pub pages: u64,
    /// Ranges the destination asked for.
    pub requests: u64,
    /// From the destination's resumption to its last page, in ms.
    pub ms: f64,
}

/// What the reader thread passes on.
enum FromDestination {
    Request(Vec<(u64, u64)>),
    Resumed,
    Complete,
    Failed(MigrateError),
}

/// The most bytes one requested range may span (the destination asks for
/// 64 KiB around a fault).
const MAX_REQUEST: u64 = 1 << 20;

/// Pages written to the stream between two looks at the requests.
const BACKGROUND_STEP: u64 = 64 * PAGE_SIZE as u64;

/// Serves post-copy: `stale` are the pages the destination dropped. The
/// destination's resumed frame comes through here (page requests may
/// come before it: building the VM touches memory).
pub fn serve<R: Read + Send, W: Write>(
    stale: &StaleSet,
    sender: &mut PageSender<'_>,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    progress: &Progress,
) -> Result<ServeStats, ServeError> {
    std::thread::scope(|scope| {
        // Made here, so that an early return drops the receiving end
        // before the scope joins the reader, which then ends at its next
        // message (a keepalive comes every second).
        let (tx, rx) = channel();
        let spawned = std::thread::Builder::new()
            .name("postcopy-requests".into())
            .spawn_scoped(scope, move || loop {
                let m = match r.next_frame() {
                    Ok(Some(f)) => match Message::decode(&f) {
                        Ok(Message::PageRequest(v)) => FromDestination::Request(v),
                        Ok(Message::Resumed) => FromDestination::Resumed,
                        Ok(Message::PostcopyComplete) => FromDestination::Complete,
                        Ok(Message::Refuse(refusal)) => FromDestination::Failed(
                            stasis_migration::Error::Refused {
                                reason: refusal.reason,
                            }
                            .into(),
                        ),
                        Ok(m) => FromDestination::Failed(MigrateError::Local(format!(
                            "the destination sent a {} frame during post-copy",
                            m.kind()
                        ))),
                        Err(e) => FromDestination::Failed(e.into()),
                    },
                    Ok(None) => FromDestination::Failed(MigrateError::Local(
                        "the destination closed the connection".into(),
                    )),
                    Err(e) => FromDestination::Failed(e.into()),
                };
                let last = !matches!(m, FromDestination::Request(_) | FromDestination::Resumed);
                if tx.send(m).is_err() || last {
                    return;
                }
            });
        if let Err(e) = spawned {
            return Err(ServeError::BeforeResume(MigrateError::Local(format!(
                "cannot start the post-copy thread: {e}"
            ))));
        }
        let mut server = Server {
            stale,
            sender,
            w,
            requested: HashSet::new(),
            cursor: 0,
            stats: ServeStats::default(),
        };
        // Until resumed: only requests (the destination builds the VM).
        loop {
            match rx.recv_timeout(IO_TIMEOUT) {
                Ok(FromDestination::Request(v)) => {
                    server.answer(&v).map_err(ServeError::BeforeResume)?
                }
                Ok(FromDestination::Resumed) => break,
                Ok(FromDestination::Complete) => {
                    return Err(ServeError::BeforeResume(MigrateError::Local(
                        "the destination finished post-copy before running the VM".into(),
                    )))
                }
                Ok(FromDestination::Failed(e)) => return Err(ServeError::BeforeResume(e)),
                Err(_) => {
                    return Err(ServeError::BeforeResume(MigrateError::Local(format!(
                        "the destination did not say the VM runs there within {} s",
                        IO_TIMEOUT.as_secs()
                    ))))
                }
            }
        }
        let started = Instant::now();
        server.stats.resumed = Some(started);
        progress.phase(
            "post-copy: the VM runs on the destination; sending the rest",
            stale.pages() * PAGE_SIZE as u64,
        );
        let lost = ServeError::Lost;
        for (start, len) in stale.ranges() {
            let mut at = start;
            while at < start + len {
                loop {
                    match rx.try_recv() {
                        Ok(FromDestination::Request(v)) => server.answer(&v).map_err(lost)?,
                        Ok(FromDestination::Failed(e)) => return Err(lost(e)),
                        Ok(_) => {
                            return Err(lost(MigrateError::Local(
                                "the destination ended post-copy before it had every page".into(),
                            )))
                        }
                        Err(_) => break,
                    }
                }
                stasis_failpoint::hit("migrate.postcopy_background");
                let step = BACKGROUND_STEP.min(start + len - at);
                server.background(at, step, progress).map_err(lost)?;
                at += step;
            }
        }
        server.finish().map_err(lost)?;
        let complete_by = Instant::now() + IO_TIMEOUT;
        loop {
            let wait = complete_by.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait.max(Duration::from_millis(1))) {
                Ok(FromDestination::Request(v)) => server.answer(&v).map_err(lost)?,
                Ok(FromDestination::Complete) => break,
                Ok(FromDestination::Failed(e)) => return Err(lost(e)),
                Ok(FromDestination::Resumed) => {}
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return Err(lost(MigrateError::Local(format!(
                        "the destination did not confirm it has every page within {} s",
                        IO_TIMEOUT.as_secs()
                    ))))
                }
            }
        }
        server.stats.ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(server.stats)
    })
}

struct Server<'a, 'm, W: Write> {
    stale: &'a StaleSet,
    sender: &'a mut PageSender<'m>,
    w: &'a mut FrameWriter<W>,
    /// Pages sent on request, ahead of the background stream.
    requested: HashSet<u64>,
    /// The background stream has sent every stale page below this.
    cursor: u64,
    stats: ServeStats,
}

impl<W: Write> Server<'_, '_, W> {
    /// Sends the stale, not yet sent pages of the requested ranges.
    fn answer(&mut self, ranges: &[(u64, u64)]) -> Result<(), MigrateError> {
        self.stats.requests += ranges.len() as u64;
        let page = PAGE_SIZE as u64;
        for &(start, len) in ranges {
            if len > MAX_REQUEST {
                return Err(MigrateError::Local(format!(
                    "the destination asked for {len} bytes at once (at most {MAX_REQUEST})"
                )));
            }
            let mut gpa = start;
            while gpa < start.saturating_add(len) {
                if self.stale.index(gpa).is_some()
                    && gpa >= self.cursor
                    && self.requested.insert(gpa)
                {
                    self.sender
                        .send_range(self.w, gpa, page, &Progress::default())?;
                    self.stats.pages += 1;
                }
                gpa += page;
            }
        }
        self.sender.flush(self.w)?;
        self.w.flush()?;
        Ok(())
    }

    /// Sends the stale pages of `len` bytes at `start` that were not
    /// requested.
    fn background(
        &mut self,
        start: u64,
        len: u64,
        progress: &Progress,
    ) -> Result<(), MigrateError> {
        let page = PAGE_SIZE as u64;
        let mut gpa = start;
        while gpa < start + len {
            if !self.requested.contains(&gpa) {
                self.sender.send_range(self.w, gpa, page, progress)?;
                self.stats.pages += 1;
            }
            gpa += page;
        }
        self.cursor = start + len;
        Ok(())
    }

    /// Every stale page sent: says so.
    fn finish(&mut self) -> Result<(), MigrateError> {
        self.sender.flush(self.w)?;
        let (kind, payload) = Message::PostcopyDone.encode()?;
        self.w.write(kind, &payload)?;
        self.w.flush()?;
        Ok(())
    }
}
