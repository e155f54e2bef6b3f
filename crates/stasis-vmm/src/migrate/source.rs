//! The source of a migration (`stasis migrate`): see the module docs of
//! [`super`]. The guest keeps running here until the switchover, and runs
//! on here after any failure before the destination confirms.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stasis_migration::{
    handshake, FilesOffer, FrameKind, FrameReader, FrameWriter, MemoryFile, Message, Refusal,
    RoundEnd, Section, VmDescription, FILES_PROTOCOL_VERSION,
};
use stasis_snapshot::{CpuInfo, Progress, SectionSink};

use super::lanes::{self, Connector, Lane};
use super::pages::PageSender;
use super::postcopy::serve::{serve, ServeError};
use super::postcopy::StaleSet;
use super::transport::MigrationStream;
use super::{software, MigrateError, MigrationMode, MigrationReport, RoundReport};
use crate::dirty::DirtyLog;
use crate::memory::{self, RegionFile};
use crate::vm::{OperationGuard, RunState, VmControl};

/// What the caller asks of a migration.
#[derive(Clone)]
pub struct MigrateOptions {
    /// Live (pre-copy) or warm.
    pub mode: MigrationMode,
    /// Live: switch over once the last round is expected to take at most
    /// this long (the guest's pause).
    pub max_downtime: Duration,
    /// Live: give up after this many pre-copy rounds.
    pub max_rounds: u32,
    /// Live: give up after this long in pre-copy.
    pub max_time: Duration,
    /// Live: slow the vCPUs down step by step when the guest dirties
    /// memory faster than rounds shrink.
    pub auto_converge: bool,
    /// Compress memory batches with zstd (the receiver must speak
    /// protocol version 2).
    pub compress: bool,
    /// Live: switch to post-copy instead of failing when pre-copy does
    /// not converge within the limits, or after this many rounds
    /// (`Some(u32::MAX)`: only at the limits). `None`: never.
    pub postcopy: Option<u32>,
    /// Connections memory travels on (1: only the first one); the
    /// further ones are opened with `connector`.
    pub connections: u32,
    /// Opens a further connection, authenticated (needed when
    /// `connections` > 1).
    pub connector: Option<Connector>,
    /// Where the VM goes, for messages and the report.
    pub destination: String,
    /// Progress and cancellation (the job's).
    pub progress: Arc<Progress>,
    /// A local upgrade: the connection (a UNIX socket) over which memory
    /// files, if RAM is one (the memfd backend), and taps are handed to
    /// the destination. RAM that is not a memory file is copied as usual.
    pub handover: Option<Arc<MigrationStream>>,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            mode: MigrationMode::Live,
            max_downtime: Duration::from_millis(50),
            max_rounds: 30,
            max_time: Duration::from_secs(600),
            auto_converge: true,
            compress: false,
            postcopy: None,
            connections: 1,
            connector: None,
            destination: String::new(),
            progress: Arc::default(),
            handover: None,
        }
    }
}

/// Writes state sections as section frames.
struct SectionFrames<'a, W: Write> {
    w: &'a mut FrameWriter<W>,
    bytes: u64,
}

impl<W: Write> SectionSink for SectionFrames<'_, W> {
    fn add_raw_section(
        &mut self,
        name: &str,
        instance: &str,
        version: u32,
        optional: bool,
        bytes: &[u8],
    ) -> stasis_snapshot::Result<()> {
        let payload = Section {
            name,
            instance,
            version,
            optional,
            bytes,
        }
        .encode()
        .and_then(|p| self.w.write(FrameKind::Section, &p))
        .map_err(|e| {
            stasis_snapshot::Error::Usage(format!("sending section '{name}'/'{instance}': {e}"))
        });
        self.bytes += bytes.len() as u64;
        payload
    }
}

/// Throttles the vCPUs (auto-converge) from a thread of its own: pauses
/// the guest for `percent` of every 100 ms.
struct Throttle {
    percent: AtomicU32,
    stop: AtomicBool,
    highest: AtomicU32,
}

