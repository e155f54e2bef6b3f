//! The destination of a migration (`stasis receive`): see the module
//! docs of [`super`]. Nothing of this host is changed before the VM is
//! accepted; guest memory is fresh memory filled from the stream, or, in
//! a local upgrade, the source's own memory files handed over with its
//! taps; the VM is built by the caller ([`crate::Vm::arrive`]), which
//! then confirms ([`Incoming::confirm`]) once it runs.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use stasis_config::VmConfig;
use stasis_migration::{
    handshake, Error as ProtocolError, FilesOffer, FrameReader, FrameWriter, Message,
    FILES_PROTOCOL_VERSION,
};
use stasis_snapshot::{CpuInfo, Progress, SectionSet, SectionSink, SectionSource, SectionWarning};

use super::lanes::{Lane, LaneReader, LaneWriter, MAX_CONNECTIONS};
use super::pages::{PageReceiver, Prefault};
use super::postcopy::target::{LostHook, Target};
use super::postcopy::{Commit, StaleSet};
use super::transport::MigrationStream;
use super::{software, MigrateError};
use crate::cpu::setup::RestoreCpu;
use crate::memory::{self, GuestRam};
use crate::persist::restore::{self, RestoreOverrides};
use crate::vm::CapturedState;

/// A VM that arrived, ready to be built.
pub struct Arrival {
    /// Its configuration with this host's overrides.
    pub config: VmConfig,
    /// Guest memory, complete.
    pub memory: GuestRam,
    /// Its state.
    pub state: CapturedState,
    /// How its vCPUs go back on this host.
    pub cpu: RestoreCpu,
    /// Optional sections this stasis does not know (skipped).
    pub warnings: Vec<SectionWarning>,
    /// Passes over memory the source made.
    pub rounds: u32,
    /// Pages received in all.
    pub pages: u64,
    /// Bytes received in all.
    pub bytes: u64,
    /// Whether guest memory was handed over as files (a local upgrade)
    /// rather than copied.
    pub memory_handed_over: bool,
    /// Post-copy: guest RAM prepared for the pages still to come; start
    /// it ([`Incoming::start_postcopy`]) before building the VM.
    pub postcopy: Option<Target>,
}

/// An incoming migration on one connection.
pub struct Incoming<R: Read, W: Write> {
    /// Taken by post-copy's page thread.
    r: Option<FrameReader<R>>,
    /// Shared with post-copy's threads.
    w: Arc<Mutex<FrameWriter<W>>>,
    /// Whether the source was told the VM runs here, or post-copy failed
    /// first.
    commit: Arc<Commit>,
    /// The source's software, from its hello.
    pub source_software: String,
    cpu: Option<CpuInfo>,
    allow_tsc_mismatch: bool,
    protocol: u32,
    handover: Option<MigrationStream>,
    /// The session token further connections name.
    session: Option<String>,
    /// Connections the source announced (1 + lanes).
    connections: u32,
    lanes: Vec<Lane>,
}

fn local(e: impl std::fmt::Display) -> MigrateError {
    MigrateError::Local(e.to_string())
}

impl<R: Read, W: Write> Incoming<R, W> {
    /// Exchanges preambles and protocol versions with the source.
    pub fn start(reader: R, writer: W) -> Result<Self, MigrateError> {
        let mut w = FrameWriter::start(writer)?;
        let mut r = FrameReader::start(reader)?;
        let (hello, welcome) = handshake::destination_hello(&mut r, &mut w, &software())?;
        Ok(Self {
            session: welcome.session,
            connections: 1,
            lanes: Vec::new(),
            r: Some(r),
            w: Arc::new(Mutex::new(w)),
            commit: Arc::new(Commit::default()),
            source_software: hello.software,
            cpu: None,
            allow_tsc_mismatch: false,
            protocol: welcome.protocol,
            handover: None,
        })
    }

    /// A local upgrade: the connection (a UNIX socket, the same one the
    /// frames travel on) also carries the source's memory files and taps.
    /// Its taps are then not probed before the VM is accepted (the source
    /// holds them until it hands them over).
    pub fn with_handover(mut self, stream: MigrationStream) -> Result<Self, MigrateError> {
        if self.protocol < FILES_PROTOCOL_VERSION {
            let reason = format!(
                "the source ({}) speaks migration protocol {}, which cannot hand a VM over locally (version {FILES_PROTOCOL_VERSION} can)",
                self.source_software, self.protocol
            );
            let m = Message::Refuse(stasis_migration::Refusal {
                reason: reason.clone(),
            });
            self.send_best_effort(&m);
            return Err(local(reason));
        }
        self.handover = Some(stream);
        Ok(self)
    }

