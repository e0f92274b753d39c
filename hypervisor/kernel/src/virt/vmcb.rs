//! The AMD VMCB: field offsets and typed little-endian accessors over its
//! 4 KiB page.
//!
//! Layout from the APM Vol. 2, Appendix B "Layout of VMCB": Table B-1
//! "VMCB Layout, Control Area" and Table B-2 "VMCB Layout, State Save Area"
//! (whose offsets are relative to the save area at 400h; the constants here
//! are from the start of the page).

use core::borrow::{Borrow, BorrowMut};
use core::marker::PhantomData;

use bitflags::bitflags;

use super::SegmentRegister;

pub const VMCB_SIZE: usize = 4096;
/// Start of the state save area.
pub const SAVE_AREA: usize = 0x400;

/// An integer stored little-endian in the VMCB.
pub trait Scalar: Copy + sealed::Sealed {
    const SIZE: usize;
    fn from_le(bytes: &[u8]) -> Self;
    fn write_le(self, out: &mut [u8]);
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! scalar {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Scalar for $t {
            const SIZE: usize = core::mem::size_of::<$t>();
            fn from_le(bytes: &[u8]) -> Self {
                let mut buf = [0; core::mem::size_of::<$t>()];
                buf.copy_from_slice(bytes);
                <$t>::from_le_bytes(buf)
            }
            fn write_le(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
scalar!(u8, u16, u32, u64);

/// A VMCB field: its offset and type. Only this module makes them, so every
/// field lies inside the page.
#[derive(Debug, PartialEq, Eq)]
pub struct Field<T> {
    offset: u16,
    ty: PhantomData<fn() -> T>,
}

impl<T> Clone for Field<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Field<T> {}

impl<T: Scalar> Field<T> {
    const fn at(offset: usize) -> Self {
        assert!(offset + T::SIZE <= VMCB_SIZE && offset.is_multiple_of(T::SIZE));
        Self {
            offset: offset as u16,
            ty: PhantomData,
        }
    }

    const fn save(offset: usize) -> Self {
        Self::at(SAVE_AREA + offset)
    }

    /// A part of a save-area segment; [`Vmcb::get`] and [`Vmcb::set`] check
    /// the bounds.
    const fn segment_part(seg: SaveSegment, offset: usize) -> Self {
        Self {
            offset: (seg.offset() + offset) as u16,
            ty: PhantomData,
        }
    }
}

impl<T> Field<T> {
    pub const fn offset(self) -> usize {
        self.offset as usize
    }
}

/// Control area fields (Table B-1).
pub mod control {
    use super::Field;

    /// Bits 15:0 intercept reads of CR0–15, bits 31:16 writes.
    pub const INTERCEPT_CR: Field<u32> = Field::at(0x000);
    /// Bits 15:0 intercept reads of DR0–15, bits 31:16 writes.
    pub const INTERCEPT_DR: Field<u32> = Field::at(0x004);
    /// Bit n intercepts exception vector n.
    pub const INTERCEPT_EXCEPTIONS: Field<u32> = Field::at(0x008);
    pub const INTERCEPT_MISC1: Field<u32> = Field::at(0x00c);
    pub const INTERCEPT_MISC2: Field<u32> = Field::at(0x010);
    pub const PAUSE_FILTER_THRESHOLD: Field<u16> = Field::at(0x03c);
    pub const PAUSE_FILTER_COUNT: Field<u16> = Field::at(0x03e);
    pub const IOPM_BASE_PA: Field<u64> = Field::at(0x040);
    pub const MSRPM_BASE_PA: Field<u64> = Field::at(0x048);
    pub const TSC_OFFSET: Field<u64> = Field::at(0x050);
    pub const GUEST_ASID: Field<u32> = Field::at(0x058);
    pub const TLB_CONTROL: Field<u8> = Field::at(0x05c);
    /// V_TPR, V_IRQ, V_INTR_PRIO, V_IGN_TPR, V_INTR_MASKING, V_INTR_VECTOR.
    pub const V_INTR: Field<u64> = Field::at(0x060);
    pub const INTERRUPT_SHADOW: Field<u64> = Field::at(0x068);
    pub const EXITCODE: Field<u64> = Field::at(0x070);
    pub const EXITINFO1: Field<u64> = Field::at(0x078);
    pub const EXITINFO2: Field<u64> = Field::at(0x080);
    pub const EXITINTINFO: Field<u64> = Field::at(0x088);
    /// Bit 0: NP_ENABLE.
    pub const NP_CONTROL: Field<u64> = Field::at(0x090);
    pub const EVENTINJ: Field<u64> = Field::at(0x0a8);
    pub const N_CR3: Field<u64> = Field::at(0x0b0);
    pub const VMCB_CLEAN: Field<u32> = Field::at(0x0c0);
    /// Next sequential instruction pointer (with the NRIP save feature).
    pub const NRIP: Field<u64> = Field::at(0x0c8);
    pub const GUEST_INSTRUCTION_BYTES_FETCHED: Field<u8> = Field::at(0x0d0);
}

/// State save area fields (Table B-2), offsets from the page start.
pub mod save {
    use super::Field;

    pub const CPL: Field<u8> = Field::save(0x0cb);
    pub const EFER: Field<u64> = Field::save(0x0d0);
    pub const CR4: Field<u64> = Field::save(0x148);
    pub const CR3: Field<u64> = Field::save(0x150);
    pub const CR0: Field<u64> = Field::save(0x158);
    pub const DR7: Field<u64> = Field::save(0x160);
    pub const DR6: Field<u64> = Field::save(0x168);
    pub const RFLAGS: Field<u64> = Field::save(0x170);
    pub const RIP: Field<u64> = Field::save(0x178);
    pub const RSP: Field<u64> = Field::save(0x1d8);
    pub const RAX: Field<u64> = Field::save(0x1f8);
    pub const STAR: Field<u64> = Field::save(0x200);
    pub const LSTAR: Field<u64> = Field::save(0x208);
    pub const CSTAR: Field<u64> = Field::save(0x210);
    pub const SFMASK: Field<u64> = Field::save(0x218);
    pub const KERNEL_GS_BASE: Field<u64> = Field::save(0x220);
    pub const SYSENTER_CS: Field<u64> = Field::save(0x228);
    pub const SYSENTER_ESP: Field<u64> = Field::save(0x230);
    pub const SYSENTER_EIP: Field<u64> = Field::save(0x238);
    pub const CR2: Field<u64> = Field::save(0x240);
    pub const G_PAT: Field<u64> = Field::save(0x268);
    pub const DBGCTL: Field<u64> = Field::save(0x270);
}

/// A segment or descriptor-table register in the save area: selector
/// (+0), attributes (+2), limit (+4), base (+8); 16 bytes each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveSegment {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
    /// Only limit and base are used.
    Gdtr,
    Ldtr,
    /// Only limit and base are used.
    Idtr,
    Tr,
}

const SEGMENT_SIZE: usize = 0x10;
const SEGMENT_SELECTOR: usize = 0;
const SEGMENT_ATTRIB: usize = 2;
const SEGMENT_LIMIT: usize = 4;
const SEGMENT_BASE: usize = 8;

impl SaveSegment {
    pub const fn offset(self) -> usize {
        SAVE_AREA + SEGMENT_SIZE * self as usize
    }
}

impl From<SegmentRegister> for SaveSegment {
    fn from(reg: SegmentRegister) -> Self {
        match reg {
            SegmentRegister::Es => Self::Es,
            SegmentRegister::Cs => Self::Cs,
            SegmentRegister::Ss => Self::Ss,
            SegmentRegister::Ds => Self::Ds,
            SegmentRegister::Fs => Self::Fs,
            SegmentRegister::Gs => Self::Gs,
            SegmentRegister::Ldtr => Self::Ldtr,
            SegmentRegister::Tr => Self::Tr,
        }
    }
}

/// One segment register as the VMCB stores it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    /// The VMCB's packed attribute format, see [`svm_attrib`].
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

bitflags! {
    /// Intercept vector 3, offset 00Ch.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct InterceptMisc1: u32 {
        const INTR = 1 << 0;
        const NMI = 1 << 1;
        const SMI = 1 << 2;
        const INIT = 1 << 3;
        const VINTR = 1 << 4;
        const CR0_SELECTIVE_WRITE = 1 << 5;
        const IDTR_READ = 1 << 6;
        const GDTR_READ = 1 << 7;
        const LDTR_READ = 1 << 8;
        const TR_READ = 1 << 9;
        const IDTR_WRITE = 1 << 10;
        const GDTR_WRITE = 1 << 11;
        const LDTR_WRITE = 1 << 12;
        const TR_WRITE = 1 << 13;
        const RDTSC = 1 << 14;
        const RDPMC = 1 << 15;
        const PUSHF = 1 << 16;
        const POPF = 1 << 17;
        const CPUID = 1 << 18;
        const RSM = 1 << 19;
        const IRET = 1 << 20;
        const INTN = 1 << 21;
        const INVD = 1 << 22;
        const PAUSE = 1 << 23;
        const HLT = 1 << 24;
        const INVLPG = 1 << 25;
        const INVLPGA = 1 << 26;
        const IOIO_PROT = 1 << 27;
        const MSR_PROT = 1 << 28;
        const TASK_SWITCH = 1 << 29;
        const FERR_FREEZE = 1 << 30;
        const SHUTDOWN = 1 << 31;
    }

    /// Intercept vector 4, offset 010h.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct InterceptMisc2: u32 {
        /// Must be set, or VMRUN fails with VMEXIT_INVALID.
        const VMRUN = 1 << 0;
        const VMMCALL = 1 << 1;
        const VMLOAD = 1 << 2;
        const VMSAVE = 1 << 3;
        const STGI = 1 << 4;
        const CLGI = 1 << 5;
        const SKINIT = 1 << 6;
        const RDTSCP = 1 << 7;
        const ICEBP = 1 << 8;
        const WBINVD = 1 << 9;
        const MONITOR = 1 << 10;
        const MWAIT = 1 << 11;
        const MWAIT_ARMED = 1 << 12;
        const XSETBV = 1 << 13;
        const RDPRU = 1 << 14;
    }

    /// The V_INTR quadword at 060h (V_TPR in bits 3:0, V_INTR_PRIO in 19:16
    /// and V_INTR_VECTOR in 39:32 are fields, see the accessors).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct VIntr: u64 {
        const V_IRQ = 1 << 8;
        const V_GIF = 1 << 9;
        const V_IGN_TPR = 1 << 20;
        const V_INTR_MASKING = 1 << 24;
        const V_GIF_ENABLE = 1 << 25;
    }