impl Throttle {
    fn run(&self, control: &VmControl, op: &OperationGuard<'_>) {
        while !self.stop.load(Ordering::SeqCst) {
            let pct = self.percent.load(Ordering::SeqCst).min(99);
            if pct == 0 {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            if control.pause_held(op).is_ok() {
                std::thread::sleep(Duration::from_millis(pct.into()));
                if let Err(e) = control.resume_held(op) {
                    tracing::error!("auto-converge cannot resume the guest: {e}");
                }
            }
            std::thread::sleep(Duration::from_millis((100 - pct).into()));
        }
    }
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-6) / 1e6
}

/// Migrates the VM `control` steers over a connection (`reader` from the
/// destination, `writer` to it). On success the VM has ended here
/// ([`crate::ExitReason::Migrated`]) and runs on the destination; on
/// error it runs here as before.
pub fn migrate<R: Read + Send, W: Write>(
    control: &VmControl,
    reader: R,
    writer: W,
    opts: &MigrateOptions,
) -> Result<MigrationReport, MigrateError> {
    let started = Instant::now();
    let progress = &opts.progress;
    control
        .wait_memory_resident()
        .map_err(MigrateError::Local)?;
    let op = control.exclusive("migrate")?;
    if control.state() != RunState::Running {
        return Err(MigrateError::Local(format!(
            "the VM is {}: only a running VM migrates (resume it first)",
            control.state()
        )));
    }
    let memory_files = match &opts.handover {
        Some(_) => memory::region_files(control.memory())
            .map_err(|e| MigrateError::Local(format!("cannot hand guest memory over: {e}")))?,
        None => None,
    };
    // Memory handed over is shared with the receiving process: if the
    // switchover fails after the state went, that process is ended before
    // the VM runs here again.
    let receiver = match (&opts.handover, &memory_files) {
        (Some(stream), Some(_)) => Some(stream.peer_process().ok_or_else(|| {
            MigrateError::Local("cannot get hold of the receiving process".into())
        })?),
        _ => None,
    };
    if opts.mode == MigrationMode::Live && memory_files.is_none() {
        if let Some(why) = crate::dirty::unavailable_reason() {
            return Err(MigrateError::Local(format!(
                "live migration needs dirty-page tracking: {why} (--mode warm pauses the guest instead)"
            )));
        }
    }
    progress.phase("handshake", 0);
    let mut w = FrameWriter::start(writer)?;
    let mut r = FrameReader::start(reader)?;
    let welcome = handshake::source_hello(&mut r, &mut w, &software())?;
    if (opts.compress || opts.postcopy.is_some()) && welcome.protocol < FILES_PROTOCOL_VERSION {
        let e = MigrateError::Local(format!(
            "the receiver ({}) speaks migration protocol {}, without compressed batches or post-copy: migrate without --compress and --postcopy",
            welcome.software, welcome.protocol
        ));
        bail(&mut w, &e);
        return Err(e);
    }
    let d = control.description();
    let memory_bytes = d.config.memory_mib << 20;
    let cpu = CpuInfo {
        vendor: d.cpu_vendor.clone(),
        model: String::new(),
        cpuid: Vec::new(),
        guest: Some(d.cpu.clone()),
    };
    let describe = |v: serde_json::Result<serde_json::Value>| {
        v.map_err(|e| MigrateError::Local(format!("cannot describe the VM: {e}")))
    };
    handshake::source_offer(
        &mut r,
        &mut w,
        VmDescription {
            vm_config: describe(serde_json::to_value(control.current_config()))?,
            cpu: describe(serde_json::to_value(&cpu))?,
            memory_bytes,
            connections: opts.connections,
        },
    )?;
    let mut report = MigrationReport {
        destination: opts.destination.clone(),
        mode: opts.mode.to_string(),
        memory_bytes,
        destination_software: welcome.software.clone(),
        ..Default::default()
    };
    let mem = control.memory();
    let mut sender = PageSender::new(mem);
    if opts.compress {
        sender = sender.compressed();
    }
    if let Some(stream) = &opts.handover {
        let handed = memory_files.is_some();
        if let Err(e) = hand_over_files(
            control,
            stream,
            memory_files,
            welcome.protocol,
            &mut r,
            &mut w,
        ) {
            bail(&mut w, &e);
            return Err(e);
        }
        if handed {
            report.mode = "local".into();
        }
    }
    let mut lanes = match open_lanes(opts, welcome.session.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            bail(&mut w, &e);
            return Err(e);
        }
    };
    // Live: rounds while the guest runs; what is left goes while paused.
    // Memory handed over as files: nothing to send.
    let (pending, log, postcopy) = match opts.mode {
        _ if report.mode == "local" => (Vec::new(), None, false),
        MigrationMode::Warm => (sender.all_ranges(), None, false),
        MigrationMode::Live => {
            let mut log = DirtyLog::start(mem).map_err(|e| {
                MigrateError::Local(format!(
                    "cannot track dirty pages: {e} (memory mapped from a snapshot file by a lazy restore cannot be; --mode warm pauses the guest instead)"
                ))
            })?;
            let pending = pre_copy(
                control,
                &op,
                &mut log,
                &mut sender,
                &mut w,
                &mut lanes,
                opts,
                &mut report,
            );
            match pending {
                Ok((p, postcopy)) => (p, Some(log), postcopy),
                Err(e) => {
                    bail(&mut w, &e);
                    return Err(e);
                }
            }
        }
    };
    // Switchover: the guest stops here.
    let paused_at = Instant::now();
    progress.phase("switchover: pausing the guest", 0);
    control.pause_held(&op)?;
    let mut handed_over = false;
    let result = switchover(
        control,
        pending,
        log,
        postcopy,
        &mut sender,
        &mut r,
        &mut w,
        &mut lanes,
        opts,
        &mut report,
        &mut handed_over,
    );
    match result {
        Ok(resumed) => {
            report.downtime_ms = resumed.duration_since(paused_at).as_secs_f64() * 1e3;
            report.total_ms = started.elapsed().as_secs_f64() * 1e3;
            report.bytes_sent = total_bytes(&w, &lanes);
            report.bytes_per_connection = std::iter::once(w.bytes_written())
                .chain(lanes.iter().map(Lane::bytes_written))
                .collect();
            control.end(crate::ExitReason::Migrated {
                destination: opts.destination.clone(),
            });
            drop(op);
            Ok(report)
        }
        Err(MigrateError::PostcopyLost(message)) => {
            // The destination ran the VM: it must not run here too.
            bail(&mut w, &MigrateError::PostcopyLost(message.clone()));
            control.end(crate::ExitReason::MigrationLost {
                destination: opts.destination.clone(),
                message: message.clone(),
            });
            drop(op);
            Err(MigrateError::PostcopyLost(message))
        }
        Err(e) => {
            bail(&mut w, &e);
            if let (true, Some(p)) = (handed_over, &receiver) {
                if let Err(ke) = p.kill_and_wait(Duration::from_secs(5)) {
                    return Err(MigrateError::Local(format!(
                        "{e}; and the receiving process, which shares the VM's memory, cannot be ended ({ke}): the VM stays paused here"
                    )));
                }
            }
            if handed_over {
                if let Err(le) = control.hand_over_disks(false) {
                    // Someone else holds an image now: the destination
                    // opened it. Running on would be two writers; the VM
                    // stays paused here for the user to decide.
                    tracing::error!("{le}; the VM stays paused");
                    return Err(MigrateError::Local(format!(
                        "{e}; and after it {le}: the VM stays paused here (the destination may be running it)"
                    )));
                }
            }
            control.resume_held(&op)?;
            Err(e)
        }
    }
}

