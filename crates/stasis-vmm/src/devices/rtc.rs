//! The CMOS real-time clock (Motorola MC146818 compatible) and its 128 bytes
//! of CMOS RAM, at I/O ports 0x70 (index) and 0x71 (data).
//!
//! The clock is the host's wall-clock time plus a signed offset in whole
//! seconds. When the guest sets the time (normally with register B's SET bit
//! held while it writes the time registers) only the offset changes, so the
//! clock keeps running at host speed and stays right across save/restore, even
//! when the VM is restored on another host or another day.
//!
//! Not emulated: periodic, alarm and update-ended *interrupts* (nothing raises
//! IRQ 8), the alarm and periodic flags in register C, daylight-saving
//! adjustment (register B bit 0 is stored only) and stopping the clock through
//! the divider bits of register A (stored only). Register C's update-ended
//! flag is reported when a second boundary passed since it was last read, so
//! guests polling it see updates.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Size of the CMOS RAM, time and control registers included.
pub const CMOS_SIZE: usize = 128;

/// Register indices (0x01, 0x03 and 0x05 are the alarm registers, plain RAM
/// here).
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0A;
const REG_B: u8 = 0x0B;
const REG_C: u8 = 0x0C;
const REG_D: u8 = 0x0D;
const REG_CENTURY: u8 = 0x32;

/// Register A: update in progress (read-only).
const REG_A_UIP: u8 = 1 << 7;
/// Register A power-on value: 32.768 kHz time base, 1024 Hz periodic rate.
const REG_A_DEFAULT: u8 = 0x26;
/// Register B: SET, updates inhibited while the guest writes the time.
const REG_B_SET: u8 = 1 << 7;
/// Register B: update-ended interrupt enable.
const REG_B_UIE: u8 = 1 << 4;
/// Register B: data mode binary (set) or BCD (clear).
const REG_B_DM_BINARY: u8 = 1 << 2;
/// Register B: 24-hour (set) or 12-hour (clear) mode.
const REG_B_24H: u8 = 1 << 1;
/// Register B power-on value: BCD, 24-hour.
const REG_B_DEFAULT: u8 = REG_B_24H;
/// Register C: interrupt request flag.
const REG_C_IRQF: u8 = 1 << 7;
/// Register C: update-ended flag.
const REG_C_UF: u8 = 1 << 4;
/// Register D: valid RAM and time (battery good).
const REG_D_VRT: u8 = 1 << 7;
/// 12-hour mode: PM flag in the hours register.
const HOURS_PM: u8 = 1 << 7;

/// How long before each second boundary register A reports UIP, as the
/// MC146818 does before an update cycle.
const UIP_WINDOW: Duration = Duration::from_micros(244);

/// Memory-size bytes (the layout QEMU writes and SeaBIOS reads).
const REG_BASE_MEM_LO: usize = 0x15;
const REG_BASE_MEM_HI: usize = 0x16;
const REG_EXT_MEM_LO: usize = 0x17;
const REG_EXT_MEM_HI: usize = 0x18;
const REG_EXT_MEM2_LO: usize = 0x30;
const REG_EXT_MEM2_HI: usize = 0x31;
const REG_MEM_ABOVE_16M_LO: usize = 0x34;
const REG_MEM_ABOVE_16M_HI: usize = 0x35;
const REG_MEM_ABOVE_4G: usize = 0x5B; // three bytes, 0x5B-0x5D
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

const SECS_PER_DAY: i64 = 86_400;

/// Source of host wall-clock time: the time since the Unix epoch.
type Clock = Box<dyn Fn() -> Duration + Send>;

fn system_clock() -> Duration {
    // A host clock before 1970 is a broken host; treat it as the epoch.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// A calendar date and time of day (UTC, or whatever the guest keeps in its
/// RTC; the device does not care).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    /// Full year, e.g. 2024.
    pub year: i64,
    /// 1-12.
    pub month: u8,
    /// 1-31.
    pub day: u8,
    /// 0-23.
    pub hour: u8,
    /// 0-59.
    pub minute: u8,
    /// 0-59.
    pub second: u8,
}