    /// The quadword at 068h.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct InterruptShadow: u64 {
        const INTERRUPT_SHADOW = 1 << 0;
        const GUEST_INTERRUPT_MASK = 1 << 1;
    }

    /// VMCB clean bits (APM Vol. 2, 15.15.3, Table "VMCB Clean Field"): a set
    /// bit lets the CPU reuse its cached copy of that group of fields.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct CleanBits: u32 {
        /// Intercept vectors, TSC offset, pause filter.
        const INTERCEPTS = 1 << 0;
        /// IOPM_BASE_PA, MSRPM_BASE_PA.
        const IOPM = 1 << 1;
        const ASID = 1 << 2;
        /// The V_INTR fields.
        const TPR = 1 << 3;
        /// NP_ENABLE, N_CR3, G_PAT.
        const NP = 1 << 4;
        /// CR0, CR3, CR4, EFER.
        const CRX = 1 << 5;
        /// DR6, DR7.
        const DRX = 1 << 6;
        /// GDTR, IDTR.
        const DT = 1 << 7;
        /// CS, DS, SS, ES, CPL.
        const SEG = 1 << 8;
        const CR2 = 1 << 9;
        /// DBGCTL and the last-branch records.
        const LBR = 1 << 10;
        const AVIC = 1 << 11;
    }
}