/// Opens the further connections `opts` asks for, joining `session`.
fn open_lanes(opts: &MigrateOptions, session: Option<&str>) -> Result<Vec<Lane>, MigrateError> {
    if opts.connections <= 1 {
        return Ok(Vec::new());
    }
    let session = session.ok_or_else(|| {
        MigrateError::Local(
            "the receiver speaks migration protocol 1, with one connection only: migrate without --connections".into(),
        )
    })?;
    let connect = opts
        .connector
        .as_ref()
        .ok_or_else(|| MigrateError::Local("no way to open further connections".into()))?;
    (1..opts.connections)
        .map(|i| Lane::open(connect, session, i))
        .collect()
}

/// Bytes written on the first connection and every lane.
fn total_bytes<W: Write>(w: &FrameWriter<W>, lanes: &[Lane]) -> u64 {
    w.bytes_written() + lanes.iter().map(Lane::bytes_written).sum::<u64>()
}

/// A local upgrade's hand-over: the files frame naming what follows, the
/// destination's files-ready, then the descriptors (memory files, taps)
/// out of band. The destination maps the memory files; the guest keeps
/// running here until the switchover, writing to the same memory.
fn hand_over_files<R: Read, W: Write>(
    control: &VmControl,
    stream: &MigrationStream,
    memory_files: Option<Vec<RegionFile>>,
    protocol: u32,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
) -> Result<(), MigrateError> {
    if protocol < FILES_PROTOCOL_VERSION {
        return Err(MigrateError::Local(format!(
            "the receiver speaks migration protocol {protocol}, which cannot take a VM handed over locally (version {FILES_PROTOCOL_VERSION} can)"
        )));
    }
    let taps = control
        .handover_files()
        .map_err(|e| MigrateError::Local(format!("cannot hand the taps over: {e}")))?;
    let memory_files = memory_files.unwrap_or_default();
    let offer = FilesOffer {
        memory: memory_files
            .iter()
            .map(|f| MemoryFile {
                gpa: f.gpa,
                size: f.size,
                offset: f.offset,
            })
            .collect(),
        taps: taps.iter().map(|(name, _)| name.clone()).collect(),
    };
    send_message(w, &Message::Files(offer))?;
    let frame = r
        .next_frame()?
        .ok_or_else(|| stasis_migration::Error::Truncated {
            what:
                "the hand-over (the destination closed the connection before asking for the files)"
                    .into(),
        })?;
    match Message::decode(&frame)? {
        Message::FilesReady => {}
        Message::Refuse(r) => {
            return Err(stasis_migration::Error::Refused { reason: r.reason }.into())
        }
        m => {
            return Err(stasis_migration::Error::Unexpected {
                expected: "a files-ready frame".into(),
                got: format!("a {} frame", m.kind()),
            }
            .into())
        }
    }
    let files: Vec<&std::fs::File> = memory_files
        .iter()
        .map(|f| &f.file)
        .chain(taps.iter().map(|(_, f)| f))
        .collect();
    stream
        .send_files(&files)
        .map_err(|e| MigrateError::Local(format!("cannot hand the file descriptors over: {e}")))
}

