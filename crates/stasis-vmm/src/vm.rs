//! A VM: building it from a [`VmConfig`], running it, steering it.
//!
//! [`Vm::create`] does all the work that can fail before the guest runs
//! (KVM, memory, tables, kernel, devices, vCPU state), so a bad kernel or a
//! host limit is reported before anything starts. [`Vm::start`] spawns the
//! vCPU threads; [`VmControl`] pauses, resumes and stops them from other
//! threads (the API server); [`Vm::wait`] blocks until a reason to end
//! arrives and tears the VM down.

mod disks;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use stasis_config::VmConfig;
use stasis_snapshot::GuestCpuRecord;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError};
use crate::cpu::cpuid::{self, CpuidError};
use crate::cpu::regs::RegsError;
use crate::cpu::setup::{self, RestoreCpu, VcpuSetup};
use crate::cpu::state::{self, SaveLayout, VcpuState, VcpuStateError};
use crate::cpu::vcpu::{RunControl, VcpuContext, VcpuThreadError, VcpuThreads};
use crate::devices;
use crate::devices::acpi_pm::AcpiPmRegisters;
use crate::devices::bus::{Bus, BusOverlap};
use crate::devices::i8042::I8042;
use crate::devices::rtc::CmosRtc;
use crate::devices::rtc::CmosRtcState;
use crate::devices::serial::{self, SerialError, SerialPort};
use crate::devices::serial::{SerialDeviceState, SerialInput, Uart};
use crate::devices::virtio::{
    self, MmioTransport, VirtioDevice, VirtioDeviceState, VirtioError, VirtioSlot,
};
use crate::devices::vmgenid::{VmGenId, VmGenIdState};
use crate::exit::{ExitReason, ExitSink};
use crate::layout;
use crate::memory::{self, GuestRam, MemoryError};
use crate::persist::fill::{FillStatus, MemoryFill};
use crate::platform::{self, PlatformError};
use crate::quiesce::{self, Quiesce, QuiesceReport};
use crate::vm_state::{self, ClockState, IrqchipState, PitState, VmStateError};

