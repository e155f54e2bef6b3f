//! Port I/O and MMIO dispatch: address ranges to devices.

use std::sync::{Arc, Mutex};

/// A device reachable through port I/O or MMIO. `offset` is relative to the
/// start of the range the device was inserted at.
pub trait BusDevice: Send {
    /// A guest read; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Entry {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

/// Two devices asked for overlapping ranges.
#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
pub struct BusOverlap {
    /// Start of the refused range.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

impl Bus {
    /// Adds `device` at `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusOverlap> {
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < base + len)
        {
            return Err(BusOverlap { base, len });
        }
        self.entries.push(Entry { base, len, device });
        self.entries.sort_by_key(|e| e.base);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let i = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(i.checked_sub(1)?)?;
        (addr < e.base + e.len).then(|| (e, addr - e.base))
    }

    /// Dispatches a read; unclaimed addresses read as all ones, like an
    /// undriven bus. Returns whether a device claimed it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                e.device.lock().expect("device lock").read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; unclaimed writes are dropped. Returns whether a
    /// device claimed it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                e.device.lock().expect("device lock").write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_and_defaults() {
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Echo(0x10))))
            .unwrap();
        bus.insert(0x60, 1, Arc::new(Mutex::new(Echo(0x20))))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 0x12);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x60, &[5]));
        bus.read(0x60, &mut b);
        assert_eq!(b[0], 5);
        assert!(bus.insert(0x3fc, 2, Arc::new(Mutex::new(Echo(0)))).is_err());
    }
}