/// NP_ENABLE, bit 0 of the quadword at 090h.
pub const NP_ENABLE: u64 = 1 << 0;
const V_TPR_MASK: u64 = 0xf;
const V_INTR_PRIO_SHIFT: u32 = 16;
const V_INTR_PRIO_MASK: u64 = 0xf << V_INTR_PRIO_SHIFT;
const V_INTR_VECTOR_SHIFT: u32 = 32;
const V_INTR_VECTOR_MASK: u64 = 0xff << V_INTR_VECTOR_SHIFT;

/// TLB_CONTROL values (Table B-1, offset 05Ch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TlbControl {
    DoNothing = 0,
    /// Flush the entire TLB, every ASID.
    FlushAll = 1,
    /// Flush this guest's ASID.
    FlushGuest = 3,
    /// Flush this guest's non-global entries.
    FlushGuestNonGlobal = 7,
}

/// A VMCB over any owner of its page: an array in the host tests, a
/// `&mut [u8; 4096]` from the direct map in the kernel.
pub struct Vmcb<P> {
    page: P,
}

impl<P: Borrow<[u8; VMCB_SIZE]>> Vmcb<P> {
    pub const fn new(page: P) -> Self {
        Self { page }
    }

    pub fn into_inner(self) -> P {
        self.page
    }

