//! Events delivered to a guest: the vendor-neutral form and its encodings.
//!
//! VMX: the interruption-information format shared by the VM-entry
//! interruption-information, VM-exit interruption-information and
//! IDT-vectoring information fields (SDM Vol. 3C, 25.8.3 and 25.9.2–25.9.3,
//! tables "Format of the VM-Entry Interruption-Information Field" ff.).
//! SVM: the EVENTINJ / EXITINTINFO format (APM Vol. 2, 15.20 "Event
//! Injection", Figure "EVENTINJ Field").

use moat_abi::vcpu::{event_kind, Inject};

/// What kind of event: decides how the CPU delivers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    ExternalInterrupt,
    Nmi,
    /// An exception raised by the processor (#GP, #PF, ...).
    HardwareException,
    /// INT n.
    SoftwareInterrupt,
    /// INT1 (ICEBP).
    PrivilegedSoftwareException,
    /// INT3 or INTO.
    SoftwareException,
}

/// An event to inject, or one whose delivery an exit interrupted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub vector: u8,
    pub kind: EventKind,
    pub error_code: Option<u32>,
}

const VECTOR_MASK: u64 = 0xff;
const TYPE_SHIFT: u32 = 8;
const TYPE_MASK: u64 = 0b111;
const ERROR_CODE_VALID: u64 = 1 << 11;
const VALID: u64 = 1 << 31;
/// SVM: the error code sits in bits 63:32 of EVENTINJ / EXITINTINFO.
const SVM_ERROR_CODE_SHIFT: u32 = 32;

mod vmx_type {
    pub const EXTERNAL_INTERRUPT: u64 = 0;
    pub const NMI: u64 = 2;
    pub const HARDWARE_EXCEPTION: u64 = 3;
    pub const SOFTWARE_INTERRUPT: u64 = 4;
    pub const PRIVILEGED_SOFTWARE_EXCEPTION: u64 = 5;
    pub const SOFTWARE_EXCEPTION: u64 = 6;
}

mod svm_type {
    pub const INTR: u64 = 0;
    pub const NMI: u64 = 2;
    pub const EXCEPTION: u64 = 3;
    pub const SOFTWARE_INTERRUPT: u64 = 4;
}

impl Event {
    /// The interruption-information value (valid bit set) and the error code
    /// to write alongside it. Software interrupts and exceptions also need
    /// the VM-entry instruction length, which the caller knows.
    pub fn to_vmx(self) -> (u32, u32) {
        let kind = match self.kind {
            EventKind::ExternalInterrupt => vmx_type::EXTERNAL_INTERRUPT,
            EventKind::Nmi => vmx_type::NMI,
            EventKind::HardwareException => vmx_type::HARDWARE_EXCEPTION,
            EventKind::SoftwareInterrupt => vmx_type::SOFTWARE_INTERRUPT,
            EventKind::PrivilegedSoftwareException => vmx_type::PRIVILEGED_SOFTWARE_EXCEPTION,
            EventKind::SoftwareException => vmx_type::SOFTWARE_EXCEPTION,
        };
        let mut info = VALID | (kind << TYPE_SHIFT) | u64::from(self.vector);
        if self.error_code.is_some() {
            info |= ERROR_CODE_VALID;
        }
        (info as u32, self.error_code.unwrap_or(0))
    }

    /// Decodes an interruption-information field; `None` if its valid bit is
    /// clear or the type is not an event (reserved, or "other event").
    pub fn from_vmx(info: u32, error_code: u32) -> Option<Self> {
        let info = u64::from(info);
        if info & VALID == 0 {
            return None;
        }
        let kind = match (info >> TYPE_SHIFT) & TYPE_MASK {
            vmx_type::EXTERNAL_INTERRUPT => EventKind::ExternalInterrupt,
            vmx_type::NMI => EventKind::Nmi,
            vmx_type::HARDWARE_EXCEPTION => EventKind::HardwareException,
            vmx_type::SOFTWARE_INTERRUPT => EventKind::SoftwareInterrupt,
            vmx_type::PRIVILEGED_SOFTWARE_EXCEPTION => EventKind::PrivilegedSoftwareException,
            vmx_type::SOFTWARE_EXCEPTION => EventKind::SoftwareException,
            _ => return None,
        };
        Some(Self {
            vector: (info & VECTOR_MASK) as u8,
            kind,
            error_code: (info & ERROR_CODE_VALID != 0).then_some(error_code),
        })
    }

    /// The EVENTINJ value. SVM has one type for all exceptions: INT3, INTO
    /// and INT1 are injected as exceptions (APM Vol. 2, 15.20).
    pub fn to_svm(self) -> u64 {
        let kind = match self.kind {
            EventKind::ExternalInterrupt => svm_type::INTR,
            EventKind::Nmi => svm_type::NMI,
            EventKind::HardwareException
            | EventKind::PrivilegedSoftwareException
            | EventKind::SoftwareException => svm_type::EXCEPTION,
            EventKind::SoftwareInterrupt => svm_type::SOFTWARE_INTERRUPT,
        };
        let mut raw = VALID | (kind << TYPE_SHIFT) | u64::from(self.vector);
        if let Some(code) = self.error_code {
            raw |= ERROR_CODE_VALID | (u64::from(code) << SVM_ERROR_CODE_SHIFT);
        }
        raw
    }

