//! Memory layouts shared by kernel and user space: the UTCB, typed items,
//! exception messages and the root task's boot information.

use crate::Space;

/// Payload words in a UTCB after its header.
pub const UTCB_WORDS: usize = 504;

/// The user thread control block: one page per EC, mapped in its PD at the
/// address given to `create_ec`, carrying what does not fit in registers.
#[repr(C)]
#[derive(Clone, Debug)]
pub struct Utcb {
    /// Message words beyond the six in registers: `words[..untyped]`.
    pub untyped: u64,
    /// Typed items after the untyped words: `words[untyped..untyped + 3 * typed]`.
    pub typed: u64,
    /// Where delegations that arrive by IPC may land in this PD: object
    /// selectors `recv_obj_base..recv_obj_base + recv_obj_count`.
    pub recv_obj_base: u64,
    pub recv_obj_count: u64,
    /// ... and memory pages `recv_mem_base..recv_mem_base + recv_mem_count`
    /// (page numbers).
    pub recv_mem_base: u64,
    pub recv_mem_count: u64,
    reserved: [u64; 2],
    pub words: [u64; UTCB_WORDS],
}

const _: () = assert!(core::mem::size_of::<Utcb>() == 4096);

impl Utcb {
    pub const fn new() -> Self {
        Self {
            untyped: 0,
            typed: 0,
            recv_obj_base: 0,
            recv_obj_count: 0,
            recv_mem_base: 0,
            recv_mem_count: 0,
            reserved: [0; 2],
            words: [0; UTCB_WORDS],
        }
    }
}

impl Default for Utcb {
    fn default() -> Self {
        Self::new()
    }
}

/// A delegation sent along with an IPC message: `count` capabilities of
/// `space` from the sender's `source` on, with at most `rights`, into the
/// receiver's `destination` on (inside the receiver's window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypedItem {
    pub space: Space,
    pub rights: u8,
    pub count: u64,
    pub source: u64,
    pub destination: u64,
}

/// Largest `count` of one typed item (48 bits).
pub const TYPED_COUNT_MAX: u64 = (1 << 48) - 1;

impl TypedItem {
    pub const WORDS: usize = 3;

    pub fn encode(&self) -> [u64; 3] {
        [
            self.space as u64 | (self.rights as u64) << 8 | (self.count & TYPED_COUNT_MAX) << 16,
            self.source,
            self.destination,
        ]
    }

    pub fn decode(words: [u64; 3]) -> Option<Self> {
        Some(Self {
            space: Space::try_from(words[0] & 0xff).ok()?,
            rights: (words[0] >> 8) as u8,
            count: words[0] >> 16,
            source: words[1],
            destination: words[2],
        })
    }
}

/// What an exception portal's handler receives in its six message
/// registers when an EC of a supervised PD faults or exits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExceptionMessage {
    /// CPU exception vector, or [`crate::EXIT_VECTOR`] for an `exit` call.
    pub vector: u64,
    /// The error code the CPU pushed, or the exit code.
    pub error_code: u64,
    pub rip: u64,
    pub rsp: u64,
    /// CR2 for a page fault.
    pub fault_address: u64,
    /// The selector of the faulting EC in the PD that created it, as given
    /// to `create_ec` (so one handler can serve several ECs).
    pub ec_id: u64,
}

impl ExceptionMessage {
    pub fn to_words(self) -> [u64; 6] {
        [
            self.vector,
            self.error_code,
            self.rip,
            self.rsp,
            self.fault_address,
            self.ec_id,
        ]
    }

    pub fn from_words(w: [u64; 6]) -> Self {
        Self {
            vector: w[0],
            error_code: w[1],
            rip: w[2],
            rsp: w[3],
            fault_address: w[4],
            ec_id: w[5],
        }
    }
}

/// What the exception handler's reply (word 0) asks for.
pub mod exception_reply {
    /// End the EC (default for anything else).
    pub const KILL: u64 = 0;
    /// Resume the EC where it faulted (after fixing the cause).
    pub const RESUME: u64 = 1;
}

/// One boot module as the root task sees it: mapped read-only at `address`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootModule {
    pub address: u64,
    pub size: u64,
    /// The module's name (base name of its file), NUL-padded.
    pub name: [u8; 32],
    /// The rest of its command line, NUL-padded.
    pub args: [u8; 128],
}

pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"MOATBOOT");
pub const BOOT_MODULES_MAX: usize = 16;

/// The page the kernel maps read-only into the root task at
/// [`crate::layout::BOOT_INFO`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    pub magic: u64,
    pub tsc_hz: u64,
    /// Memory for the root task to hand out: mapped read-write at
    /// `pool_address`, `pool_size` bytes, the root holding memory
    /// capabilities for every page of it.
    pub pool_address: u64,
    pub pool_size: u64,
    /// The root PD's kernel-memory quota in bytes.
    pub kernel_quota: u64,
    /// PCI Express configuration space (ECAM, from the ACPI MCFG table),
    /// segment 0: its physical base and the last bus it covers; base 0
    /// when the machine has none (then configuration space is reached
    /// through ports 0xcf8/0xcfc only).
    pub ecam_base: u64,
    pub ecam_bus_end: u64,
    pub module_count: u64,
    pub modules: [BootModule; BOOT_MODULES_MAX],
}

const _: () = assert!(core::mem::size_of::<BootInfo>() <= 4096);

fn nul_terminated(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..end]).unwrap_or("")
}

impl BootModule {
    pub fn name(&self) -> &str {
        nul_terminated(&self.name)
    }

    pub fn args(&self) -> &str {
        nul_terminated(&self.args)
    }
}

impl BootInfo {
    pub fn modules(&self) -> &[BootModule] {
        let count = (self.module_count as usize).min(BOOT_MODULES_MAX);
        &self.modules[..count]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_items_round_trip() {
        let item = TypedItem {
            space: Space::Memory,
            rights: 0b101,
            count: 12,
            source: 0x400,
            destination: 0x800,
        };
        assert_eq!(TypedItem::decode(item.encode()), Some(item));
        assert_eq!(TypedItem::decode([9, 0, 0]), None);
    }

    #[test]
    fn exception_messages_round_trip() {
        let m = ExceptionMessage {
            vector: 14,
            error_code: 6,
            rip: 1,
            rsp: 2,
            fault_address: 3,
            ec_id: 4,
        };
        assert_eq!(ExceptionMessage::from_words(m.to_words()), m);
    }

    #[test]
    fn module_names_stop_at_nul() {
        let mut module = BootModule {
            address: 0,
            size: 0,
            name: [0; 32],
            args: [0; 128],
        };
        module.name[..4].copy_from_slice(b"ping");
        module.args[..5].copy_from_slice(b"a b c");
        assert_eq!(module.name(), "ping");
        assert_eq!(module.args(), "a b c");
    }
}