    pub fn get<T: Scalar>(&self, field: Field<T>) -> T {
        let off = field.offset();
        // Fields are inside the page by construction; the fallback is never
        // taken.
        self.page
            .borrow()
            .get(off..off + T::SIZE)
            .map_or_else(|| T::from_le(&[0; 8][..T::SIZE]), T::from_le)
    }

    pub fn segment(&self, seg: SaveSegment) -> Segment {
        Segment {
            selector: self.get(Field::segment_part(seg, SEGMENT_SELECTOR)),
            attrib: self.get(Field::segment_part(seg, SEGMENT_ATTRIB)),
            limit: self.get(Field::segment_part(seg, SEGMENT_LIMIT)),
            base: self.get(Field::segment_part(seg, SEGMENT_BASE)),
        }
    }

    pub fn intercept_misc1(&self) -> InterceptMisc1 {
        InterceptMisc1::from_bits_retain(self.get(control::INTERCEPT_MISC1))
    }

    pub fn intercept_misc2(&self) -> InterceptMisc2 {
        InterceptMisc2::from_bits_retain(self.get(control::INTERCEPT_MISC2))
    }

    pub fn v_intr(&self) -> VIntr {
        VIntr::from_bits_truncate(self.get(control::V_INTR))
    }

    pub fn v_intr_vector(&self) -> u8 {
        ((self.get(control::V_INTR) & V_INTR_VECTOR_MASK) >> V_INTR_VECTOR_SHIFT) as u8
    }

    pub fn v_tpr(&self) -> u8 {
        (self.get(control::V_INTR) & V_TPR_MASK) as u8
    }

    pub fn interrupt_shadow(&self) -> InterruptShadow {
        InterruptShadow::from_bits_retain(self.get(control::INTERRUPT_SHADOW))
    }
}

impl<P: Borrow<[u8; VMCB_SIZE]> + BorrowMut<[u8; VMCB_SIZE]>> Vmcb<P> {
    pub fn set<T: Scalar>(&mut self, field: Field<T>, value: T) {
        let off = field.offset();
        if let Some(bytes) = self.page.borrow_mut().get_mut(off..off + T::SIZE) {
            value.write_le(bytes);
        }
    }

    pub fn clear(&mut self) {
        self.page.borrow_mut().fill(0);
    }

    pub fn set_segment(&mut self, seg: SaveSegment, value: Segment) {
        self.set(Field::segment_part(seg, SEGMENT_SELECTOR), value.selector);
        self.set(Field::segment_part(seg, SEGMENT_ATTRIB), value.attrib);
        self.set(Field::segment_part(seg, SEGMENT_LIMIT), value.limit);
        self.set(Field::segment_part(seg, SEGMENT_BASE), value.base);
    }