/// Tells the destination why the source gives up, if the stream still
/// takes it (best effort: it may be what failed).
fn bail<W: Write>(w: &mut FrameWriter<W>, e: &MigrateError) {
    let m = Message::Refuse(Refusal {
        reason: format!("the source gave up: {e}"),
    });
    if let Ok((kind, payload)) = m.encode() {
        let _ = w.write(kind, &payload).and_then(|()| w.flush());
    }
}

/// Pre-copy rounds until the rest fits the downtime; returns the ranges
/// still to send (collected, not yet sent).
#[allow(clippy::too_many_arguments)]
fn pre_copy<W: Write>(
    control: &VmControl,
    op: &OperationGuard<'_>,
    log: &mut DirtyLog,
    sender: &mut PageSender<'_>,
    w: &mut FrameWriter<W>,
    lanes: &mut [Lane],
    opts: &MigrateOptions,
    report: &mut MigrationReport,
) -> Result<(Vec<(u64, u64)>, bool), MigrateError> {
    let progress = &opts.progress;
    let started = Instant::now();
    let throttle = Throttle {
        percent: AtomicU32::new(0),
        stop: AtomicBool::new(false),
        highest: AtomicU32::new(0),
    };
    let result = std::thread::scope(|scope| {
        if opts.auto_converge {
            let t = &throttle;
            std::thread::Builder::new()
                .name("migrate-throttle".into())
                .spawn_scoped(scope, move || t.run(control, op))
                .map_err(|e| MigrateError::Local(format!("cannot start auto-converge: {e}")))?;
        }
        let outcome = rounds(log, sender, w, lanes, opts, report, &throttle, started);
        throttle.stop.store(true, Ordering::SeqCst);
        outcome
    });
    report.throttle_percent = throttle.highest.load(Ordering::SeqCst);
    progress.check()?;
    result
}