    /// Reads the VM's description and decides whether this host runs it:
    /// the configuration with `overrides`, its memory size, the CPU model
    /// against this host, the disks and taps it names, and finally
    /// `accept` (the caller's own checks, e.g. that its API socket can be
    /// had). A refusal's reason goes back to the source. Returns the
    /// configuration.
    pub fn check(
        &mut self,
        overrides: &RestoreOverrides,
        accept: impl FnOnce(&VmConfig) -> Result<(), String>,
    ) -> Result<VmConfig, MigrateError> {
        let mut out = None;
        let allow_tsc = overrides.allow_tsc_mismatch;
        let has_session = self.session.is_some();
        let local_upgrade = self.handover.is_some();
        let r = self.r.as_mut().expect("read before post-copy");
        let mut w = self.w.lock().expect("migration writer");
        handshake::destination_check(r, &mut w, |d| {
            if d.connections == 0 || d.connections > MAX_CONNECTIONS {
                return Err(format!(
                    "{} connections asked for (1 to {MAX_CONNECTIONS})",
                    d.connections
                ));
            }
            if d.connections > 1 && !has_session {
                return Err("further connections need migration protocol 2".into());
            }
            if d.connections > 1 && local_upgrade {
                return Err("a local upgrade uses one connection".into());
            }
            let config = restore::configure(&d.vm_config, overrides).map_err(|e| e.to_string())?;
            let want = config.memory_mib << 20;
            if d.memory_bytes != want {
                return Err(format!(
                    "the VM description has {} bytes of memory, its configuration {want}",
                    d.memory_bytes
                ));
            }
            let cpu: CpuInfo = serde_json::from_value(d.cpu.clone())
                .map_err(|e| format!("the VM's CPU description cannot be read: {e}"))?;
            let check = restore::check_host(&cpu, &[], allow_tsc).map_err(|e| e.to_string())?;
            if !check.report.is_ok() {
                return Err(format!(
                    "this host cannot run the VM: {}",
                    check.report.message()
                ));
            }
            check_backends(&config, self.handover.is_none())?;
            if self.handover.is_none() {
                // Destinations the source sent are checked as a snapshot's.
                let notices = crate::persist::outputs::check(&config, overrides, None)
                    .map_err(|e| e.to_string())?;
                for n in notices {
                    tracing::info!("{n}");
                }
            }
            accept(&config)?;
            out = Some((config, cpu, d.connections));
            Ok(())
        })?;
        let (config, cpu, connections) = out.expect("an accepted VM was checked");
        self.connections = connections;
        self.cpu = Some(cpu);
        self.allow_tsc_mismatch = allow_tsc;
        Ok(config)
    }

    /// Further connections the accepted VM's memory comes on: accept that
    /// many more connections and [`Incoming::join`] each.
    pub fn lanes_expected(&self) -> u32 {
        self.connections - 1
    }

    /// Adds a further connection (authenticated by the caller): checks
    /// its join frame against this migration's session token.
    pub fn join(&mut self, r: LaneReader, w: LaneWriter) -> Result<(), MigrateError> {
        let session = self
            .session
            .as_deref()
            .ok_or_else(|| local("further connections need migration protocol 2"))?;
        if self.lanes.len() as u32 >= self.lanes_expected() {
            return Err(local("more connections than the source announced"));
        }
        self.lanes.push(Lane::accept(r, w, session)?);
        Ok(())
    }