    pub fn set_intercept_misc1(&mut self, value: InterceptMisc1) {
        self.set(control::INTERCEPT_MISC1, value.bits());
    }

    pub fn set_intercept_misc2(&mut self, value: InterceptMisc2) {
        self.set(control::INTERCEPT_MISC2, value.bits());
    }

    pub fn set_tlb_control(&mut self, value: TlbControl) {
        self.set(control::TLB_CONTROL, value as u8);
    }

    /// The guest's CR8 (with V_INTR_MASKING its MOV to CR8 lands here).
    pub fn set_v_tpr(&mut self, tpr: u8) {
        let keep = self.get(control::V_INTR) & !V_TPR_MASK;
        self.set(control::V_INTR, keep | (u64::from(tpr) & V_TPR_MASK));
    }

    /// Sets the V_INTR flags, keeping V_TPR, V_INTR_PRIO and the vector.
    pub fn set_v_intr(&mut self, flags: VIntr) {
        let fields = V_TPR_MASK | V_INTR_PRIO_MASK | V_INTR_VECTOR_MASK;
        let old = self.get(control::V_INTR) & fields;
        self.set(control::V_INTR, old | flags.bits());
    }

    /// Requests a virtual interrupt (APM Vol. 2, 15.21.4): with V_IGN_TPR
    /// it is taken as soon as the guest can, which gives the interrupt-window
    /// exit when VINTR is intercepted.
    pub fn set_v_intr_request(&mut self, vector: u8, priority: u8) {
        let keep = self.get(control::V_INTR) & !(V_INTR_PRIO_MASK | V_INTR_VECTOR_MASK);
        let value = keep
            | (VIntr::V_IRQ | VIntr::V_IGN_TPR).bits()
            | ((u64::from(priority) << V_INTR_PRIO_SHIFT) & V_INTR_PRIO_MASK)
            | (u64::from(vector) << V_INTR_VECTOR_SHIFT);
        self.set(control::V_INTR, value);
    }

    pub fn set_interrupt_shadow(&mut self, value: InterruptShadow) {
        self.set(control::INTERRUPT_SHADOW, value.bits());
    }

    pub fn set_clean(&mut self, value: CleanBits) {
        self.set(control::VMCB_CLEAN, value.bits());
    }
}

/// VMX access-rights bits without a place in the VMCB attributes.
const AR_UNUSABLE: u32 = 1 << 16;
/// Descriptor bits 47:40 (type, S, DPL, P): bits 7:0 in both formats.
const LOW_ATTRIBUTES: u32 = 0xff;
/// Descriptor bits 55:52 (AVL, L, D/B, G): VMCB attrib bits 11:8, VMX
/// access-rights bits 15:12 (SDM Vol. 3C, Table "Format of Access Rights").
const HIGH_ATTRIBUTES_SVM: u32 = 0xf00;
const HIGH_ATTRIBUTES_SHIFT: u32 = 4;
const PRESENT: u32 = 1 << 7;

/// VMX access rights (32 bits: descriptor attributes spread over 15:0 with
/// bits 11:8 reserved, and "unusable" in bit 16) to the VMCB's 12-bit
/// attributes. An unusable segment becomes not present.
pub const fn svm_attrib(access_rights: u32) -> u16 {
    let mut attrib = (access_rights & LOW_ATTRIBUTES)
        | ((access_rights >> HIGH_ATTRIBUTES_SHIFT) & HIGH_ATTRIBUTES_SVM);
    if access_rights & AR_UNUSABLE != 0 {
        attrib &= !PRESENT;
    }
    attrib as u16
}