    /// Decodes EVENTINJ or EXITINTINFO; `None` if not valid or of a reserved
    /// type. Exceptions come back as [`EventKind::HardwareException`].
    pub fn from_svm(raw: u64) -> Option<Self> {
        if raw & VALID == 0 {
            return None;
        }
        let kind = match (raw >> TYPE_SHIFT) & TYPE_MASK {
            svm_type::INTR => EventKind::ExternalInterrupt,
            svm_type::NMI => EventKind::Nmi,
            svm_type::EXCEPTION => EventKind::HardwareException,
            svm_type::SOFTWARE_INTERRUPT => EventKind::SoftwareInterrupt,
            _ => return None,
        };
        Some(Self {
            vector: (raw & VECTOR_MASK) as u8,
            kind,
            error_code: (raw & ERROR_CODE_VALID != 0)
                .then_some((raw >> SVM_ERROR_CODE_SHIFT) as u32),
        })
    }
}

impl Event {
    /// The ABI's event to inject (`VcpuState::inject`). An unknown kind is
    /// taken as an external interrupt.
    pub fn from_abi(inject: &Inject) -> Self {
        let kind = match inject.kind {
            event_kind::NMI => EventKind::Nmi,
            event_kind::HARDWARE_EXCEPTION => EventKind::HardwareException,
            event_kind::SOFTWARE_INTERRUPT => EventKind::SoftwareInterrupt,
            _ => EventKind::ExternalInterrupt,
        };
        Self {
            vector: inject.vector,
            kind,
            error_code: (inject.has_error_code != 0).then_some(inject.error_code),
        }
    }

    /// The event in the ABI's form (an interrupted delivery the VMM sees).
    /// INT1/INT3/INTO become hardware exceptions: the ABI has no
    /// software-exception kind.
    pub fn to_abi(self) -> Inject {
        let kind = match self.kind {
            EventKind::ExternalInterrupt => event_kind::EXTERNAL_INTERRUPT,
            EventKind::Nmi => event_kind::NMI,
            EventKind::SoftwareInterrupt => event_kind::SOFTWARE_INTERRUPT,
            EventKind::HardwareException
            | EventKind::PrivilegedSoftwareException
            | EventKind::SoftwareException => event_kind::HARDWARE_EXCEPTION,
        };
        Inject {
            vector: self.vector,
            kind,
            has_error_code: u8::from(self.error_code.is_some()),
            reserved: 0,
            error_code: self.error_code.unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GP: Event = Event {
        vector: 13,
        kind: EventKind::HardwareException,
        error_code: Some(0x18),
    };
    const TIMER: Event = Event {
        vector: 0x20,
        kind: EventKind::ExternalInterrupt,
        error_code: None,
    };
    const NMI: Event = Event {
        vector: 2,
        kind: EventKind::Nmi,
        error_code: None,
    };

    #[test]
    fn vmx_encoding() {
        assert_eq!(GP.to_vmx(), (0x8000_0b0d, 0x18));
        assert_eq!(TIMER.to_vmx(), (0x8000_0020, 0));
        assert_eq!(NMI.to_vmx(), (0x8000_0202, 0));
        let int3 = Event {
            vector: 3,
            kind: EventKind::SoftwareException,
            error_code: None,
        };
        assert_eq!(int3.to_vmx().0, 0x8000_0603);
        for event in [GP, TIMER, NMI, int3] {
            let (info, code) = event.to_vmx();
            assert_eq!(Event::from_vmx(info, code), Some(event));
        }
        assert_eq!(Event::from_vmx(0x0000_0b0d, 0), None, "not valid");
        assert_eq!(Event::from_vmx(0x8000_0100, 0), None, "reserved type 1");
        assert_eq!(Event::from_vmx(0x8000_0700, 0), None, "other event");
    }

    #[test]
    fn svm_encoding() {
        assert_eq!(GP.to_svm(), 0x0000_0018_8000_0b0d);
        assert_eq!(TIMER.to_svm(), 0x8000_0020);
        assert_eq!(NMI.to_svm(), 0x8000_0202);
        let int80 = Event {
            vector: 0x80,
            kind: EventKind::SoftwareInterrupt,
            error_code: None,
        };
        assert_eq!(int80.to_svm(), 0x8000_0480);
        for event in [GP, TIMER, NMI, int80] {
            assert_eq!(Event::from_svm(event.to_svm()), Some(event));
        }
        let int3 = Event {
            vector: 3,
            kind: EventKind::SoftwareException,
            error_code: None,
        };
        assert_eq!(int3.to_svm(), 0x8000_0303);
        assert_eq!(Event::from_svm(0x0000_0303), None);
        assert_eq!(Event::from_svm(0x8000_0503), None);
    }

    #[test]
    fn abi_events_round_trip() {
        let gp = Inject {
            vector: 13,
            kind: event_kind::HARDWARE_EXCEPTION,
            has_error_code: 1,
            reserved: 0,
            error_code: 0x10,
        };
        let event = Event::from_abi(&gp);
        assert_eq!(event.to_vmx(), (0x8000_0b0d, 0x10));
        assert_eq!(event.to_abi(), gp);
        let timer = Inject {
            vector: 0x30,
            kind: event_kind::EXTERNAL_INTERRUPT,
            ..Inject::default()
        };
        assert_eq!(Event::from_abi(&timer).to_vmx(), (0x8000_0030, 0));
        let nmi = Inject {
            vector: 2,
            kind: event_kind::NMI,
            ..Inject::default()
        };
        assert_eq!(Event::from_abi(&nmi).to_vmx().0, 0x8000_0202);
        let int3 = Event {
            vector: 3,
            kind: EventKind::SoftwareException,
            error_code: None,
        };
        assert_eq!(int3.to_abi().kind, event_kind::HARDWARE_EXCEPTION);
    }
}