    /// Receives memory and state until the source has sent everything
    /// (it is paused then), and checks the state as a restore would.
    pub fn receive(
        &mut self,
        config: VmConfig,
        progress: &Progress,
    ) -> Result<Arrival, MigrateError> {
        let handed = match self.handover.take() {
            Some(stream) => self.take_files(&stream, &config)?,
            None => None,
        };
        let memory_handed_over = handed.is_some();
        let (memory, prefault) = match handed {
            Some(memory) => (memory, None),
            None => {
                let memory =
                    memory::allocate(config.memory_mib, config.memory_backend).map_err(local)?;
                let prefault = Prefault::start(&memory);
                (memory, Some(prefault))
            }
        };
        let mut pages = PageReceiver::new(&memory);
        let mut sections = SectionSet::new();
        let mut rounds = 0;
        let mut unpacked = Vec::new();
        let mut stale = Vec::new();
        let mut stale_pages = 0u64;
        let ram_pages = config.memory_mib << 8;
        let v2 = self.protocol >= FILES_PROTOCOL_VERSION;
        progress.phase("receiving memory", config.memory_mib << 20);
        let r = self.r.as_mut().expect("read before post-copy");
        let mut lanes = std::mem::take(&mut self.lanes);
        let lane_pages = std::thread::scope(|scope| -> Result<u64, MigrateError> {
            let handles: Vec<_> = lanes
                .iter_mut()
                .map(|lane| {
                    let memory = &memory;
                    scope.spawn(move || lane.receive(memory, progress))
                })
                .collect();
            let mut first_connection = || -> Result<(), MigrateError> {
                loop {
                    let frame = r.next_frame()?.ok_or_else(|| ProtocolError::Truncated {
                        what: "the migration (the source closed the connection before all state was sent)"
                            .into(),
                    })?;
                    let done = match Message::decode(&frame)? {
                        m @ (Message::MemoryBatch(_) | Message::MemoryBatchZstd(_)) => {
                            let zstd = matches!(m, Message::MemoryBatchZstd(_));
                            if zstd && !v2 {
                                return Err(unexpected(
                                    "no compressed batch in protocol version 1",
                                    "a memory-batch-zstd frame",
                                ));
                            }
                            if memory_handed_over {
                                return Err(unexpected(
                                    "no memory batch (memory was handed over as files)",
                                    &format!("a {} frame", m.kind()),
                                ));
                            }
                            if !sections.entries().is_empty() {
                                return Err(unexpected(
                                    "a section or state-done frame",
                                    &format!("a {} frame", m.kind()),
                                ));
                            }
                            let b = m.memory_batch(&mut unpacked)?.expect("a memory batch");
                            stasis_failpoint::hit("migrate.memory_batch");
                            pages.apply(&b)?;
                            progress.add(b.len() as u64 * 4096);
                            false
                        }
                        Message::RoundEnd(e) => {
                            if e.round != rounds + 1 {
                                return Err(local(format!(
                                    "the source ended round {} after round {rounds}",
                                    e.round
                                )));
                            }
                            rounds = e.round;
                            stasis_failpoint::hit("migrate.round_end");
                            false
                        }
                        Message::Section(s) => {
                            stasis_failpoint::hit("migrate.receive_section");
                            sections
                                .add_raw_section(s.name, s.instance, s.version, s.optional, s.bytes)
                                .map_err(|e| ProtocolError::Decode {
                                    kind: "section".into(),
                                    message: e.to_string(),
                                })?;
                            false
                        }
                        Message::StalePages(ranges) => {
                            if !v2 || memory_handed_over || !sections.entries().is_empty() {
                                return Err(unexpected(
                                    "no stale-pages frame here",
                                    "a stale-pages frame",
                                ));
                            }
                            // Bounded by guest RAM: every range is at
                            // least a page.
                            stale_pages = ranges
                                .iter()
                                .fold(stale_pages, |n, &(_, len)| n.saturating_add(len >> 12));
                            if stale_pages > ram_pages {
                                return Err(local(format!(
                                    "the source named {stale_pages} stale pages; the VM has {ram_pages}"
                                )));
                            }
                            stale.extend(ranges);
                            false
                        }
                        Message::StateDone => true,
                        Message::Refuse(r) => {
                            return Err(ProtocolError::Refused { reason: r.reason }.into())
                        }
                        m => {
                            return Err(unexpected(
                                "a memory-batch, round-end or section frame",
                                &format!("a {} frame", m.kind()),
                            ))
                        }
                    };
                    r.recycle(frame);
                    if done {
                        break;
                    }
                }
                Ok(())
            };
            let main = first_connection();
            let mut total = 0;
            let mut lane_error = None;
            for h in handles {
                match h.join() {
                    Ok(Ok(n)) => total += n,
                    Ok(Err(e)) => {
                        lane_error.get_or_insert(e);
                    }
                    Err(_) => {
                        lane_error.get_or_insert(local("a receiving thread panicked"));
                    }
                }
            }
            main?;
            match lane_error {
                Some(e) => Err(e),
                None => Ok(total),
            }
        })?;
        let received = pages.pages + lane_pages;
        drop(prefault);
        drop(pages);
        progress.phase("checking the VM's state", 0);
        let warnings = stasis_snapshot::check_known(sections.entries(), &restore::known_section)
            .map_err(local)?;
        let vcpus = restore::saved_vcpus(&sections, &config).map_err(local)?;
        let cpu = self.cpu.clone().expect("check() ran first");
        let check = restore::check_host(&cpu, &vcpus, self.allow_tsc_mismatch).map_err(local)?;
        if !check.report.is_ok() {
            return Err(local(format!(
                "this host cannot run the VM's vCPUs: {}",
                check.report.message()
            )));
        }
        let state = restore::state_from_sections(&sections, &config, vcpus, None).map_err(local)?;
        let postcopy = match stale.is_empty() {
            true => None,
            false => Some(Target::prepare(&memory, StaleSet::new(stale))?),
        };
        let bytes = r.bytes_read();
        Ok(Arrival {
            config,
            memory,
            state,
            cpu: check.restore_cpu(cpu.guest.clone()),
            warnings,
            rounds,
            pages: received,
            bytes,
            memory_handed_over,
            postcopy,
        })
    }