/// VMCB attributes to VMX access rights. A not-present segment is marked
/// unusable; its other bits (notably SS.DPL, which VMX treats as the CPL) are
/// kept.
pub const fn vmx_access_rights(attrib: u16) -> u32 {
    let attrib = attrib as u32;
    let rights =
        (attrib & LOW_ATTRIBUTES) | ((attrib & HIGH_ATTRIBUTES_SVM) << HIGH_ATTRIBUTES_SHIFT);
    if attrib & PRESENT == 0 {
        rights | AR_UNUSABLE
    } else {
        rights
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> Vmcb<[u8; VMCB_SIZE]> {
        Vmcb::new([0; VMCB_SIZE])
    }

    #[test]
    fn offsets_match_the_apm() {
        let cases = [
            (control::INTERCEPT_MISC1.offset(), 0x00c),
            (control::IOPM_BASE_PA.offset(), 0x040),
            (control::MSRPM_BASE_PA.offset(), 0x048),
            (control::TSC_OFFSET.offset(), 0x050),
            (control::GUEST_ASID.offset(), 0x058),
            (control::TLB_CONTROL.offset(), 0x05c),
            (control::EXITCODE.offset(), 0x070),
            (control::EXITINFO1.offset(), 0x078),
            (control::EXITINFO2.offset(), 0x080),
            (control::EXITINTINFO.offset(), 0x088),
            (control::NP_CONTROL.offset(), 0x090),
            (control::EVENTINJ.offset(), 0x0a8),
            (control::N_CR3.offset(), 0x0b0),
            (control::VMCB_CLEAN.offset(), 0x0c0),
            (control::NRIP.offset(), 0x0c8),
            (SaveSegment::Es.offset(), 0x400),
            (SaveSegment::Gdtr.offset(), 0x460),
            (SaveSegment::Tr.offset(), 0x490),
            (save::CPL.offset(), 0x4cb),
            (save::EFER.offset(), 0x4d0),
            (save::CR4.offset(), 0x548),
            (save::RIP.offset(), 0x578),
            (save::RSP.offset(), 0x5d8),
            (save::RAX.offset(), 0x5f8),
            (save::KERNEL_GS_BASE.offset(), 0x620),
            (save::CR2.offset(), 0x640),
            (save::G_PAT.offset(), 0x668),
        ];
        for (i, (offset, apm)) in cases.into_iter().enumerate() {
            assert_eq!(offset, apm, "case {i}");
        }
    }

    #[test]
    fn round_trips_are_little_endian() {
        let mut vmcb = page();
        vmcb.set(save::RIP, 0x1122_3344_5566_7788);
        vmcb.set(control::GUEST_ASID, 0xaabb_ccdd);
        vmcb.set(save::CPL, 3);
        vmcb.set_tlb_control(TlbControl::FlushGuest);
        assert_eq!(vmcb.get(save::RIP), 0x1122_3344_5566_7788);
        assert_eq!(vmcb.get(control::GUEST_ASID), 0xaabb_ccdd);
        assert_eq!(vmcb.get(save::CPL), 3);
        let bytes = vmcb.into_inner();
        assert_eq!(bytes[0x578], 0x88);
        assert_eq!(bytes[0x57f], 0x11);
        assert_eq!(bytes[0x058..0x05c], [0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(bytes[0x4cb], 3);
        assert_eq!(bytes[0x05c], 3);
        // Neighbours untouched.
        assert_eq!(bytes[0x570..0x578], [0; 8]);
        assert_eq!(bytes[0x05d], 0);

        // Borrowed pages work the same.
        let mut raw = [0u8; VMCB_SIZE];
        let mut vmcb = Vmcb::new(&mut raw);
        vmcb.set(control::EXITCODE, u64::MAX);
        assert_eq!(vmcb.get(control::EXITCODE), u64::MAX);
        vmcb.clear();
        assert_eq!(vmcb.get(control::EXITCODE), 0);
    }

    #[test]
    fn segments() {
        let mut vmcb = page();
        let cs = Segment {
            selector: 0x08,
            attrib: 0x29b,
            limit: 0xffff_ffff,
            base: 0xffff_8000_0000_0000,
        };
        vmcb.set_segment(SaveSegment::Cs, cs);
        assert_eq!(vmcb.segment(SaveSegment::Cs), cs);
        assert_eq!(vmcb.segment(SaveSegment::Es), Segment::default());
        assert_eq!(vmcb.segment(SaveSegment::Ss), Segment::default());
        let bytes = vmcb.into_inner();
        assert_eq!(bytes[0x410..0x412], [0x08, 0x00]);
        assert_eq!(bytes[0x412..0x414], [0x9b, 0x02]);
        assert_eq!(SaveSegment::from(SegmentRegister::Tr), SaveSegment::Tr);
        assert_eq!(SaveSegment::from(SegmentRegister::Ldtr).offset(), 0x470);
    }

    #[test]
    fn intercepts_and_interrupt_control() {
        let mut vmcb = page();
        let misc1 = InterceptMisc1::INTR
            | InterceptMisc1::NMI
            | InterceptMisc1::CPUID
            | InterceptMisc1::HLT
            | InterceptMisc1::IOIO_PROT
            | InterceptMisc1::MSR_PROT
            | InterceptMisc1::SHUTDOWN;
        vmcb.set_intercept_misc1(misc1);
        vmcb.set_intercept_misc2(InterceptMisc2::VMRUN | InterceptMisc2::VMMCALL);
        assert_eq!(vmcb.intercept_misc1(), misc1);
        assert_eq!(vmcb.get(control::INTERCEPT_MISC1), 0x9904_0003);
        assert_eq!(vmcb.get(control::INTERCEPT_MISC2), 0b11);

        vmcb.set_v_intr_request(0x30, 0xf);
        assert_eq!(vmcb.v_intr(), VIntr::V_IRQ | VIntr::V_IGN_TPR);
        assert_eq!(vmcb.v_intr_vector(), 0x30);
        assert_eq!(vmcb.get(control::V_INTR), 0x30_001f_0100);
        vmcb.set_v_intr(VIntr::V_INTR_MASKING);
        assert_eq!(vmcb.v_intr(), VIntr::V_INTR_MASKING);
        assert_eq!(vmcb.v_intr_vector(), 0x30);
        assert_eq!(vmcb.v_tpr(), 0);
        vmcb.set_v_tpr(0x1b);
        assert_eq!(vmcb.v_tpr(), 0xb, "CR8 has four bits");
        assert_eq!(vmcb.v_intr(), VIntr::V_INTR_MASKING);
        assert_eq!(vmcb.v_intr_vector(), 0x30);

        vmcb.set_interrupt_shadow(InterruptShadow::INTERRUPT_SHADOW);
        assert_eq!(vmcb.get(control::INTERRUPT_SHADOW), 1);
        vmcb.set_clean(CleanBits::all());
        assert_eq!(vmcb.get(control::VMCB_CLEAN), 0xfff);
    }

    #[test]
    fn attribute_conversion() {
        // (VMX access rights, VMCB attrib)
        let cases = [
            (0xa09b, 0xa9b), // 64-bit code: P, DPL 0, S, type 0xb, L, G
            (0xc093, 0xc93), // flat data: P, S, type 3, D/B, G
            (0x00f3, 0x0f3), // real-mode style data, DPL 3
            (0x008b, 0x08b), // busy 64-bit TSS
            (0x0082, 0x082), // LDT
        ];
        for (ar, attrib) in cases {
            assert_eq!(svm_attrib(ar), attrib, "{ar:#x}");
            assert_eq!(vmx_access_rights(attrib), ar, "{attrib:#x}");
        }
        // Unusable: P cleared, DPL kept; and back.
        assert_eq!(svm_attrib(0x1_00f3), 0x073);
        assert_eq!(vmx_access_rights(0x073), 0x1_0073);
        assert_eq!(vmx_access_rights(0), 0x1_0000);
        // Reserved access-rights bits 11:8 and 31:17 are dropped.
        assert_eq!(svm_attrib(0xfffe_0f93), 0x093);
        // Every attribute value survives the round trip.
        for attrib in 0..=0xfffu16 {
            let back = svm_attrib(vmx_access_rights(attrib));
            assert_eq!(back, attrib, "{attrib:#x}");
        }
    }
}