#[allow(clippy::too_many_arguments)]
fn rounds<W: Write>(
    log: &mut DirtyLog,
    sender: &mut PageSender<'_>,
    w: &mut FrameWriter<W>,
    lanes: &mut [Lane],
    opts: &MigrateOptions,
    report: &mut MigrationReport,
    throttle: &Throttle,
    started: Instant,
) -> Result<(Vec<(u64, u64)>, bool), MigrateError> {
    let progress = &opts.progress;
    let mut ranges = Vec::new();
    let mut link: Option<f64> = None; // bytes/s
    let mut last_dirty: Option<u64> = None;
    let mut slow_rounds = 0;
    for round in 1.. {
        let round_start = Instant::now();
        let dirty = log
            .collect(&mut ranges)
            .map_err(|e| MigrateError::Local(format!("reading the dirty log: {e}")))?;
        if let (Some(bw), true) = (link, round > 1) {
            let expected = Duration::from_secs_f64(dirty as f64 / bw);
            let prev_ms = report.rounds.last().map_or(1.0, |r| r.ms);
            progress.set_detail(serde_json::json!({
                "round": round,
                "dirty_bytes": dirty,
                "dirty_rate_mb_per_s": dirty as f64 / (prev_ms / 1e3).max(1e-6) / 1e6,
                "link_mb_per_s": bw / 1e6,
                "expected_downtime_ms": expected.as_secs_f64() * 1e3,
                "throttle_percent": throttle.percent.load(Ordering::SeqCst),
                "bytes_sent": total_bytes(w, lanes),
            }));
            if expected <= opts.max_downtime {
                return Ok((ranges, false));
            }
            let limits = round > opts.max_rounds || started.elapsed() > opts.max_time;
            if let Some(after) = opts.postcopy {
                if limits || round > after {
                    tracing::info!(
                        "migration: switching to post-copy after {} rounds ({} MiB still dirty)",
                        round - 1,
                        dirty >> 20
                    );
                    return Ok((ranges, true));
                }
            }
            if limits {
                return Err(MigrateError::NotConverged(format!(
                    "pre-copy did not converge in {} rounds ({:.1} s): the guest still dirtied {} MiB per round against a link of {:.0} MB/s, an expected pause of {:.0} ms (limit {} ms); allow more with --max-downtime, --max-rounds or --max-time, or use --mode warm or --postcopy",
                    round - 1,
                    started.elapsed().as_secs_f64(),
                    dirty >> 20,
                    bw / 1e6,
                    expected.as_secs_f64() * 1e3,
                    opts.max_downtime.as_millis()
                )));
            }
            // Auto-converge: a round that did not shrink to half of the
            // one before means the guest dirties about as fast as the link
            // carries; each such round slows the vCPUs down further.
            if opts.auto_converge && last_dirty.is_some_and(|l| dirty * 2 > l) && round >= 3 {
                slow_rounds += 1;
                let pct = (slow_rounds * 20).min(90);
                throttle.percent.store(pct, Ordering::SeqCst);
                throttle.highest.fetch_max(pct, Ordering::SeqCst);
            }
        }
        last_dirty = Some(dirty);
        progress.phase("pre-copy: sending memory while the guest runs", dirty);
        let bytes_before = total_bytes(w, lanes);
        let (pages_before, zero_before) = (sender.pages, sender.zero_pages);
        lanes::send(&ranges, sender, w, lanes, progress)?;
        let pages = sender.pages - pages_before;
        send_message(w, &Message::RoundEnd(RoundEnd { round, pages }))?;
        let elapsed = round_start.elapsed();
        let bytes = total_bytes(w, lanes) - bytes_before;
        // A round of a few pages says little about the link: keep the
        // estimate from a round that moved at least 1 MiB.
        if bytes >= 1 << 20 || link.is_none() {
            link = Some(bytes as f64 / elapsed.as_secs_f64().max(1e-6));
        }
        tracing::info!(
            "migration round {round}: {pages} pages, {} MiB in {:.0} ms ({:.0} MB/s)",
            bytes >> 20,
            elapsed.as_secs_f64() * 1e3,
            mb_per_s(bytes, elapsed)
        );
        report.rounds.push(RoundReport {
            round,
            pages,
            zero_pages: sender.zero_pages - zero_before,
            bytes,
            ms: elapsed.as_secs_f64() * 1e3,
            paused: false,
        });
        progress.check()?;
    }
    unreachable!("the rounds end by returning")
}

fn send_message<W: Write>(w: &mut FrameWriter<W>, m: &Message) -> Result<(), MigrateError> {
    let (kind, payload) = m.encode()?;
    w.write(kind, &payload)?;
    w.flush()?;
    Ok(())
}

