//! TLB tags of vCPUs: VPIDs (Intel) or ASIDs (AMD). Each CPU has its own
//! space (its TLB is its own); tag 0 is the host's. A tag goes back to its
//! space when its vCPU is destroyed and is handed out again: the backends
//! flush a new vCPU's tag at its first entry (INVVPID single context, or an
//! SVM flush), so what the last owner left in the TLB is gone before the
//! new one runs. The highest tag is what the CPU supports: 65,535 VPIDs, or
//! one less than the ASIDs CPUID reports (QEMU: 16; KVM's nested SVM: 8).

use alloc::vec::Vec;

#[derive(Debug)]
pub struct TagSpace {
    /// The highest tag handed out (0: none can be).
    limit: u16,
    /// The lowest tag never handed out.
    next: u32,
    /// Tags given back, handed out again first.
    free: Vec<u16>,
}

impl TagSpace {
    pub const fn new(limit: u16) -> Self {
        Self {
            limit,
            next: 1,
            free: Vec::new(),
        }
    }

    /// A tag no live vCPU of this CPU has; `None` when all are in use.
    pub fn alloc(&mut self) -> Option<u16> {
        if let Some(tag) = self.free.pop() {
            return Some(tag);
        }
        let tag = u16::try_from(self.next).ok().filter(|&t| t <= self.limit)?;
        self.next += 1;
        Some(tag)
    }

    /// Gives `tag` back. Tags this space never handed out, and a tag given
    /// back twice, are ignored; `false` then.
    pub fn release(&mut self, tag: u16) -> bool {
        if tag == 0 || u32::from(tag) >= self.next || self.free.contains(&tag) {
            return false;
        }
        if self.free.try_reserve(1).is_err() {
            // Lost for good rather than handed out twice.
            return false;
        }
        self.free.push(tag);
        true
    }

    /// Tags in use.
    pub fn in_use(&self) -> usize {
        (self.next as usize - 1) - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_start_at_one_and_stop_at_the_limit() {
        let mut space = TagSpace::new(3);
        assert_eq!(space.alloc(), Some(1));
        assert_eq!(space.alloc(), Some(2));
        assert_eq!(space.alloc(), Some(3));
        assert_eq!(space.alloc(), None);
        assert_eq!(space.in_use(), 3);
        let mut none = TagSpace::new(0);
        assert_eq!(none.alloc(), None);
    }

    #[test]
    fn released_tags_come_back_and_only_once() {
        let mut space = TagSpace::new(2);
        let (a, b) = (space.alloc().unwrap(), space.alloc().unwrap());
        assert!(space.release(a));
        assert!(!space.release(a), "a double release is refused");
        assert!(!space.release(0), "the host's tag is not a vCPU's");
        assert!(!space.release(7), "never handed out");
        assert_eq!(space.alloc(), Some(a));
        assert_eq!(space.alloc(), None);
        assert!(space.release(b));
        assert_eq!(space.in_use(), 1);
    }

    #[test]
    fn a_long_run_of_creations_stays_inside_a_small_space() {
        // QEMU's 16 ASIDs: tags 1..=15, however many vCPUs come and go.
        let mut space = TagSpace::new(15);
        let mut live = Vec::new();
        for round in 0..10_000u32 {
            if live.len() < 10 {
                let tag = space.alloc().expect("a free tag");
                assert!((1..=15).contains(&tag));
                assert!(!live.contains(&tag), "round {round}: tag {tag} twice");
                live.push(tag);
            } else {
                let tag = live.remove((round as usize * 7) % live.len());
                assert!(space.release(tag));
            }
        }
        assert_eq!(space.in_use(), live.len());
    }
}
