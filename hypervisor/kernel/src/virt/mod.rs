//! Hardware virtualization logic that does not touch the hardware: guest
//! memory tables (Intel EPT, AMD NPT), the VMCS field encodings and control
//! adjustment, the VMCB layout, event injection formats and exit decoding.
//!
//! The backends in `arch::x86_64::{vmx, svm}` execute the instructions; the
//! formats and decisions live here so the host tests can check them.

use core::fmt;
use core::marker::PhantomData;

use bitflags::bitflags;

pub mod ept;
pub mod event;
pub mod exit;
pub mod npt;
mod space;
pub mod tags;
pub mod vmcb;
pub mod vmcs;
pub mod vmx_state;

pub use crate::paging::{PageSize, TableMemory};
pub use space::{EntryFormat, GuestSpace};

bitflags! {
    /// Access a guest gets to a page of guest-physical memory.
    ///
    /// The bit positions are those of an EPT entry (SDM Vol. 3C, Table 29-6:
    /// read bit 0, write bit 1, execute bit 2); NPT translates them.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct GuestRights: u8 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXECUTE = 1 << 2;
        const RWX = Self::READ.bits() | Self::WRITE.bits() | Self::EXECUTE.bits();
    }
}

/// Caching of a guest mapping, as seen from the host side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    /// Ordinary memory. The guest's own PAT still applies on top, so it can
    /// make its view of the page uncacheable or write-combining.
    WriteBack,
    /// Device memory passed through: uncacheable whatever the guest's PAT says.
    Uncacheable,
}

/// One past the highest guest-physical address a 4-level table reaches.
pub const GUEST_PHYS_LIMIT: u64 = 1 << 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMapError {
    /// `gpa` or `hpa` is not aligned to `align` (the page size).
    Misaligned {
        gpa: u64,
        hpa: u64,
        align: u64,
    },
    /// The guest-physical page reaches beyond [`GUEST_PHYS_LIMIT`].
    GpaOutOfRange(u64),
    /// The host-physical page reaches beyond what an entry can hold.
    HpaOutOfRange(u64),
    /// Something is already mapped at `gpa`: a page, a large page covering
    /// it, or a table where a large page should go.
    AlreadyMapped(u64),
    NotMapped(u64),
    /// Every mapping must at least be readable: EPT treats write without read
    /// as a misconfiguration, and NPT cannot express a present page that is
    /// not readable.
    InvalidRights(GuestRights),
    OutOfMemory,
}

impl fmt::Display for GuestMapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Misaligned { gpa, hpa, align } => write!(
                f,
                "cannot map guest-physical {gpa:#x} to host-physical {hpa:#x}: \
                 both must be multiples of {align:#x}"
            ),
            Self::GpaOutOfRange(gpa) => write!(
                f,
                "guest-physical page at {gpa:#x} is beyond the 48-bit guest-physical space"
            ),
            Self::HpaOutOfRange(hpa) => write!(
                f,
                "host-physical page at {hpa:#x} is beyond the 52-bit physical address space"
            ),
            Self::AlreadyMapped(gpa) => {
                write!(f, "guest-physical address {gpa:#x} is already mapped")
            }
            Self::NotMapped(gpa) => write!(f, "guest-physical address {gpa:#x} is not mapped"),
            Self::InvalidRights(rights) => {
                write!(
                    f,
                    "guest rights {rights:?} lack READ, which every mapping needs"
                )
            }
            Self::OutOfMemory => write!(f, "out of memory for guest page tables"),
        }
    }
}

/// Where a guest-physical address leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestTranslation {
    /// Host-physical address of the translated byte.
    pub hpa: u64,
    pub size: PageSize,
    /// Rights granted by every level of the walk.
    pub rights: GuestRights,
    pub memory_type: MemoryType,
}

/// Which cached guest translations a [`Flush`] must invalidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushScope {
    /// Those of one guest-physical space, named by the value the CPU knows it
    /// by: the EPTP (EPT) or nCR3 (NPT).
    Space(u64),
    /// Those of every guest.
    All,
}

/// A TLB invalidation owed after guest mappings were removed or changed:
/// until it is performed on every CPU that may cache the space, the guest can
/// keep using the old translation. Not `Clone`: one change, one obligation.
/// Tokens merge, so a revoke of many pages costs one invalidation.
#[must_use = "the guest keeps using the stale translation until this flush is performed"]
#[derive(Debug, PartialEq, Eq)]
pub struct Flush<F> {
    scope: FlushScope,
    format: PhantomData<F>,
}

impl<F> Flush<F> {
    pub(crate) const fn new(scope: FlushScope) -> Self {
        Self {
            scope,
            format: PhantomData,
        }
    }

    pub const fn scope(&self) -> FlushScope {
        self.scope
    }

    /// One flush covering both: the same space stays a single-space flush,
    /// different spaces widen to a flush of all.
    pub fn merge(self, other: Self) -> Self {
        match (self.scope, other.scope) {
            (FlushScope::Space(a), FlushScope::Space(b)) if a == b => self,
            _ => Self::new(FlushScope::All),
        }
    }
}

/// The segment registers of the guest state, in the order both the VMCS
/// encodings (SDM Vol. 3C, Appendix B) and the VMCB save area (APM Vol. 2,
/// Table B-2) list ES through GS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentRegister {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
    Ldtr,
    Tr,
}

impl SegmentRegister {
    pub const ALL: [Self; 8] = [
        Self::Es,
        Self::Cs,
        Self::Ss,
        Self::Ds,
        Self::Fs,
        Self::Gs,
        Self::Ldtr,
        Self::Tr,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_merge() {
        let a = Flush::<()>::new(FlushScope::Space(0x1000));
        let b = Flush::<()>::new(FlushScope::Space(0x1000));
        assert_eq!(a.merge(b).scope(), FlushScope::Space(0x1000));
        let a = Flush::<()>::new(FlushScope::Space(0x1000));
        let c = Flush::<()>::new(FlushScope::Space(0x2000));
        assert_eq!(a.merge(c).scope(), FlushScope::All);
        let all = Flush::<()>::new(FlushScope::All);
        let d = Flush::<()>::new(FlushScope::Space(0x1000));
        assert_eq!(all.merge(d).scope(), FlushScope::All);
    }

    #[test]
    fn error_messages() {
        assert!(GuestMapError::GpaOutOfRange(GUEST_PHYS_LIMIT)
            .to_string()
            .contains("48-bit"));
        assert!(GuestMapError::InvalidRights(GuestRights::WRITE)
            .to_string()
            .contains("READ"));
    }
}