/// Everything that can stop a VM from being created or started.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] stasis_config::ConfigError),
    /// /dev/kvm could not be opened.
    #[error(
        "cannot open /dev/kvm: {0} (is KVM available on this host, and may this user use it?)"
    )]
    KvmOpen(kvm_ioctls::Error),
    /// The host's KVM lacks something stasis needs.
    #[error("KVM on this host lacks {0}")]
    KvmCapability(&'static str),
    /// More vCPUs than KVM allows.
    #[error("vcpus = {asked}: KVM on this host allows at most {max} vCPUs per VM")]
    TooManyVcpus {
        /// Asked for.
        asked: u32,
        /// The host's limit.
        max: usize,
    },
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Its error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The ACPI or MP tables.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// Loading the kernel.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// CPUID.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    /// The CPU model cannot be had on this host.
    #[error(transparent)]
    CpuModel(#[from] stasis_cpu::ModelError),
    /// vCPU register setup.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// The serial port.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// A virtio device.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// Two devices overlap (a bug).
    #[error(transparent)]
    Bus(#[from] BusOverlap),
    /// vCPU threads.
    #[error(transparent)]
    Threads(#[from] VcpuThreadError),
    /// An interrupt eventfd.
    #[error("cannot set up the interrupt for {what}: {source}")]
    Irq {
        /// The device.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Saving or restoring a vCPU.
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    /// Saving or restoring VM-wide KVM state.
    #[error(transparent)]
    VmState(#[from] VmStateError),
    /// Writing into guest memory.
    #[error("cannot write the {what} into guest memory: {source}")]
    GuestWrite {
        /// What.
        what: &'static str,
        /// The error.
        source: vm_memory::GuestMemoryError,
    },
    /// Restoring the RTC.
    #[error("saved RTC state is invalid: {0}")]
    RtcState(String),
    /// The saved state does not match the configuration.
    #[error("saved state does not match the VM: {0}")]
    Mismatch(String),
    /// Another operation (a snapshot) is in progress.
    #[error("cannot {action} now: a snapshot of the VM is in progress")]
    Busy {
        /// What was asked.
        action: &'static str,
    },
    /// A control request came in a state that does not allow it.
    #[error("cannot {action} a VM that is {state}")]
    BadState {
        /// What was asked.
        action: &'static str,
        /// The current state.
        state: RunState,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// The VM's run state, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RunState {
    /// Created, vCPUs not started yet.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs parked.
    Paused,
    /// Shutting down.
    Stopping,
}

impl RunState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Created,
            1 => Self::Running,
            2 => Self::Paused,
            _ => Self::Stopping,
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
        })
    }
}

/// Facts about a VM for `stasis status` and `GET /v1/vm`.
#[derive(Debug, Clone)]
pub struct VmDescription {
    /// The configuration it was started with.
    pub config: VmConfig,
    /// The boot protocol actually used.
    pub boot_protocol: String,
    /// The guest TSC frequency in kHz.
    pub tsc_khz: u32,
    /// The host CPU vendor string.
    pub cpu_vendor: String,
    /// The guest's CPU model and the features it sees.
    pub cpu: GuestCpuRecord,
    /// When the VM was created (ms since the Unix epoch).
    pub created_unix_ms: u64,
}

/// Everything in a VM that is not guest memory, captured while paused.
#[derive(Debug, Clone)]
pub struct CapturedState {
    /// One per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// PICs and IOAPIC.
    pub irqchip: IrqchipState,
    /// The PIT.
    pub pit: PitState,
    /// The KVM clock.
    pub clock: ClockState,
    /// COM1.
    pub serial: SerialDeviceState,
    /// The CMOS RTC.
    pub rtc: CmosRtcState,
    /// The VM generation ID.
    pub vmgenid: VmGenIdState,
    /// The virtio devices, in slot order.
    pub virtio: Vec<VirtioDeviceState>,
}

/// The parts of a VM that outlive the builder and are shared by
/// [`VmControl`] clones. Field order is drop order: the VM fd goes before
/// the memory it maps.
pub struct VmShared {
    vm: VmFd,
    /// A background restore still filling `mem` (its threads stop before
    /// the memory goes).
    fill: Option<MemoryFill>,
    mem: GuestRam,
    uart: Arc<Mutex<Uart>>,
    serial_input: Arc<SerialInput>,
    rtc: Arc<Mutex<CmosRtc>>,
    save_layout: Arc<SaveLayout>,
    vmgenid: VmGenId,
    /// The irqfd of the GED that announces a new VM generation ID, and
    /// whether to announce one when the VM starts (a restore).
    ged: (EventFd, bool),
    virtio: Vec<VirtioSlot>,
}

impl VmShared {
    /// The parts besides the vCPUs that run on their own: the virtio
    /// devices' I/O threads and the serial port's host input.
    fn device_parts(&self) -> Vec<&dyn Quiesce> {
        let mut parts: Vec<&dyn Quiesce> = vec![self.serial_input.as_ref()];
        parts.extend(self.virtio.iter().map(|d| d.io.as_ref() as &dyn Quiesce));
        parts
    }
}

/// Proof of holding [`VmControl::exclusive`].
pub struct OperationGuard<'a> {
    _held: std::sync::MutexGuard<'a, ()>,
}

/// A cloneable handle for steering a started VM from other threads.
#[derive(Clone)]
pub struct VmControl {
    /// Held by snapshots (and briefly by pause/resume): see
    /// [`VmControl::exclusive`].
    operation: Arc<Mutex<()>>,
    threads: Arc<Mutex<Option<VcpuThreads>>>,
    state: Arc<AtomicU8>,
    exit: ExitSink,
    description: Arc<VmDescription>,
    shared: Arc<VmShared>,
}

impl VmControl {
    /// The current run state.
    pub fn state(&self) -> RunState {
        RunState::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// What the VM is.
    pub fn description(&self) -> &VmDescription {
        &self.description
    }

    /// Starts an operation that must not interleave with pause, resume or
    /// another such operation (a snapshot): while the returned guard lives,
    /// [`VmControl::pause`] and [`VmControl::resume`] from other threads
    /// fail with [`VmError::Busy`]; the holder uses
    /// [`VmControl::pause_held`] and [`VmControl::resume_held`].
    pub fn exclusive(&self, action: &'static str) -> Result<OperationGuard<'_>, VmError> {
        match self.operation.try_lock() {
            Ok(g) => Ok(OperationGuard { _held: g }),
            Err(std::sync::TryLockError::WouldBlock) => Err(VmError::Busy { action }),
            Err(std::sync::TryLockError::Poisoned(p)) => Ok(OperationGuard {
                _held: p.into_inner(),
            }),
        }
    }

    /// Brings the VM to a standstill (see [`crate::quiesce`]): every vCPU
    /// parked outside the guest, every device I/O thread between batches,
    /// host input held. Idempotent on a paused VM (then the report is
    /// empty). Fails with [`VmError::Busy`] while a snapshot is being
    /// taken.
    pub fn pause(&self) -> Result<QuiesceReport, VmError> {
        stasis_failpoint::hit("api.pause");
        let g = self.exclusive("pause")?;
        self.pause_held(&g)
    }

    /// Lets parked vCPUs continue. Idempotent on a running VM. Fails with
    /// [`VmError::Busy`] while a snapshot is being taken.
    pub fn resume(&self) -> Result<(), VmError> {
        let g = self.exclusive("resume")?;
        self.resume_held(&g)
    }

    /// [`VmControl::pause`] for the holder of [`VmControl::exclusive`].
    pub fn pause_held(&self, _op: &OperationGuard<'_>) -> Result<QuiesceReport, VmError> {
        let guard = self.threads.lock().expect("threads lock");
        match (self.state(), guard.as_ref()) {
            (RunState::Paused, Some(_)) => Ok(QuiesceReport::default()),
            (RunState::Running, Some(threads)) => {
                let mut parts: Vec<&dyn Quiesce> = vec![threads];
                parts.extend(self.shared.device_parts());
                let report = quiesce::quiesce_all(&parts);
                // kvmclock: tell the guest it was stopped by the host, so it
                // does not report soft lockups when it runs again. Guests
                // without kvmclock answer EINVAL, which is fine.
                let _ = threads.run_on_each(|_, vcpu| vcpu.kvmclock_ctrl());
                self.transition(RunState::Running, RunState::Paused);
                Ok(report)
            }
            (s, _) => Err(VmError::BadState {
                action: "pause",
                state: if s == RunState::Paused {
                    RunState::Stopping
                } else {
                    s
                },
            }),
        }
    }

    /// [`VmControl::resume`] for the holder of [`VmControl::exclusive`].
    pub fn resume_held(&self, _op: &OperationGuard<'_>) -> Result<(), VmError> {
        let guard = self.threads.lock().expect("threads lock");
        match (self.state(), guard.as_ref()) {
            (RunState::Running, Some(_)) => Ok(()),
            (RunState::Paused, Some(threads)) => {
                let mut parts: Vec<&dyn Quiesce> = vec![threads];
                parts.extend(self.shared.device_parts());
                quiesce::resume_all(&parts);
                self.transition(RunState::Paused, RunState::Running);
                Ok(())
            }
            (s, _) => Err(VmError::BadState {
                action: "resume",
                state: if s == RunState::Running {
                    RunState::Stopping
                } else {
                    s
                },
            }),
        }
    }

    /// Moves the state from `from` to `to` unless something (the VM
    /// ending) changed it meanwhile.
    fn transition(&self, from: RunState, to: RunState) {
        let _ =
            self.state
                .compare_exchange(from as u8, to as u8, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Asks the VM to stop; [`Vm::wait`] returns with
    /// [`ExitReason::StopRequested`].
    pub fn request_stop(&self) {
        self.exit.report(ExitReason::StopRequested);
    }

    /// Ends the VM for `reason`. The state becomes `stopping` at once, so
    /// nothing can resume the vCPUs before they are stopped.
    pub fn end(&self, reason: ExitReason) {
        self.state.store(RunState::Stopping as u8, Ordering::SeqCst);
        self.exit.report(reason);
    }

    /// The VM generation ID device.
    pub fn vmgenid(&self) -> VmGenId {
        self.shared.vmgenid.clone()
    }

    /// Guest memory, for saving it while the VM is paused.
    pub fn memory(&self) -> &GuestRam {
        &self.shared.mem
    }

    /// Reads every vCPU's state, the VM-wide KVM state and the devices'
    /// state. The VM must be paused.
    pub fn capture(&self) -> Result<CapturedState, VmError> {
        let guard = self.threads.lock().expect("threads lock");
        let threads = match (self.state(), guard.as_ref()) {
            (RunState::Paused, Some(t)) => t,
            (s, _) => {
                return Err(VmError::BadState {
                    action: "capture the state of",
                    state: s,
                })
            }
        };
        let layout = self.shared.save_layout.clone();
        let vcpus = threads
            .run_on_each(move |i, vcpu| state::save_vcpu(vcpu, i, &layout))?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let (irqchip, pit, clock) = vm_state::save(&self.shared.vm)?;
        stasis_failpoint::hit("capture.after_irqchip");
        let serial = SerialDeviceState::save(
            &self.shared.uart.lock().expect("uart lock"),
            self.shared.serial_input.pending(),
        );
        let rtc = self.shared.rtc.lock().expect("rtc lock").save();
        let virtio = self
            .shared
            .virtio
            .iter()
            .map(|d| d.transport.lock().expect("virtio lock").save_device())
            .collect();
        Ok(CapturedState {
            vcpus,
            irqchip,
            pit,
            clock,
            serial,
            rtc,
            vmgenid: self.shared.vmgenid.save(),
            virtio,
        })
    }

    /// Runs `f` on every virtio device, in slot order, until one fails.
    fn each_virtio(
        &self,
        mut f: impl FnMut(&MmioTransport) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut each = self.shared.virtio.iter();
        each.try_for_each(|d| f(&d.transport.lock().expect("virtio lock")))
    }

    /// Makes every writable disk image durable (`fdatasync`).
    pub fn sync_disks(&self) -> std::io::Result<()> {
        self.each_virtio(|t| t.sync_backend())
    }

    /// Releases (`release`) or takes back every disk image's lock (see
    /// [`crate::devices::virtio::VirtioDevice::hand_over_backend`]). Only
    /// while paused: a migration's switchover.
    pub fn hand_over_disks(&self, release: bool) -> std::io::Result<()> {
        self.each_virtio(|t| t.hand_over_backend(release))
    }

    /// Descriptors of the backends a local upgrade hands over (taps), with
    /// their names (see
    /// [`crate::devices::virtio::VirtioDevice::handover_file`]).
    pub fn handover_files(&self) -> std::io::Result<Vec<(String, std::fs::File)>> {
        let mut out = Vec::new();
        self.each_virtio(|t| {
            if let Some(f) = t.handover_file() {
                out.push(f?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Has every network card announce the guest (see
    /// [`crate::devices::virtio::VirtioDevice::announce`]).
    pub fn announce_network(&self) {
        let _ = self.each_virtio(|t| {
            t.announce();
            Ok(())
        });
    }

    /// A background restore's fill of guest memory: what it has done.
    /// `None` if memory was complete from the start.
    pub fn memory_fill(&self) -> Option<FillStatus> {
        self.shared.fill.as_ref().map(|f| f.status())
    }

    /// Waits until guest memory is all resident (at once unless a
    /// background restore is still filling it).
    pub fn wait_memory_resident(&self) -> Result<(), String> {
        match &self.shared.fill {
            Some(f) => f.wait_resident(),
            None => Ok(()),
        }
    }

    /// A sink through which others (the signal thread) can end the VM.
    pub fn exit_sink(&self) -> ExitSink {
        self.exit.clone()
    }
}

/// Where a VM's memory and state come from.
pub enum VmSource<'a> {
    /// A fresh boot: new memory, the kernel loaded from the config.
    Boot,
    /// A restore: memory prepared by the caller (mapped from or filled from
    /// a snapshot) and the captured state.
    Restore {
        /// Guest memory with the snapshot's contents (or being filled
        /// with them by `fill`).
        memory: GuestRam,
        /// A background fill of `memory` under way.
        fill: Option<MemoryFill>,
        /// The state to put back.
        state: &'a CapturedState,
        /// How the vCPUs go back on this host.
        cpu: &'a RestoreCpu,
        /// A live migration's arrival: the same VM goes on, so its
        /// generation ID stays (a restore gets a new one).
        migrated: bool,
    },
}

/// A created VM.
pub struct Vm {
    vcpus: Vec<VcpuFd>,
    control: VmControl,
    exit_rx: Receiver<ExitReason>,
    context: VcpuContext,
    _kvm: Kvm,
}

/// The configuration the kernel is loaded with: the user's, with a
/// `virtio_mmio.device=` entry per virtio device appended to the command
/// line (unless the command line already has such entries).
fn boot_config(config: &VmConfig, virtio_devices: usize) -> Result<VmConfig, VmError> {
    let mut c = config.clone();
    if virtio_devices == 0 || c.cmdline.contains("virtio_mmio.device=") {
        return Ok(c);
    }
    let extra = virtio::cmdline_devices(virtio_devices);
    c.cmdline = if c.cmdline.trim().is_empty() {
        extra
    } else {
        format!("{} {extra}", c.cmdline.trim_end())
    };
    if c.cmdline.len() > stasis_config::MAX_CMDLINE_LEN {
        return Err(stasis_config::ConfigError::Cmdline(format!(
            "with the virtio_mmio.device= entries appended it is {} bytes, more than {}",
            c.cmdline.len(),
            stasis_config::MAX_CMDLINE_LEN
        ))
        .into());
    }
    Ok(c)
}

impl Vm {
    /// Builds the VM described by `config` for a fresh boot: validates it,
    /// opens KVM, maps memory, writes the firmware tables, loads the kernel,
    /// creates the devices and the vCPUs in their boot state. Nothing runs
    /// yet.
    pub fn create(config: &VmConfig) -> Result<Self, VmError> {
        config.validate()?;
        Self::build(config, VmSource::Boot)
    }

    /// Builds a VM from saved state and memory. `config` is the saved
    /// configuration with the caller's overrides applied; it must have
    /// passed [`VmConfig::validate_for_restore`].
    pub fn restore(
        config: &VmConfig,
        memory: GuestRam,
        fill: Option<MemoryFill>,
        state: &CapturedState,
        cpu: &RestoreCpu,
    ) -> Result<Self, VmError> {
        Self::rebuild(config, memory, fill, state, cpu, false)
    }

    /// Builds the VM a migration brought: as [`Vm::restore`] with complete
    /// memory, except that it is the same VM going on (its generation ID
    /// does not change).
    pub fn arrive(
        config: &VmConfig,
        memory: GuestRam,
        state: &CapturedState,
        cpu: &RestoreCpu,
    ) -> Result<Self, VmError> {
        Self::rebuild(config, memory, None, state, cpu, true)
    }

    fn rebuild(
        config: &VmConfig,
        memory: GuestRam,
        fill: Option<MemoryFill>,
        state: &CapturedState,
        cpu: &RestoreCpu,
        migrated: bool,
    ) -> Result<Self, VmError> {
        if state.vcpus.len() != config.vcpus as usize {
            return Err(VmError::Mismatch(format!(
                "{} vCPU states for a VM of {} vCPUs",
                state.vcpus.len(),
                config.vcpus
            )));
        }
        Self::build(
            config,
            VmSource::Restore {
                memory,
                fill,
                state,
                cpu,
                migrated,
            },
        )
    }

    fn build(config: &VmConfig, source: VmSource) -> Result<Self, VmError> {
        // Backends first: a missing disk image or tap creates no VM.
        let saved_virtio = match &source {
            VmSource::Boot => None,
            VmSource::Restore { state, .. } => Some(state.virtio.as_slice()),
        };
        let virtio_devices = virtio::open_devices(config, saved_virtio)?;
        let kvm = crate::kvm::open(config.vcpus)?;
        // The CPU model on this host, checked before the VM exists (a
        // restore checked the saved CPU in its plan).
        let template = match &source {
            VmSource::Boot => {
                let host = cpuid::probe_host(&kvm, config.vcpus)?;
                let top = layout::guest_top(config.memory_mib << 20);
                Some(stasis_cpu::cpuid::guest_template(
                    &config.cpu_spec(),
                    &host.offer,
                    top,
                )?)
            }
            VmSource::Restore { .. } => None,
        };
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mut restore_fill = None;
        let mut migrated = false;
        let (mem, saved, restore_cpu) = match source {
            VmSource::Boot => (
                memory::allocate(config.memory_mib, config.memory_backend)?,
                None,
                None,
            ),
            VmSource::Restore {
                memory,
                fill,
                state,
                cpu,
                migrated: m,
            } => {
                (restore_fill, migrated) = (fill, m);
                (memory, Some(state), Some(cpu))
            }
        };
        memory::register(&vm, &mem)?;
        let boot = match saved {
            None => {
                let rsdp = platform::write_tables(&mem, config.vcpus, virtio_devices.len())?;
                Some(boot::load(
                    &boot_config(config, virtio_devices.len())?,
                    &mem,
                    rsdp,
                )?)
            }
            Some(_) => None,
        };

        let (exit_tx, exit_rx) = channel();
        let exit = ExitSink::new(exit_tx);
        let (pio, (uart, serial_input), rtc) = Self::create_devices(&vm, config, &exit, saved)?;
        let (mmio, virtio) = Self::create_virtio(&vm, &mem, virtio_devices, saved)?;
        let vmgenid = match saved {
            Some(s) if migrated => VmGenId::resume(&s.vmgenid),
            Some(s) => VmGenId::after_restore(&s.vmgenid),
            None => VmGenId::new(),
        };
        vmgenid.write(&mem).map_err(|source| VmError::GuestWrite {
            what: "VM generation ID",
            source,
        })?;
        let ged = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Irq {
            what: "the VM generation ID's GED",
            source,
        })?;
        vm.register_irqfd(&ged, layout::GED_GSI)
            .map_err(kvm_err("KVM_IRQFD for the GED"))?;

        let spec = config.cpu_spec();
        let VcpuSetup {
            vcpus,
            layout: save_layout,
            cpu,
            vendor,
        } = match (saved, restore_cpu, &boot, &template) {
            (None, _, Some(boot), Some(template)) => {
                setup::boot_vcpus(&kvm, &vm, &spec, template, config.vcpus, boot)?
            }
            (Some(state), Some(restore_cpu), _, _) => {
                let s = setup::restore_vcpus(&kvm, &vm, &spec, &state.vcpus, restore_cpu)?;
                vm_state::restore(&vm, &state.irqchip, &state.pit, &state.clock)?;
                s
            }
            _ => unreachable!("a boot loads a kernel and has a template; a restore has state"),
        };
        let tsc_khz = vcpus[0].get_tsc_khz().unwrap_or(0);
        let boot_protocol = match (&boot, saved) {
            (Some(b), _) => b.entry.protocol.to_string(),
            (None, _) => "restored".to_string(),
        };

        let description = VmDescription {
            config: config.clone(),
            boot_protocol,
            tsc_khz,
            cpu_vendor: vendor,
            cpu,
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        let shared = Arc::new(VmShared {
            vm,
            fill: restore_fill,
            mem,
            uart,
            serial_input,
            rtc,
            save_layout: Arc::new(save_layout),
            vmgenid,
            ged: (ged, saved.is_some() && !migrated),
            virtio,
        });
        let control = VmControl {
            operation: Arc::new(Mutex::new(())),
            threads: Arc::new(Mutex::new(None)),
            state: Arc::new(AtomicU8::new(0)),
            exit: exit.clone(),
            description: Arc::new(description),
            shared,
        };
        let context = VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit,
            control: Arc::new(RunControl::default()),
        };
        Ok(Self {
            vcpus,
            control,
            exit_rx,
            context,
            _kvm: kvm,
        })
    }

    #[allow(clippy::type_complexity)]
    fn create_devices(
        vm: &VmFd,
        config: &VmConfig,
        exit: &ExitSink,
        saved: Option<&CapturedState>,
    ) -> Result<
        (
            Bus,
            (Arc<Mutex<Uart>>, Arc<SerialInput>),
            Arc<Mutex<CmosRtc>>,
        ),
        VmError,
    > {
        let mut pio = Bus::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Irq {
            what: "COM1",
            source,
        })?;
        vm.register_irqfd(&irq, layout::COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD for COM1"))?;
        let (uart, input) = serial::create(&config.serial, irq, saved.map(|s| &s.serial))?;
        pio.insert(
            u64::from(layout::COM1_PORT),
            8,
            Arc::new(Mutex::new(SerialPort(uart.clone(), input.clone()))),
        )?;
        pio.insert(
            u64::from(layout::I8042_DATA_PORT),
            5,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        )?;
        let rtc = match saved {
            Some(s) => CmosRtc::restore(&s.rtc).map_err(|e| VmError::RtcState(e.to_string()))?,
            None => {
                let mut rtc = CmosRtc::new();
                let mem_bytes = config.memory_mib << 20;
                let below = mem_bytes.min(layout::MMIO_HOLE_START);
                rtc.set_memory_size(below, mem_bytes - below);
                rtc
            }
        };
        let rtc = Arc::new(Mutex::new(rtc));
        pio.insert(u64::from(layout::CMOS_PORT), 2, rtc.clone())?;
        pio.insert(
            u64::from(layout::ACPI_SLEEP_CONTROL_PORT),
            AcpiPmRegisters::LEN,
            Arc::new(Mutex::new(AcpiPmRegisters::new(exit.clone()))),
        )?;
        Ok((pio, (uart, input), rtc))
    }

    /// Puts each virtio device in its slot: an irqfd on the slot's GSI, a
    /// transport (fresh, or restored from `saved`) on the MMIO bus, and the
    /// device's worker thread.
    fn create_virtio(
        vm: &VmFd,
        mem: &GuestRam,
        devices: Vec<Box<dyn VirtioDevice>>,
        saved: Option<&CapturedState>,
    ) -> Result<(Bus, Vec<VirtioSlot>), VmError> {
        let mut bus = Bus::default();
        let mut slots = Vec::with_capacity(devices.len());
        if let Some(s) = saved {
            if let Some(extra) = s
                .virtio
                .iter()
                .find(|v| !devices.iter().any(|d| d.id() == v.id()))
            {
                return Err(VmError::Mismatch(format!(
                    "saved {} '{}' is not in the configuration",
                    extra.section_name(),
                    extra.id()
                )));
            }
        }
        for (slot, device) in devices.into_iter().enumerate() {
            let (base, gsi) = layout::virtio_mmio_slot(slot).ok_or_else(|| {
                VmError::Mismatch(format!(
                    "more than {} virtio devices",
                    layout::VIRTIO_MMIO_SLOTS
                ))
            })?;
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Irq {
                what: "a virtio device",
                source,
            })?;
            vm.register_irqfd(&irq, gsi)
                .map_err(kvm_err("KVM_IRQFD for a virtio device"))?;
            let transport = match saved {
                None => MmioTransport::new(device, mem.clone(), irq, slot),
                Some(s) => {
                    let state =
                        s.virtio
                            .iter()
                            .find(|v| v.id() == device.id())
                            .ok_or_else(|| {
                                VmError::Mismatch(format!(
                                    "no saved state for {} '{}'",
                                    device.kind(),
                                    device.id()
                                ))
                            })?;
                    if state.section_name() != device.kind() {
                        return Err(VmError::Mismatch(format!(
                            "'{}' was saved as a {} and is configured as a {}",
                            device.id(),
                            state.section_name(),
                            device.kind()
                        )));
                    }
                    MmioTransport::restore(device, mem.clone(), irq, slot, state.transport())?
                }
            };
            // One eventfd per queue, signalled by KVM when the guest writes
            // the queue's index to QueueNotify, so the vCPU does not leave
            // the guest to notify; the device's I/O thread waits on them.
            let mut transport = transport;
            let mut queue_evts = Vec::new();
            let mut notify_fds = Vec::new();
            for q in 0..transport.device().queue_max_sizes().len() {
                let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Irq {
                    what: "a virtio queue notification",
                    source,
                })?;
                vm.register_ioevent(
                    &evt,
                    &IoEventAddress::Mmio(base + virtio::mmio::reg::QUEUE_NOTIFY),
                    q as u32,
                )
                .map_err(kvm_err("KVM_IOEVENTFD for a virtio queue"))?;
                notify_fds.push(evt.try_clone().map_err(|source| VmError::Irq {
                    what: "a virtio queue notification",
                    source,
                })?);
                queue_evts.push(evt);
            }
            transport.set_notify_fds(notify_fds);
            let slot = VirtioSlot::new(transport, queue_evts)?;
            bus.insert(base, layout::VIRTIO_MMIO_SIZE, slot.transport.clone())?;
            slots.push(slot);
        }
        Ok((bus, slots))
    }

    /// A handle for pausing, resuming and stopping the VM from other threads.
    pub fn control(&self) -> VmControl {
        self.control.clone()
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), VmError> {
        quiesce::resume_all(&self.control.shared.device_parts());
        // A restored VM has a new generation ID: say so (after the
        // irqchip state is back, which would otherwise swallow the edge).
        if self.control.shared.ged.1 {
            devices::vmgenid::notify_guest(&self.control.shared.ged.0);
        }
        let vcpus = std::mem::take(&mut self.vcpus);
        let threads = VcpuThreads::start(vcpus, self.context.clone())?;
        *self.control.threads.lock().expect("threads lock") = Some(threads);
        self.control
            .state
            .store(RunState::Running as u8, Ordering::SeqCst);
        // The background fill starts with the guest (until now only
        // faults were served), so that it does not compete with building
        // the VM for the host's CPUs.
        if let Some(fill) = &self.control.shared.fill {
            fill.begin_background();
        }
        Ok(())
    }

    /// Waits for the first reason to end, stops every vCPU and returns the
    /// reason.
    pub fn wait(self) -> ExitReason {
        let reason = self.exit_rx.recv().unwrap_or(ExitReason::StopRequested);
        // Under the threads lock, so that a pause or resume in progress
        // finishes first and none starts on threads that are gone.
        let threads = {
            let mut guard = self.control.threads.lock().expect("threads lock");
            self.control
                .state
                .store(RunState::Stopping as u8, Ordering::SeqCst);
            guard.take()
        };
        if let Some(threads) = threads {
            threads.stop();
        }
        for d in &self.control.shared.virtio {
            d.shutdown();
        }
        reason
    }
}
