//! Exception reports from components: what the root's exception handler
//! records (on the faulting component's SC, so it only stores a few words)
//! and how the main EC reads them.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use moat_abi::{ExceptionMessage, EXIT_VECTOR};

use crate::manifest::MAX_COMPONENTS;
use crate::registry::Instance;

/// How a component instance ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `exit(0)`.
    Finished,
    Exited(i64),
    Faulted {
        vector: u64,
        rip: u64,
        address: u64,
    },
}

impl Outcome {
    pub fn of(message: &ExceptionMessage) -> Outcome {
        match message.vector {
            EXIT_VECTOR if message.error_code == 0 => Outcome::Finished,
            EXIT_VECTOR => Outcome::Exited(message.error_code as i64),
            vector => Outcome::Faulted {
                vector,
                rip: message.rip,
                address: message.fault_address,
            },
        }
    }
}

/// `faulted: #PF at rip 0x…, address 0x…` / `exited with code N` / `finished`.
impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Outcome::Finished => write!(f, "finished"),
            Outcome::Exited(code) => write!(f, "exited with code {code}"),
            Outcome::Faulted {
                vector: PAGE_FAULT,
                rip,
                address,
            } => write!(f, "faulted: #PF at rip {rip:#x}, address {address:#x}"),
            Outcome::Faulted { vector, rip, .. } => {
                write!(f, "faulted: {} at rip {rip:#x}", Vector(vector))
            }
        }
    }
}

const PAGE_FAULT: u64 = 14;

/// A CPU exception vector by its mnemonic.
pub struct Vector(pub u64);

impl fmt::Display for Vector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 22] = [
            "#DE",
            "#DB",
            "NMI",
            "#BP",
            "#OF",
            "#BR",
            "#UD",
            "#NM",
            "#DF",
            "vector 9",
            "#TS",
            "#NP",
            "#SS",
            "#GP",
            "#PF",
            "vector 15",
            "#MF",
            "#AC",
            "#MC",
            "#XM",
            "#VE",
            "#CP",
        ];
        match NAMES.get(self.0 as usize) {
            Some(name) => f.write_str(name),
            None => write!(f, "vector {}", self.0),
        }
    }
}

/// One report per component, from the exception handler EC to the main
/// EC. The first report of an instance wins; later ones (from its other
/// ECs, before the main EC destroyed it) are dropped.
struct Slot {
    /// 0: empty; else the generation of the instance that reported.
    generation: AtomicU64,
    words: [AtomicU64; 6],
}

pub struct Mailbox {
    slots: [Slot; MAX_COMPONENTS],
}

impl Default for Mailbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Mailbox {
    pub const fn new() -> Self {
        Self {
            slots: [const {
                Slot {
                    generation: AtomicU64::new(0),
                    words: [const { AtomicU64::new(0) }; 6],
                }
            }; MAX_COMPONENTS],
        }
    }

    /// Exception handler (the one producer): records `message` for
    /// `instance` unless a report is pending. Returns whether it did.
    pub fn post(&self, instance: Instance, message: &ExceptionMessage) -> bool {
        let Some(slot) = self.slots.get(instance.index) else {
            return false;
        };
        if instance.generation == 0 || slot.generation.load(Ordering::Acquire) != 0 {
            return false;
        }
        for (cell, word) in slot.words.iter().zip(message.to_words()) {
            cell.store(word, Ordering::Relaxed);
        }
        slot.generation
            .store(instance.generation, Ordering::Release);
        true
    }

    /// Main EC (the one consumer): takes the report of component `index`.
    pub fn take(&self, index: usize) -> Option<(u64, ExceptionMessage)> {
        let slot = self.slots.get(index)?;
        let generation = slot.generation.load(Ordering::Acquire);
        if generation == 0 {
            return None;
        }
        let words = core::array::from_fn(|i| slot.words[i].load(Ordering::Relaxed));
        slot.generation.store(0, Ordering::Release);
        Some((generation, ExceptionMessage::from_words(words)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn message(vector: u64, error_code: u64) -> ExceptionMessage {
        ExceptionMessage {
            vector,
            error_code,
            rip: 0x201000,
            rsp: 0x7fff_dfff_f000,
            fault_address: 0x10,
            ec_id: 2,
        }
    }

    #[test]
    fn outcomes_read_as_the_root_prints_them() {
        assert_eq!(
            Outcome::of(&message(EXIT_VECTOR, 0)).to_string(),
            "finished"
        );
        assert_eq!(
            Outcome::of(&message(EXIT_VECTOR, -3i64 as u64)).to_string(),
            "exited with code -3"
        );
        assert_eq!(
            Outcome::of(&message(14, 6)).to_string(),
            "faulted: #PF at rip 0x201000, address 0x10"
        );
        assert_eq!(
            Outcome::of(&message(13, 0)).to_string(),
            "faulted: #GP at rip 0x201000"
        );
        assert_eq!(Vector(6).to_string(), "#UD");
        assert_eq!(Vector(32).to_string(), "vector 32");
    }

    #[test]
    fn first_report_wins_until_taken() {
        let mailbox = Mailbox::new();
        let instance = Instance {
            index: 5,
            generation: 2,
        };
        assert!(mailbox.post(instance, &message(14, 0)));
        assert!(!mailbox.post(instance, &message(EXIT_VECTOR, 1)));
        let (generation, taken) = mailbox.take(5).unwrap();
        assert_eq!((generation, taken.vector), (2, 14));
        assert_eq!(mailbox.take(5), None);
        assert!(mailbox.post(instance, &message(6, 0)));
        assert!(!mailbox.post(
            Instance {
                index: MAX_COMPONENTS,
                generation: 1
            },
            &message(6, 0)
        ));
        assert_eq!(mailbox.take(MAX_COMPONENTS), None);
    }
}
