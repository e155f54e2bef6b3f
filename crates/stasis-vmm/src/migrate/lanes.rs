//! Parallel connections for memory (`stasis migrate --connections N`):
//! besides the first connection, N-1 further ones ("lanes") join the
//! migration (a join frame naming the session token of the welcome) and
//! carry a share of each round's pages. Every page always travels on the
//! same connection (2 MiB blocks dealt round-robin), so the order in which
//! one page's copies arrive is the order they were sent, with no
//! synchronisation between connections; only before the state the
//! destination waits until every lane said it is done. Each lane has its
//! own thread on both sides, so encryption, checksums and copies use more
//! than one core.

use std::io::{Read, Write};
use std::sync::Arc;

use stasis_migration::{handshake, FrameReader, FrameWriter, Message};
use stasis_snapshot::Progress;

use super::pages::{PageReceiver, PageSender};
use super::MigrateError;
use crate::memory::GuestRam;

/// The reading half of a lane.
pub type LaneReader = Box<dyn Read + Send>;
/// The writing half of a lane.
pub type LaneWriter = Box<dyn Write + Send>;
/// Opens one more connection to the destination, authenticated as the
/// first one was.
pub type Connector = Arc<dyn Fn() -> Result<(LaneReader, LaneWriter), String> + Send + Sync>;

/// The most connections a migration uses.
pub const MAX_CONNECTIONS: u32 = 16;

/// A further connection.
pub struct Lane {
    r: FrameReader<LaneReader>,
    w: FrameWriter<LaneWriter>,
}

/// Which connection carries the page at `gpa` (0 = the first one).
pub fn lane_of(gpa: u64, connections: usize) -> usize {
    ((gpa >> 21) % connections as u64) as usize
}

/// `ranges` split at 2 MiB boundaries and dealt to `connections` lists.
pub fn partition(ranges: &[(u64, u64)], connections: usize) -> Vec<Vec<(u64, u64)>> {
    let mut out = vec![Vec::new(); connections];
    for &(start, len) in ranges {
        let mut at = start;
        let end = start + len;
        while at < end {
            let block_end = ((at >> 21) + 1) << 21;
            let stop = block_end.min(end);
            out[lane_of(at, connections)].push((at, stop - at));
            at = stop;
        }
    }
    out
}

impl Lane {
    /// Source: opens lane `index` with `connect` and joins `session`.
    pub fn open(connect: &Connector, session: &str, index: u32) -> Result<Lane, MigrateError> {
        let (r, w) = connect().map_err(|e| {
            MigrateError::Local(format!("cannot open connection {}: {e}", index + 1))
        })?;
        let mut w = FrameWriter::start(w)?;
        let mut r = FrameReader::start(r)?;
        handshake::source_join(&mut r, &mut w, session, index)?;
        Ok(Lane { r, w })
    }

    /// Destination: a lane that connected; reads its join.
    pub fn accept(r: LaneReader, w: LaneWriter, session: &str) -> Result<Lane, MigrateError> {
        let mut w = FrameWriter::start(w)?;
        let mut r = FrameReader::start(r)?;
        handshake::destination_join(&mut r, &mut w, session)?;
        Ok(Lane { r, w })
    }

    /// Bytes written on it.
    pub fn bytes_written(&self) -> u64 {
        self.w.bytes_written()
    }

    /// Source: says the lane carried all its memory.
    pub fn finish(&mut self) -> Result<(), MigrateError> {
        let (kind, payload) = Message::ConnectionDone.encode()?;
        self.w.write(kind, &payload)?;
        self.w.flush()?;
        Ok(())
    }

    /// Destination: puts the pages that arrive in place until the lane
    /// is done; returns how many.
    pub fn receive(&mut self, mem: &GuestRam, progress: &Progress) -> Result<u64, MigrateError> {
        let mut pages = PageReceiver::new(mem);
        let mut unpacked = Vec::new();
        loop {
            let frame = self.r.next_frame()?.ok_or_else(|| {
                MigrateError::Local("a further connection closed before it was done".into())
            })?;
            let m = Message::decode(&frame)?;
            if let Some(b) = m.memory_batch(&mut unpacked)? {
                pages.apply(&b)?;
                progress.add(b.len() as u64 * 4096);
            } else if matches!(m, Message::ConnectionDone) {
                return Ok(pages.pages);
            } else {
                return Err(MigrateError::Local(format!(
                    "a {} frame on a further connection",
                    m.kind()
                )));
            }
            self.r.recycle(frame);
        }
    }
}

/// Sends the pages of `ranges`: the first connection's share through
/// `sender` on `w` here, each lane's on a thread of its own. `sender`'s
/// counters include every lane's pages afterwards.
pub fn send<W: Write>(
    ranges: &[(u64, u64)],
    sender: &mut PageSender<'_>,
    w: &mut FrameWriter<W>,
    lanes: &mut [Lane],
    progress: &Progress,
) -> Result<(), MigrateError> {
    if lanes.is_empty() {
        for &(gpa, len) in ranges {
            sender.send_range(w, gpa, len, progress)?;
        }
        return sender.flush(w);
    }
    let mut parts = partition(ranges, lanes.len() + 1).into_iter();
    let own = parts.next().expect("one part per connection");
    let (mem, compress) = (sender.memory(), sender.is_compressed());
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = lanes
            .iter_mut()
            .zip(parts)
            .map(|(lane, part)| {
                scope.spawn(move || -> Result<(u64, u64), MigrateError> {
                    let mut s = PageSender::new(mem);
                    if compress {
                        s = s.compressed();
                    }
                    for (gpa, len) in part {
                        s.send_range(&mut lane.w, gpa, len, progress)?;
                    }
                    s.flush(&mut lane.w)?;
                    lane.w.flush()?;
                    Ok((s.pages, s.zero_pages))
                })
            })
            .collect();
        let mut own_result = Ok(());
        for (gpa, len) in own {
            if let Err(e) = sender.send_range(w, gpa, len, progress) {
                own_result = Err(e);
                break;
            }
        }
        let own_result = own_result.and_then(|()| sender.flush(w));
        let lane_results: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(MigrateError::Local("a sending thread panicked".into()))
                })
            })
            .collect();
        (own_result, lane_results)
    });
    results.0?;
    for r in results.1 {
        let (pages, zero) = r?;
        sender.add_counts(pages, zero);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_always_goes_on_the_same_connection() {
        let ranges = [(0x1000, 0x40_0000), (0x100_0000, 0x1000)];
        let parts = partition(&ranges, 3);
        let mut total = 0;
        for (i, part) in parts.iter().enumerate() {
            for &(start, len) in part {
                total += len;
                assert_eq!(lane_of(start, 3), i);
                assert_eq!(lane_of(start + len - 1, 3), i, "inside one 2 MiB block");
            }
        }
        assert_eq!(total, 0x40_0000 + 0x1000);
        assert_eq!(partition(&ranges, 1)[0].len(), 4);
    }
}
