//! Address ranges to devices: one bus for port I/O, one for MMIO.

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

/// A device's register window. Offsets are relative to the window's start;
/// `data.len()` is the access width (1, 2, 4 or 8 bytes, or larger for
/// string/vector forms split by the caller). Reads the device does not
/// implement return all ones, writes to them are ignored — the device
/// decides, never the guest.
pub trait BusDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device reachable from the bus and from the VMM at the same time
/// (e.g. the LAPIC, which also receives interrupts).
pub type Shared<D> = Rc<RefCell<D>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    Overlap { base: u64, len: u64 },
    /// Empty or wrapping range.
    BadRange { base: u64, len: u64 },
}

struct Range {
    base: u64,
    len: u64,
    device: Rc<RefCell<dyn BusDevice>>,
}

impl Range {
    fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }
}

/// Sorted, non-overlapping ranges.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Rc<RefCell<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        let clashes_before = at > 0 && self.ranges[at - 1].contains(base);
        let clashes_after = self.ranges.get(at).is_some_and(|r| r.base - base < len);
        if clashes_before || clashes_after {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    /// Remove the range starting at `base` (e.g. a PCI BAR being moved).
    pub fn remove(&mut self, base: u64) -> bool {
        match self.ranges.binary_search_by_key(&base, |r| r.base) {
            Ok(i) => {
                self.ranges.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    fn find(&self, addr: u64, width: usize) -> Option<(&Range, u64)> {
        let at = self.ranges.partition_point(|r| r.base <= addr);
        let range = self.ranges.get(at.checked_sub(1)?)?;
        let offset = addr - range.base;
        // The whole access must fall inside one device's window.
        (range.contains(addr) && width as u64 <= range.len - offset).then_some((range, offset))
    }

    /// Read into `data`; `false` (and `data` all ones) if no device claims
    /// the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                range.device.borrow_mut().read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Write `data`; `false` if no device claims the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                range.device.borrow_mut().write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access; reads return the offset's low byte.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> Shared<Probe> {
        Rc::new(RefCell::new(Probe::default()))
    }

    #[test]
    fn routes_by_offset_and_rejects_overlap() {
        let mut bus = Bus::new();
        let (a, b) = (probe(), probe());
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x400, 4, b.clone()).unwrap();
        assert_eq!(
            bus.insert(0x3fc, 2, probe()),
            Err(BusError::Overlap {
                base: 0x3fc,
                len: 2
            })
        );
        assert_eq!(
            bus.insert(0x3f0, 9, probe()),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 9
            })
        );
        assert_eq!(
            bus.insert(0x10, 0, probe()),
            Err(BusError::BadRange { base: 0x10, len: 0 })
        );
        assert_eq!(
            bus.insert(u64::MAX, 2, probe()),
            Err(BusError::BadRange {
                base: u64::MAX,
                len: 2
            })
        );

        let mut byte = [0u8; 1];
        assert!(bus.read(0x3fd, &mut byte));
        assert_eq!(byte, [5]);
        assert!(bus.write(0x402, &[1, 2]));
        assert_eq!(b.borrow().last_write, Some((2, vec![1, 2])));
        assert!(a.borrow().last_write.is_none());
    }

    #[test]
    fn unclaimed_and_straddling_accesses_fail() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x10, probe()).unwrap();
        let mut word = [0u8; 4];
        assert!(!bus.read(0xfff, &mut word));
        assert_eq!(word, [0xff; 4]);
        assert!(!bus.read(0x100e, &mut word), "crosses the window's end");
        assert!(!bus.write(0x2000, &[0]));
        assert!(bus.remove(0x1000));
        assert!(!bus.remove(0x1000));
        assert!(!bus.read(0x1000, &mut word));
    }
}
