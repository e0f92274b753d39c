//! Message-signalled interrupts: a device raises one by writing a data
//! word to an address in the local APIC's window; the kernel gives each of
//! its `MSI_COUNT` MSIs a vector after the IOAPIC's and ups the semaphore
//! a driver assigned to it. MSIs are edge-triggered: nothing to mask.

use super::ioapic;
use moat_abi::{MSI_COUNT, MSI_FIRST};

/// The first MSI's vector, after the IOAPIC's GSIs.
pub const VECTOR_BASE: u64 = ioapic::VECTOR_BASE as u64 + ioapic::MAX_GSIS as u64;
/// The kernel's interrupt slots (`Kernel::irq_sms`): the GSIs, then the
/// MSIs.
pub const IRQ_SLOTS: usize = ioapic::MAX_GSIS as usize + MSI_COUNT as usize;
/// The local APIC's MSI address window (Intel SDM Vol. 3A, "Message
/// Address Register Format").
const ADDRESS_BASE: u64 = 0xfee0_0000;
const ADDRESS_DEST_SHIFT: u64 = 12;

/// The MSI number of an IRQ-space key, if it names one.
pub fn number(key: u64) -> Option<u64> {
    key.checked_sub(MSI_FIRST).filter(|&n| n < MSI_COUNT)
}

/// The interrupt slot of MSI `n`.
pub fn slot(n: u64) -> usize {
    ioapic::MAX_GSIS as usize + n as usize
}

/// The MSI number a vector belongs to.
pub fn of_vector(vector: u64) -> Option<u64> {
    vector.checked_sub(VECTOR_BASE).filter(|&n| n < MSI_COUNT)
}

/// The address and data a device writes to raise MSI `n` on the CPU whose
/// local APIC id is `apic_id` (physical destination mode, fixed delivery,
/// edge-triggered). The address holds 8 bits of APIC id; a larger
/// x2APIC id would need interrupt remapping (the caller refuses it).
pub fn message(n: u64, apic_id: u32) -> (u64, u64) {
    (
        ADDRESS_BASE | (u64::from(apic_id) & 0xff) << ADDRESS_DEST_SHIFT,
        VECTOR_BASE + n,
    )
}