impl DateTime {
    /// Converts seconds since 1970-01-01T00:00:00 to a calendar date and time.
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let rem = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }

    /// Converts to seconds since 1970-01-01T00:00:00. Out-of-range fields are
    /// not rejected: they carry into the next unit (February 30 is March 1 or
    /// 2), like `mktime`.
    pub fn to_unix(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * SECS_PER_DAY
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }

    /// Day of the week, 0 = Sunday.
    pub fn weekday(&self) -> u8 {
        // 1970-01-01 was a Thursday.
        (days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) as u8
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`). `month` is clamped to 1-12; `day` may overflow the
/// month and carries over.
pub fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let m = i64::from(month.clamp(1, 12));
    let y = if m <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400); // [0, 399]
    let mp = (m + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1; // [0, 365] for valid days
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date `days` after 1970-01-01 (inverse of
/// [`days_from_civil`]): (year, month 1-12, day 1-31).
pub fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0F)
}

/// Whether `index` is one of the registers holding the current time.
fn is_time_register(index: u8) -> bool {
    matches!(
        index,
        REG_SECONDS
            | REG_MINUTES
            | REG_HOURS
            | REG_DAY_OF_WEEK
            | REG_DAY
            | REG_MONTH
            | REG_YEAR
            | REG_CENTURY
    )
}

/// The CMOS RTC: index register, 128 bytes of CMOS RAM and a clock.
pub struct CmosRtc {
    /// Selected CMOS RAM index (0-127).
    index: u8,
    /// CMOS RAM. Time registers hold meaningful values only while register
    /// B's SET bit is set; otherwise reads compute them from the clock.
    cmos: [u8; CMOS_SIZE],
    /// Guest time minus host wall-clock time, in seconds.
    offset_seconds: i64,
    /// Guest second at which register C was last read (for its UF flag).
    last_c_read: i64,
    clock: Clock,
}

impl fmt::Debug for CmosRtc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CmosRtc")
            .field("index", &self.index)
            .field("offset_seconds", &self.offset_seconds)
            .finish_non_exhaustive()
    }
}

impl Default for CmosRtc {
    fn default() -> Self {
        Self::new()
    }
}

impl CmosRtc {
    /// An RTC showing the host's wall-clock time (offset 0): BCD, 24-hour
    /// mode, CMOS RAM otherwise zero.
    pub fn new() -> Self {
        Self::with_clock(system_clock)
    }

    /// Like [`CmosRtc::new`] but reading host time (time since the Unix
    /// epoch) from `clock`; for tests.
    pub fn with_clock(clock: impl Fn() -> Duration + Send + 'static) -> Self {
        let mut cmos = [0u8; CMOS_SIZE];
        cmos[usize::from(REG_A)] = REG_A_DEFAULT;
        cmos[usize::from(REG_B)] = REG_B_DEFAULT;
        cmos[usize::from(REG_D)] = REG_D_VRT;
        Self::from_parts(0, cmos, 0, Box::new(clock))
    }

    fn from_parts(index: u8, cmos: [u8; CMOS_SIZE], offset_seconds: i64, clock: Clock) -> Self {
        let mut rtc = CmosRtc {
            index: index & 0x7F,
            cmos,
            offset_seconds,
            last_c_read: 0,
            clock,
        };
        rtc.last_c_read = rtc.guest_seconds();
        rtc
    }

    /// Reads port 0x70 + `port_offset`. The index port is write-only and
    /// reads as 0xFF.
    pub fn read(&mut self, port_offset: u8) -> u8 {
        match port_offset {
            1 => self.read_data(),
            _ => 0xFF,
        }
    }

    /// Writes port 0x70 + `port_offset`: offset 0 selects the CMOS index (bit
    /// 7, the NMI mask on real hardware, is ignored), offset 1 writes the
    /// selected register.
    pub fn write(&mut self, port_offset: u8, value: u8) {
        match port_offset {
            0 => self.index = value & 0x7F,
            1 => self.write_data(value),
            _ => {}
        }
    }

    /// Fills the memory-size bytes the way QEMU does for SeaBIOS:
    /// 0x15/0x16 base memory (640 KiB), 0x17/0x18 and 0x30/0x31 KiB above
    /// 1 MiB (capped at 65535), 0x34/0x35 64-KiB units between 16 MiB and
    /// 4 GiB (capped at 65535), 0x5B-0x5D 64-KiB units above 4 GiB.
    pub fn set_memory_size(&mut self, below_4g_bytes: u64, above_4g_bytes: u64) {
        let base_kib: u64 = 640;
        self.cmos[REG_BASE_MEM_LO] = base_kib as u8;
        self.cmos[REG_BASE_MEM_HI] = (base_kib >> 8) as u8;

        let ext_kib = (below_4g_bytes / KIB).saturating_sub(1024).min(0xFFFF);
        for (lo, hi) in [
            (REG_EXT_MEM_LO, REG_EXT_MEM_HI),
            (REG_EXT_MEM2_LO, REG_EXT_MEM2_HI),
        ] {
            self.cmos[lo] = ext_kib as u8;
            self.cmos[hi] = (ext_kib >> 8) as u8;
        }

        let above_16m = (below_4g_bytes.saturating_sub(16 * MIB) / (64 * KIB)).min(0xFFFF);
        self.cmos[REG_MEM_ABOVE_16M_LO] = above_16m as u8;
        self.cmos[REG_MEM_ABOVE_16M_HI] = (above_16m >> 8) as u8;

        let above_4g = (above_4g_bytes / (64 * KIB)).min(0xFF_FFFF);
        for i in 0..3 {
            self.cmos[REG_MEM_ABOVE_4G + i] = (above_4g >> (8 * i)) as u8;
        }
    }

    /// The guest's current time, in seconds since the Unix epoch.
    pub fn guest_seconds(&self) -> i64 {
        self.host_seconds().saturating_add(self.offset_seconds)
    }

    /// The device's state, to be saved with the VM.
    pub fn save(&self) -> CmosRtcState {
        CmosRtcState {
            index: self.index,
            cmos: self.cmos.to_vec(),
            offset_seconds: self.offset_seconds,
        }
    }

    /// Rebuilds a device from saved state, reading host wall-clock time.
    pub fn restore(state: &CmosRtcState) -> Result<Self, RtcStateError> {
        Self::restore_with_clock(state, system_clock)
    }

    /// Like [`CmosRtc::restore`] with the host time read from `clock`.
    pub fn restore_with_clock(
        state: &CmosRtcState,
        clock: impl Fn() -> Duration + Send + 'static,
    ) -> Result<Self, RtcStateError> {
        let cmos: [u8; CMOS_SIZE] = state
            .cmos
            .as_slice()
            .try_into()
            .map_err(|_| RtcStateError::CmosLength(state.cmos.len()))?;
        if state.index >= CMOS_SIZE as u8 {
            return Err(RtcStateError::Index(state.index));
        }
        Ok(Self::from_parts(
            state.index,
            cmos,
            state.offset_seconds,
            Box::new(clock),
        ))
    }

    fn host_time(&self) -> Duration {
        (self.clock)()
    }

    fn host_seconds(&self) -> i64 {
        i64::try_from(self.host_time().as_secs()).unwrap_or(i64::MAX)
    }

    fn reg(&self, index: u8) -> u8 {
        self.cmos[usize::from(index)]
    }

    fn set_reg(&mut self, index: u8, value: u8) {
        self.cmos[usize::from(index)] = value;
    }

    fn binary_mode(&self) -> bool {
        self.reg(REG_B) & REG_B_DM_BINARY != 0
    }

    fn updates_frozen(&self) -> bool {
        self.reg(REG_B) & REG_B_SET != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary_mode() {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(v: u8, binary: bool) -> u8 {
        if binary {
            v
        } else {
            from_bcd(v)
        }
    }

    /// The value of time register `index` for guest time `t`, in the format
    /// register B selects.
    fn encode_time_register(&self, index: u8, t: &DateTime) -> u8 {
        match index {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => {
                if self.reg(REG_B) & REG_B_24H != 0 {
                    self.encode(t.hour)
                } else {
                    let (h, pm) = match t.hour {
                        0 => (12, false),
                        h @ 1..=11 => (h, false),
                        12 => (12, true),
                        h => (h - 12, true),
                    };
                    self.encode(h) | if pm { HOURS_PM } else { 0 }
                }
            }
            REG_DAY_OF_WEEK => self.encode(t.weekday() + 1),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u8),
            REG_CENTURY => self.encode(t.year.div_euclid(100).rem_euclid(100) as u8),
            _ => self.reg(index),
        }
    }

    /// Copies the current time into the time registers.
    fn latch_time(&mut self) {
        let t = DateTime::from_unix(self.guest_seconds());
        for index in [
            REG_SECONDS,
            REG_MINUTES,
            REG_HOURS,
            REG_DAY_OF_WEEK,
            REG_DAY,
            REG_MONTH,
            REG_YEAR,
            REG_CENTURY,
        ] {
            let v = self.encode_time_register(index, &t);
            self.set_reg(index, v);
        }
    }

    /// Sets the clock offset from the time registers, decoded with register B
    /// value `reg_b`.
    fn load_time(&mut self, reg_b: u8) {
        let binary = reg_b & REG_B_DM_BINARY != 0;
        let dec = |index: u8| Self::decode(self.reg(index), binary);
        let raw_hours = self.reg(REG_HOURS);
        let hour = if reg_b & REG_B_24H != 0 {
            Self::decode(raw_hours, binary)
        } else {
            let h = Self::decode(raw_hours & !HOURS_PM, binary) % 12;
            if raw_hours & HOURS_PM != 0 {
                h + 12
            } else {
                h
            }
        };
        let yy = i64::from(dec(REG_YEAR));
        let century = i64::from(dec(REG_CENTURY));
        // A guest that never set the century byte: assume 1970-2069.
        let century = if (19..=99).contains(&century) {
            century
        } else if yy < 70 {
            20
        } else {
            19
        };
        let t = DateTime {
            year: century * 100 + yy,
            month: dec(REG_MONTH),
            day: dec(REG_DAY),
            hour,
            minute: dec(REG_MINUTES),
            second: dec(REG_SECONDS),
        };
        self.offset_seconds = t.to_unix().saturating_sub(self.host_seconds());
    }

    fn read_data(&mut self) -> u8 {
        let index = self.index;
        match index {
            _ if is_time_register(index) => {
                if self.updates_frozen() {
                    self.reg(index)
                } else {
                    let t = DateTime::from_unix(self.guest_seconds());
                    self.encode_time_register(index, &t)
                }
            }
            REG_A => {
                let mut v = self.reg(REG_A) & !REG_A_UIP;
                let subsec = Duration::from_nanos(u64::from(self.host_time().subsec_nanos()));
                if !self.updates_frozen() && subsec >= Duration::from_secs(1) - UIP_WINDOW {
                    v |= REG_A_UIP;
                }
                v
            }
            REG_C => {
                let now = self.guest_seconds();
                let mut v = self.reg(REG_C);
                if !self.updates_frozen() && now != self.last_c_read {
                    v |= REG_C_UF;
                    if self.reg(REG_B) & REG_B_UIE != 0 {
                        v |= REG_C_IRQF;
                    }
                }
                self.last_c_read = now;
                self.set_reg(REG_C, 0);
                v
            }
            REG_D => REG_D_VRT,
            _ => self.reg(index),
        }
    }

    fn write_data(&mut self, value: u8) {
        let index = self.index;
        match index {
            _ if is_time_register(index) => {
                if self.updates_frozen() {
                    self.set_reg(index, value);
                } else {
                    // A running clock: change just this field of the current
                    // time.
                    self.latch_time();
                    self.set_reg(index, value);
                    self.load_time(self.reg(REG_B));
                }
            }
            REG_A => self.set_reg(REG_A, value & !REG_A_UIP),
            REG_B => {
                let old = self.reg(REG_B);
                let mut new = value;
                if new & REG_B_SET != 0 {
                    // The MC146818 clears UIE while SET is set.
                    new &= !REG_B_UIE;
                }
                self.set_reg(REG_B, new);
                if old & REG_B_SET == 0 && new & REG_B_SET != 0 {
                    // Freeze: the registers keep the current time (in the new
                    // format) until the guest overwrites them.
                    self.latch_time();
                } else if old & REG_B_SET != 0 && new & REG_B_SET == 0 {
                    // Resume from what the guest wrote, in the format it was
                    // written in.
                    self.load_time(old);
                    self.last_c_read = self.guest_seconds();
                }
            }
            REG_C | REG_D => {} // read-only
            _ => self.set_reg(index, value),
        }
    }
}

/// Saved state of a [`CmosRtc`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CmosRtcState {
    /// Selected CMOS index.
    pub index: u8,
    /// The 128 bytes of CMOS RAM.
    pub cmos: Vec<u8>,
    /// Guest time minus host wall-clock time, in seconds.
    pub offset_seconds: i64,
}

/// Why saved RTC state cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RtcStateError {
    /// The CMOS RAM image is not 128 bytes long.
    CmosLength(usize),
    /// The selected index is not below 128.
    Index(u8),
}

impl fmt::Display for RtcStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RtcStateError::CmosLength(len) => {
                write!(f, "CMOS RAM image is {len} bytes, expected {CMOS_SIZE}")
            }
            RtcStateError::Index(i) => write!(f, "CMOS index {i} is not below {CMOS_SIZE}"),
        }
    }
}

impl std::error::Error for RtcStateError {}

impl super::bus::BusDevice for CmosRtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = CmosRtc::read(self, offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        CmosRtc::write(self, offset as u8, data[0]);
    }
}

impl stasis_snapshot::SectionState for CmosRtcState {
    const NAME: &'static str = "rtc";
    const VERSION: u32 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A settable clock: nanoseconds since the epoch.
    #[derive(Clone)]
    struct FakeClock(Arc<AtomicU64>);

    impl FakeClock {
        fn at(secs: i64) -> Self {
            FakeClock(Arc::new(AtomicU64::new(secs as u64 * 1_000_000_000)))
        }
        fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
        }
        fn set_nanos(&self, n: u64) {
            self.0.store(n, Ordering::SeqCst);
        }
        fn source(&self) -> impl Fn() -> Duration + Send + 'static {
            let c = self.0.clone();
            move || Duration::from_nanos(c.load(Ordering::SeqCst))
        }
    }

    fn rtc_at(secs: i64) -> (CmosRtc, FakeClock) {
        let clock = FakeClock::at(secs);
        (CmosRtc::with_clock(clock.source()), clock)
    }

    fn rd(rtc: &mut CmosRtc, index: u8) -> u8 {
        rtc.write(0, index);
        rtc.read(1)
    }

    fn wr(rtc: &mut CmosRtc, index: u8, value: u8) {
        rtc.write(0, index);
        rtc.write(1, value);
    }

    const REG_SECONDS_ALARM: u8 = 0x01;
    const REG_MINUTES_ALARM: u8 = 0x03;
    const REG_HOURS_ALARM: u8 = 0x05;

    /// 2024-02-29T13:45:56Z, a Thursday.
    const LEAP_DAY: i64 = 1_709_214_356;

    #[test]
    fn known_dates_round_trip() {
        // (Unix seconds, (year, month, day, hour, minute, second))
        type Case = (i64, (i64, u8, u8, u8, u8, u8));
        let cases: [Case; 9] = [
            (0, (1970, 1, 1, 0, 0, 0)),
            (951_782_400, (2000, 2, 29, 0, 0, 0)),
            (951_868_799, (2000, 2, 29, 23, 59, 59)),
            (946_684_800, (2000, 1, 1, 0, 0, 0)),
            (LEAP_DAY, (2024, 2, 29, 13, 45, 56)),
            (2_147_483_647, (2038, 1, 19, 3, 14, 7)),
            (2_147_483_648, (2038, 1, 19, 3, 14, 8)),
            (4_107_542_400, (2100, 3, 1, 0, 0, 0)), // 2100 is not a leap year
            (-1, (1969, 12, 31, 23, 59, 59)),
        ];
        for (secs, (y, mo, d, h, mi, s)) in cases {
            let t = DateTime::from_unix(secs);
            assert_eq!(
                (t.year, t.month, t.day, t.hour, t.minute, t.second),
                (y, mo, d, h, mi, s),
                "{secs}"
            );
            assert_eq!(t.to_unix(), secs);
        }
        // 2100-02-28 is followed by March 1; 2000-02-28 by February 29.
        assert_eq!(
            days_from_civil(2100, 3, 1) - days_from_civil(2100, 2, 28),
            1
        );
        assert_eq!(
            days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28),
            2
        );
        assert_eq!(DateTime::from_unix(0).weekday(), 4); // Thursday
        assert_eq!(DateTime::from_unix(946_684_800).weekday(), 6); // 2000-01-01 Saturday
        assert_eq!(DateTime::from_unix(4_107_542_400).weekday(), 1); // 2100-03-01 Monday
    }

    #[test]
    fn every_day_for_600_years_round_trips() {
        let start = days_from_civil(1800, 1, 1);
        let end = days_from_civil(2400, 1, 1);
        let mut prev = civil_from_days(start - 1);
        for days in start..end {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
            // Consecutive days: the next day of the month, or the 1st.
            assert!(
                (y, m, d) > prev && (d == prev.2 + 1 || d == 1),
                "{prev:?} -> {:?}",
                (y, m, d)
            );
            prev = (y, m, d);
        }
    }

    #[test]
    fn time_registers_in_bcd() {
        let (mut rtc, _) = rtc_at(LEAP_DAY);
        assert_eq!(rd(&mut rtc, REG_SECONDS), 0x56);
        assert_eq!(rd(&mut rtc, REG_MINUTES), 0x45);
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x13);
        assert_eq!(rd(&mut rtc, REG_DAY_OF_WEEK), 5); // Thursday; Sunday = 1
        assert_eq!(rd(&mut rtc, REG_DAY), 0x29);
        assert_eq!(rd(&mut rtc, REG_MONTH), 0x02);
        assert_eq!(rd(&mut rtc, REG_YEAR), 0x24);
        assert_eq!(rd(&mut rtc, REG_CENTURY), 0x20);
        assert_eq!(rd(&mut rtc, REG_B), REG_B_DEFAULT);
        assert_eq!(rd(&mut rtc, REG_A), REG_A_DEFAULT);
    }

    #[test]
    fn time_registers_in_binary() {
        let (mut rtc, _) = rtc_at(LEAP_DAY);
        wr(&mut rtc, REG_B, REG_B_24H | REG_B_DM_BINARY);
        assert_eq!(rd(&mut rtc, REG_SECONDS), 56);
        assert_eq!(rd(&mut rtc, REG_MINUTES), 45);
        assert_eq!(rd(&mut rtc, REG_HOURS), 13);
        assert_eq!(rd(&mut rtc, REG_DAY), 29);
        assert_eq!(rd(&mut rtc, REG_MONTH), 2);
        assert_eq!(rd(&mut rtc, REG_YEAR), 24);
        assert_eq!(rd(&mut rtc, REG_CENTURY), 20);
    }

    #[test]
    fn twelve_hour_mode() {
        for (hour, bcd, bin) in [
            (0u8, 0x12u8, 12u8),
            (1, 0x01, 1),
            (11, 0x11, 11),
            (12, 0x92, 0x8C),
            (13, 0x81, 0x81),
            (23, 0x91, 0x8B),
        ] {
            let secs = days_from_civil(2024, 6, 1) * SECS_PER_DAY + i64::from(hour) * 3600;
            let (mut rtc, _) = rtc_at(secs);
            wr(&mut rtc, REG_B, 0);
            assert_eq!(rd(&mut rtc, REG_HOURS), bcd, "BCD hour {hour}");
            wr(&mut rtc, REG_B, REG_B_DM_BINARY);
            assert_eq!(rd(&mut rtc, REG_HOURS), bin, "binary hour {hour}");

            // Setting the time in 12-hour mode decodes AM/PM back.
            let (mut rtc, _) = rtc_at(0);
            wr(&mut rtc, REG_B, REG_B_SET);
            for (i, v) in [
                (REG_SECONDS, 0),
                (REG_MINUTES, 0),
                (REG_HOURS, bcd),
                (REG_DAY, 1),
                (REG_MONTH, 6),
                (REG_YEAR, 0x24),
                (REG_CENTURY, 0x20),
            ] {
                wr(&mut rtc, i, v);
            }
            wr(&mut rtc, REG_B, 0);
            assert_eq!(rtc.guest_seconds(), secs, "hour {hour}");
        }
    }

    #[test]
    fn guest_sets_time_with_set_bit_then_clock_runs() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY);
        // What Linux's mc146818_set_time does: SET, write fields, restore B.
        let b = rd(&mut rtc, REG_B);
        wr(&mut rtc, REG_B, b | REG_B_SET);
        assert_eq!(rd(&mut rtc, REG_SECONDS), 0x56, "latched on SET");
        for (i, v) in [
            (REG_YEAR, 0x30),
            (REG_MONTH, 0x05),
            (REG_DAY, 0x06),
            (REG_HOURS, 0x07),
            (REG_MINUTES, 0x08),
            (REG_SECONDS, 0x09),
            (REG_CENTURY, 0x20),
        ] {
            wr(&mut rtc, i, v);
        }
        // Frozen while SET: reads return what was written, time passes.
        clock.advance(Duration::from_secs(5));
        assert_eq!(rd(&mut rtc, REG_SECONDS), 0x09);
        assert_eq!(rd(&mut rtc, REG_A) & REG_A_UIP, 0);
        wr(&mut rtc, REG_B, b);

        clock.advance(Duration::from_millis(2500));
        assert_eq!(rd(&mut rtc, REG_SECONDS), 0x11);
        assert_eq!(rd(&mut rtc, REG_MINUTES), 0x08);
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x07);
        assert_eq!(rd(&mut rtc, REG_DAY), 0x06);
        assert_eq!(rd(&mut rtc, REG_MONTH), 0x05);
        assert_eq!(rd(&mut rtc, REG_YEAR), 0x30);
        assert_eq!(rd(&mut rtc, REG_DAY_OF_WEEK), 2); // 2030-05-06 is a Monday
        let want = DateTime {
            year: 2030,
            month: 5,
            day: 6,
            hour: 7,
            minute: 8,
            second: 9,
        };
        assert_eq!(rtc.save().offset_seconds, want.to_unix() - LEAP_DAY - 5);
    }

    #[test]
    fn writing_one_field_while_running_keeps_the_others() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY);
        wr(&mut rtc, REG_MINUTES, 0x05);
        assert_eq!(rd(&mut rtc, REG_MINUTES), 0x05);
        assert_eq!(rd(&mut rtc, REG_HOURS), 0x13);
        assert_eq!(rd(&mut rtc, REG_SECONDS), 0x56);
        clock.advance(Duration::from_secs(4));
        assert_eq!(rd(&mut rtc, REG_MINUTES), 0x06);
        assert_eq!(rd(&mut rtc, REG_SECONDS), 0x00);
    }

    #[test]
    fn century_register_decides_the_year() {
        let (mut rtc, _) = rtc_at(LEAP_DAY);
        wr(&mut rtc, REG_B, REG_B_24H | REG_B_SET);
        wr(&mut rtc, REG_CENTURY, 0x21);
        wr(&mut rtc, REG_YEAR, 0x01);
        wr(&mut rtc, REG_B, REG_B_24H);
        assert_eq!(DateTime::from_unix(rtc.guest_seconds()).year, 2101);
        assert_eq!(rd(&mut rtc, REG_CENTURY), 0x21);
        // A zero century byte falls back to 1970-2069.
        wr(&mut rtc, REG_B, REG_B_24H | REG_B_SET);
        wr(&mut rtc, REG_CENTURY, 0);
        wr(&mut rtc, REG_YEAR, 0x75);
        wr(&mut rtc, REG_B, REG_B_24H);
        assert_eq!(DateTime::from_unix(rtc.guest_seconds()).year, 1975);
    }

    #[test]
    fn index_masks_nmi_bit_and_reads_ff() {
        let (mut rtc, _) = rtc_at(LEAP_DAY);
        rtc.write(0, 0x80 | REG_MINUTES);
        assert_eq!(rtc.read(1), 0x45);
        assert_eq!(rtc.read(0), 0xFF);
        wr(&mut rtc, 0x40, 0xAB);
        assert_eq!(rd(&mut rtc, 0x40 | 0x80), 0xAB);
    }

    #[test]
    fn register_c_reports_update_and_read_clears() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY);
        assert_eq!(rd(&mut rtc, REG_C), 0);
        clock.advance(Duration::from_secs(1));
        assert_eq!(rd(&mut rtc, REG_C), REG_C_UF);
        assert_eq!(rd(&mut rtc, REG_C), 0, "read clears");
        // With UIE enabled, IRQF is reported too.
        wr(&mut rtc, REG_B, REG_B_24H | REG_B_UIE);
        clock.advance(Duration::from_secs(1));
        assert_eq!(rd(&mut rtc, REG_C), REG_C_IRQF | REG_C_UF);
        assert_eq!(rd(&mut rtc, REG_C), 0);
        // Read-only.
        wr(&mut rtc, REG_C, 0xFF);
        assert_eq!(rd(&mut rtc, REG_C), 0);
    }

    #[test]
    fn register_d_always_valid_and_a_keeps_divider() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY);
        wr(&mut rtc, REG_D, 0);
        assert_eq!(rd(&mut rtc, REG_D), REG_D_VRT);
        wr(&mut rtc, REG_A, 0xA3);
        assert_eq!(rd(&mut rtc, REG_A), 0x23, "UIP is read-only");
        // UIP only in the last 244 us before a second boundary.
        clock.set_nanos(LEAP_DAY as u64 * 1_000_000_000 + 999_800_000);
        assert_eq!(rd(&mut rtc, REG_A), 0xA3);
        clock.set_nanos(LEAP_DAY as u64 * 1_000_000_000 + 999_700_000);
        assert_eq!(rd(&mut rtc, REG_A), 0x23);
        clock.advance(Duration::from_millis(1));
        assert_eq!(rd(&mut rtc, REG_A), 0x23);
    }

    #[test]
    fn alarm_and_nvram_bytes_are_stored() {
        let (mut rtc, _) = rtc_at(LEAP_DAY);
        for (i, v) in [
            (REG_SECONDS_ALARM, 0x11),
            (REG_MINUTES_ALARM, 0x22),
            (REG_HOURS_ALARM, 0x23),
            (0x0E, 0x44),
            (0x7F, 0x55),
        ] {
            wr(&mut rtc, i, v);
            assert_eq!(rd(&mut rtc, i), v);
        }
    }

    #[test]
    fn save_restore_round_trip_keeps_guest_time() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY);
        wr(&mut rtc, REG_B, REG_B_24H | REG_B_SET);
        wr(&mut rtc, REG_YEAR, 0x99);
        wr(&mut rtc, REG_CENTURY, 0x19);
        wr(&mut rtc, REG_B, REG_B_24H);
        wr(&mut rtc, 0x50, 0x77);
        rtc.write(0, REG_MINUTES);
        let state = rtc.save();
        assert_eq!(state.cmos.len(), CMOS_SIZE);
        assert_eq!(state.index, REG_MINUTES);

        // Restored a day later on another host: the guest clock moved a day.
        let later = FakeClock::at(LEAP_DAY + 86_400);
        let mut restored = CmosRtc::restore_with_clock(&state, later.source()).unwrap();
        assert_eq!(restored.save(), state);
        assert_eq!(restored.read(1), 0x45, "index survives");
        assert_eq!(rd(&mut restored, 0x50), 0x77);
        assert_eq!(rd(&mut restored, REG_YEAR), 0x99);
        assert_eq!(rd(&mut restored, REG_DAY), 0x02); // 1999-02-29 is 03-01, a day later
        assert_eq!(rd(&mut restored, REG_MONTH), 0x03);
        assert_eq!(
            restored.guest_seconds() - rtc.guest_seconds(),
            86_400,
            "same offset"
        );
        drop(clock);

        let mut bad = state.clone();
        bad.cmos.pop();
        assert_eq!(
            CmosRtc::restore(&bad).unwrap_err(),
            RtcStateError::CmosLength(127)
        );
        let mut bad = state;
        bad.index = 200;
        assert_eq!(
            CmosRtc::restore(&bad).unwrap_err(),
            RtcStateError::Index(200)
        );
    }

    #[test]
    fn state_serializes() {
        // Serialize/Deserialize are derived; check the derive compiles for
        // the types the snapshot code will use.
        fn assert_serde<T: Serialize + for<'de> Deserialize<'de>>() {}
        assert_serde::<CmosRtcState>();
    }

    #[test]
    fn memory_size_bytes() {
        let (mut rtc, _) = rtc_at(0);
        // 2 GiB below 4 GiB, 3 GiB above.
        rtc.set_memory_size(2048 * MIB, 3072 * MIB);
        let mut c = |i: u8| rd(&mut rtc, i);
        assert_eq!((c(0x15), c(0x16)), (0x80, 0x02)); // 640 KiB
        assert_eq!((c(0x17), c(0x18)), (0xFF, 0xFF)); // capped
        assert_eq!((c(0x30), c(0x31)), (0xFF, 0xFF));
        // (2048 - 16) MiB / 64 KiB = 32512 = 0x7F00
        assert_eq!((c(0x34), c(0x35)), (0x00, 0x7F));
        // 3 GiB / 64 KiB = 49152 = 0x00C000
        assert_eq!((c(0x5B), c(0x5C), c(0x5D)), (0x00, 0xC0, 0x00));

        // 32 MiB VM: 31 MiB extended = 31744 KiB = 0x7C00; 16 MiB above 16M.
        rtc.set_memory_size(32 * MIB, 0);
        let mut c = |i: u8| rd(&mut rtc, i);
        assert_eq!((c(0x17), c(0x18)), (0x00, 0x7C));
        assert_eq!((c(0x30), c(0x31)), (0x00, 0x7C));
        assert_eq!((c(0x34), c(0x35)), (0x00, 0x01)); // 256 units
        assert_eq!((c(0x5B), c(0x5C), c(0x5D)), (0, 0, 0));

        // Tiny VM: no memory above 16 MiB.
        rtc.set_memory_size(8 * MIB, 0);
        assert_eq!((rd(&mut rtc, 0x34), rd(&mut rtc, 0x35)), (0, 0));
        assert_eq!((rd(&mut rtc, 0x17), rd(&mut rtc, 0x18)), (0x00, 0x1C)); // 7168 KiB
    }

    #[test]
    fn real_clock_is_close_to_system_time() {
        // Bracketed by two readings of the system clock: however long this
        // thread is descheduled, the RTC reads between them.
        let before = system_clock().as_secs() as i64;
        let mut rtc = CmosRtc::new();
        wr(&mut rtc, REG_B, REG_B_24H | REG_B_DM_BINARY);
        let guest = rtc.guest_seconds();
        let year = i64::from(rd(&mut rtc, REG_YEAR));
        let after = system_clock().as_secs() as i64;
        assert!(
            (before..=after).contains(&guest),
            "{before} <= {guest} <= {after}"
        );
        let years = [before, after].map(|t| DateTime::from_unix(t).year % 100);
        assert!(years.contains(&year), "{year} not in {years:?}");
    }
}