    /// A local upgrade's hand-over: the files frame, files-ready, then
    /// the descriptors. Taps go to [`crate::devices::virtio::inherit_tap`]
    /// for the VM's network cards to take; returns guest memory if it was
    /// handed over (else it comes in batches).
    fn take_files(
        &mut self,
        stream: &MigrationStream,
        config: &VmConfig,
    ) -> Result<Option<GuestRam>, MigrateError> {
        let frame = self
            .r
            .as_mut()
            .expect("read before post-copy")
            .next_frame()?
            .ok_or_else(|| ProtocolError::Truncated {
                what: "the hand-over (the source closed the connection before its files frame)"
                    .into(),
            })?;
        let offer: FilesOffer = match Message::decode(&frame)? {
            Message::Files(f) => f,
            Message::Refuse(r) => return Err(ProtocolError::Refused { reason: r.reason }.into()),
            m => {
                return Err(unexpected(
                    "a files frame (a local upgrade)",
                    &format!("a {} frame", m.kind()),
                ))
            }
        };
        if offer.count() > super::transport::MAX_FILES {
            return Err(local(format!(
                "the source offers {} file descriptors, at most {} are taken",
                offer.count(),
                super::transport::MAX_FILES
            )));
        }
        self.send(&Message::FilesReady)?;
        let mut files = stream
            .recv_files(offer.count())
            .map_err(|e| local(format!("receiving the source's file descriptors: {e}")))?
            .into_iter();
        let memory_files: Vec<memory::RegionFile> = offer
            .memory
            .iter()
            .zip(files.by_ref())
            .map(|(m, file)| memory::RegionFile {
                gpa: m.gpa,
                size: m.size,
                file,
                offset: m.offset,
            })
            .collect();
        for (name, file) in offer.taps.iter().zip(files) {
            crate::devices::virtio::inherit_tap(name, file).map_err(local)?;
        }
        if memory_files.is_empty() {
            return Ok(None);
        }
        memory::from_region_files(config.memory_mib, memory_files)
            .map(Some)
            .map_err(local)
    }

    /// Tells the source the VM runs here; it ends there. Call only once
    /// the VM's vCPUs run.
    pub fn confirm(self) -> Result<(), MigrateError> {
        // From now on a post-copy failure loses the VM; one that came
        // first means this VM must not run.
        if !self.commit.resume() {
            return Err(local(
                "post-copy failed before the VM ran here: not confirming it",
            ));
        }
        self.send(&Message::Resumed)
    }

    /// Post-copy: starts putting the stale pages in place as they come
    /// and asking for the ones faulted on (see [`Target::start`]). Call
    /// before anything touches guest memory, then build the VM.
    pub fn start_postcopy(&mut self, target: Target, lost: LostHook) -> Result<(), MigrateError>
    where
        R: Send + 'static,
        W: Send + 'static,
    {
        let r = self
            .r
            .take()
            .ok_or_else(|| local("post-copy started twice"))?;
        target.start(r, self.w.clone(), self.commit.clone(), lost)
    }

    fn send(&self, m: &Message) -> Result<(), MigrateError> {
        let (kind, payload) = m.encode()?;
        let mut w = self.w.lock().expect("migration writer");
        w.write(kind, &payload)?;
        w.flush()?;
        Ok(())
    }

    fn send_best_effort(&self, m: &Message) {
        if let Err(e) = self.send(m) {
            tracing::debug!("cannot tell the source: {e}");
        }
    }

    /// Tells the source this host will not run the VM and why (best
    /// effort: the connection may be what failed); the source resumes it.
    pub fn refuse(self, reason: &str) {
        self.send_best_effort(&Message::Refuse(stasis_migration::Refusal {
            reason: reason.to_string(),
        }));
    }
}

fn unexpected(expected: &str, got: &str) -> MigrateError {
    ProtocolError::Unexpected {
        expected: expected.into(),
        got: got.into(),
    }
    .into()
}

/// Whether the disks and taps `config` names can be had here, before any
/// memory moves (the images' sizes are checked against the state later).
fn check_backends(config: &VmConfig, probe_taps: bool) -> Result<(), String> {
    for d in &config.disk {
        match std::fs::metadata(&d.path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(format!("disk '{}': {} is not a regular file", d.id, d.path.display())),
            Err(e) => {
                return Err(format!(
                    "disk '{}': {}: {e} (a migration needs the image on a shared path, or --disk-path {}=PATH on the destination)",
                    d.id,
                    d.path.display(),
                    d.id
                ))
            }
        }
    }
    for n in config.net.iter().filter(|_| probe_taps) {
        crate::devices::virtio::probe_tap(&n.tap)
            .map_err(|m| format!("net '{}': {m} (give another with --tap {}=TAP)", n.id, n.id))?;
    }
    Ok(())
}