/// The paused part: last pages, state, disks, and the destination's word.
#[allow(clippy::too_many_arguments)]
fn switchover<R: Read + Send, W: Write>(
    control: &VmControl,
    mut pending: Vec<(u64, u64)>,
    log: Option<DirtyLog>,
    postcopy: bool,
    sender: &mut PageSender<'_>,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    lanes: &mut [Lane],
    opts: &MigrateOptions,
    report: &mut MigrationReport,
    handed_over: &mut bool,
) -> Result<Instant, MigrateError> {
    let progress = &opts.progress;
    let round_start = Instant::now();
    if let Some(mut log) = log {
        let mut last = Vec::new();
        log.collect(&mut last)
            .map_err(|e| MigrateError::Local(format!("reading the dirty log: {e}")))?;
        pending.extend(last);
        // Nothing writes RAM while paused; protection goes before the
        // guest runs again, wherever it runs.
        drop(log);
    }
    let total: u64 = pending.iter().map(|r| r.1).sum();
    let bytes_before = total_bytes(w, lanes);
    let (pages_before, zero_before) = (sender.pages, sender.zero_pages);
    let round = report.rounds.len() as u32 + 1;
    let stale = if postcopy {
        // Post-copy: the destination drops these pages; they follow once
        // the VM runs there.
        progress.phase("switchover: naming the pages post-copy sends later", 0);
        let stale = StaleSet::new(pending);
        let ranges: Vec<(u64, u64)> = stale.ranges().collect();
        for chunk in ranges.chunks(stasis_migration::MAX_RANGES) {
            send_message(w, &Message::StalePages(chunk.to_vec()))?;
        }
        Some(stale)
    } else {
        progress.phase("switchover: sending the last memory while paused", total);
        lanes::send(&pending, sender, w, lanes, progress)?;
        send_message(
            w,
            &Message::RoundEnd(RoundEnd {
                round,
                pages: sender.pages - pages_before,
            }),
        )?;
        None
    };
    for lane in lanes.iter_mut() {
        lane.finish()?;
    }
    progress.phase("switchover: sending vCPU and device state", 0);
    let state = control.capture()?;
    let mut sink = SectionFrames { w, bytes: 0 };
    crate::persist::write_sections(&state, &mut sink)?;
    report.state_bytes = sink.bytes;
    // What the guest wrote to its disks is on them before the destination
    // opens them; then the locks go, for the destination to take.
    control
        .sync_disks()
        .map_err(|e| MigrateError::Local(format!("cannot flush the disks: {e}")))?;
    stasis_failpoint::hit("migrate.before_state_done");
    progress.enter_commit()?;
    control
        .hand_over_disks(true)
        .map_err(|e| MigrateError::Local(e.to_string()))?;
    *handed_over = true;
    send_message(w, &Message::StateDone)?;
    let bytes = total_bytes(w, lanes) - bytes_before;
    report.rounds.push(RoundReport {
        round,
        pages: sender.pages - pages_before,
        zero_pages: sender.zero_pages - zero_before,
        bytes,
        ms: round_start.elapsed().as_secs_f64() * 1e3,
        paused: true,
    });
    progress.phase("switchover: waiting for the destination to run the VM", 0);
    if let Some(stale) = stale {
        let stats = match serve(&stale, sender, r, w, progress) {
            Ok(stats) => stats,
            Err(ServeError::BeforeResume(e)) => return Err(e),
            Err(ServeError::Lost(e)) => return Err(MigrateError::PostcopyLost(e.to_string())),
        };
        report.postcopy_pages = stats.pages;
        report.postcopy_requests = stats.requests;
        report.postcopy_ms = stats.ms;
        return Ok(stats.resumed.unwrap_or_else(Instant::now));
    }
    let frame = r.next_frame()?.ok_or_else(|| stasis_migration::Error::Truncated {
        what: "the switchover (the destination closed the connection before saying the VM runs there)".into(),
    })?;
    match Message::decode(&frame)? {
        Message::Resumed => Ok(Instant::now()),
        Message::Refuse(r) => Err(stasis_migration::Error::Refused { reason: r.reason }.into()),
        m => Err(stasis_migration::Error::Unexpected {
            expected: "a resumed frame".into(),
            got: format!("a {} frame", m.kind()),
        }
        .into()),
    }
}
