//! MSI-X: the capability in configuration space, the vector table and the
//! pending-bit array (PBA) in one of the device's memory BARs, delivery
//! through an [`MsiSink`].

use alloc::vec;
use alloc::vec::Vec;

use super::config::ConfigSpace;
use super::PciError;
use crate::MsiSink;

pub const CAP_ID_MSIX: u8 = 0x11;
/// Offsets inside the capability.
const CAP_CONTROL: usize = 2;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const BIR_MASK: u32 = 0b111;

pub const ENTRY_SIZE: usize = 16;
const ENTRY_ADDRESS: usize = 0;
const ENTRY_DATA: usize = 8;
const ENTRY_VECTOR_CONTROL: usize = 12;
const VECTOR_MASKED: u8 = 1;
pub const MAX_VECTORS: u16 = 2048;

pub struct Msix {
    /// `vectors` entries of 16 bytes, as the guest wrote them.
    table: Vec<u8>,
    pending: Vec<u64>,
    vectors: u16,
    cap: usize,
}

impl Msix {
    /// Add the capability to `config` for `vectors` vectors whose table and
    /// PBA live at the given offsets of BAR `bar`. All vectors start masked
    /// and MSI-X disabled, as after reset.
    pub fn new(
        config: &mut ConfigSpace,
        vectors: u16,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> Result<Self, PciError> {
        let aligned = |offset: u32| offset & BIR_MASK == 0;
        if vectors == 0
            || vectors > MAX_VECTORS
            || u32::from(bar) > BIR_MASK
            || !aligned(table_offset)
            || !aligned(pba_offset)
        {
            return Err(PciError::Msix);
        }
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(vectors - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let cap = config.add_capability(CAP_ID_MSIX, &body)?;
        config.set_writable(
            cap + CAP_CONTROL,
            &(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes(),
        );
        let mut table = vec![0; usize::from(vectors) * ENTRY_SIZE];
        for entry in table.chunks_exact_mut(ENTRY_SIZE) {
            entry[ENTRY_VECTOR_CONTROL] = VECTOR_MASKED;
        }
        Ok(Self {
            table,
            pending: vec![0; usize::from(vectors).div_ceil(64)],
            vectors,
            cap,
        })
    }

    pub fn vectors(&self) -> u16 {
        self.vectors
    }

    pub fn table_len(&self) -> u64 {
        self.table.len() as u64
    }

    pub fn pba_len(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    fn control(&self, config: &ConfigSpace) -> u16 {
        config.u16_at(self.cap + CAP_CONTROL)
    }

    pub fn enabled(&self, config: &ConfigSpace) -> bool {
        self.control(config) & CONTROL_ENABLE != 0
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        copy_out(&self.table, offset, data);
    }

    /// Any width; the reserved bits of vector control stay zero. Unmasking
    /// an entry releases its pending message.
    pub fn write_table(
        &mut self,
        config: &ConfigSpace,
        offset: u64,
        data: &[u8],
        sink: &dyn MsiSink,
    ) {
        for (i, &value) in data.iter().enumerate() {
            let Some(at) = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) else {
                break;
            };
            let Some(byte) = self.table.get_mut(at) else {
                break;
            };
            match at % ENTRY_SIZE {
                ENTRY_VECTOR_CONTROL => *byte = value & VECTOR_MASKED,
                field if field > ENTRY_VECTOR_CONTROL => {}
                _ => *byte = value,
            }
        }
        self.deliver_pending(config, sink);
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let bytes: Vec<u8> = self
            .pending
            .iter()
            .flat_map(|word| word.to_le_bytes())
            .collect();
        copy_out(&bytes, offset, data);
    }

    /// Signal `vector`: sent now, or held pending while it or the function
    /// is masked. Nothing happens with MSI-X disabled or for a vector the
    /// table does not have.
    pub fn notify(&mut self, config: &ConfigSpace, vector: u16, sink: &dyn MsiSink) {
        if !self.enabled(config) || vector >= self.vectors {
            return;
        }
        if self.masked(config, vector) {
            self.set_pending(vector, true);
        } else {
            self.send(vector, sink);
        }
    }

    /// Call after every guest write to configuration space: clearing the
    /// function mask (or enabling) releases pending messages.
    pub fn config_written(&mut self, config: &ConfigSpace, sink: &dyn MsiSink) {
        self.deliver_pending(config, sink);
    }

    pub fn is_pending(&self, vector: u16) -> bool {
        let (word, bit) = (usize::from(vector / 64), vector % 64);
        self.pending.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    fn set_pending(&mut self, vector: u16, pending: bool) {
        let (word, bit) = (usize::from(vector / 64), vector % 64);
        if let Some(w) = self.pending.get_mut(word) {
            if pending {
                *w |= 1 << bit;
            } else {
                *w &= !(1 << bit);
            }
        }
    }

    fn entry(&self, vector: u16) -> &[u8] {
        let start = usize::from(vector) * ENTRY_SIZE;
        &self.table[start..start + ENTRY_SIZE]
    }

    fn masked(&self, config: &ConfigSpace, vector: u16) -> bool {
        self.control(config) & CONTROL_FUNCTION_MASK != 0
            || self.entry(vector)[ENTRY_VECTOR_CONTROL] & VECTOR_MASKED != 0
    }

    fn send(&self, vector: u16, sink: &dyn MsiSink) {
        let entry = self.entry(vector);
        let mut address = [0; 8];
        address.copy_from_slice(&entry[ENTRY_ADDRESS..ENTRY_ADDRESS + 8]);
        let mut data = [0; 4];
        data.copy_from_slice(&entry[ENTRY_DATA..ENTRY_DATA + 4]);
        sink.send(u64::from_le_bytes(address), u32::from_le_bytes(data));
    }

    fn deliver_pending(&mut self, config: &ConfigSpace, sink: &dyn MsiSink) {
        if !self.enabled(config) {
            return;
        }
        for vector in 0..self.vectors {
            if self.is_pending(vector) && !self.masked(config, vector) {
                self.set_pending(vector, false);
                self.send(vector, sink);
            }
        }
    }
}

/// Copy `src[offset..]` into `data`, zeros past its end.
fn copy_out(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| src.get(at))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::PciIds;
    use core::cell::RefCell;

    #[derive(Default)]
    struct Log(RefCell<Vec<(u64, u32)>>);
    impl MsiSink for Log {
        fn send(&self, address: u64, data: u32) {
            self.0.borrow_mut().push((address, data));
        }
    }

    fn setup() -> (ConfigSpace, Msix) {
        let ids = PciIds {
            vendor_id: 1,
            device_id: 2,
            revision: 0,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        };
        let mut config = ConfigSpace::new(&ids);
        let msix = Msix::new(&mut config, 3, 0, 0x4000, 0x5000).unwrap();
        (config, msix)
    }

    fn set_control(config: &mut ConfigSpace, msix: &Msix, value: u16) {
        config.write(msix.cap + CAP_CONTROL, &value.to_le_bytes());
    }

    fn program(msix: &mut Msix, config: &ConfigSpace, vector: u16, data: u32, sink: &Log) {
        let base = u64::from(vector) * ENTRY_SIZE as u64;
        msix.write_table(config, base, &0xfee0_0000u32.to_le_bytes(), sink);
        msix.write_table(config, base + 4, &0u32.to_le_bytes(), sink);
        msix.write_table(config, base + 8, &data.to_le_bytes(), sink);
    }

    #[test]
    fn capability_describes_table_and_pba() {
        let (config, msix) = setup();
        assert_eq!(config.u8_at(msix.cap), CAP_ID_MSIX);
        assert_eq!(config.u16_at(msix.cap + 2), 2, "table size is N-1");
        assert_eq!(config.u32_at(msix.cap + 4), 0x4000);
        assert_eq!(config.u32_at(msix.cap + 8), 0x5000);
        assert_eq!(msix.table_len(), 48);
        assert_eq!(msix.pba_len(), 8);
        let mut control = [0; 4];
        msix.read_table(12, &mut control);
        assert_eq!(control, [1, 0, 0, 0], "vectors start masked");
        assert!(Msix::new(&mut setup().0, 0, 0, 0, 0).is_err());
        assert!(Msix::new(&mut setup().0, 1, 0, 4, 0).is_err());
    }

    #[test]
    fn masked_vectors_stay_pending_until_unmasked() {
        let (mut config, mut msix) = setup();
        let sink = Log::default();
        msix.notify(&config, 1, &sink);
        assert!(!msix.is_pending(1), "MSI-X disabled: nothing");
        set_control(&mut config, &msix, CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&mut msix, &config, 1, 0x41, &sink);
        msix.notify(&config, 1, &sink);
        assert!(msix.is_pending(1), "entry masked");
        msix.write_table(&config, 16 + 12, &[0], &sink);
        assert!(sink.0.borrow().is_empty(), "function still masked");
        let mut pba = [0; 8];
        msix.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        set_control(&mut config, &msix, CONTROL_ENABLE);
        msix.config_written(&config, &sink);
        assert_eq!(*sink.0.borrow(), vec![(0xfee0_0000, 0x41)]);
        assert!(!msix.is_pending(1));
        msix.notify(&config, 1, &sink);
        msix.notify(&config, 7, &sink);
        assert_eq!(
            sink.0.borrow().len(),
            2,
            "unmasked vector goes at once, absent vector nowhere"
        );
        // The reserved bits of vector control never stick.
        msix.write_table(&config, 16 + 12, &[0xfe, 0xff, 0xff, 0xff], &sink);
        let mut control = [0; 4];
        msix.read_table(16 + 12, &mut control);
        assert_eq!(control, [0; 4]);
    }
}
