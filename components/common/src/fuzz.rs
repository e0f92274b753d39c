//! The hostile component's call generator: seeded, reproducible, and
//! hostile in everything except destroying or hanging itself.
//!
//! Calls come in three mixes: fully random registers; random call numbers
//! with small selectors (0..64, where its real capabilities are); valid call
//! numbers with random arguments. Pointers are drawn from the fuzzer's own
//! image, stack and UTCB, a scratch window it delegates its pages into, the
//! kernel half, the unmapped low pages, non-canonical addresses and plain
//! random words.
//!
//! [`sanitize`] then removes exactly what would end the experiment rather
//! than test the kernel: `exit` and `reply` are never made; no call goes to
//! the root task's portals (selectors 1 and 2) and they are never copied
//! (calling the exception portal would report a fault); `revoke` with
//! `SELF` never names selectors 0..=2 or memory outside the scratch window;
//! new ECs get no exception portal and never start in mapped memory of the
//! fuzzer; `sm_down` never waits without a near deadline; `console_write`
//! never prints the fuzzer's own memory (its strings would fake test
//! output), only a buffer of noise.

use core::ops::Range;

use moat_abi::{flags, Call, CallWord, Space, UTCB_WORDS};

use crate::rng::Xorshift;

/// Where the fuzzer's memory is; the ranges are virtual addresses.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The loaded image: code, data, bss (with the heap).
    pub image: Range<u64>,
    pub stack: Range<u64>,
    pub utcb: Range<u64>,
    /// Unmapped at start; the fuzzer's own pages may be delegated here.
    pub scratch: Range<u64>,
    /// A buffer of harmless bytes that `console_write` may print.
    pub noise: Range<u64>,
}

/// Lowest non-user address: the user half ends at 2^47.
pub const USER_END: u64 = 1 << 47;
pub const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
/// The longest `sm_down` a fuzzed call may wait, in TSC ticks.
pub const MAX_WAIT_TICKS: u64 = 50_000;
/// Typed items a fuzzed IPC message carries at most.
pub const MAX_ITEMS: usize = 2;
/// Selectors of the root task's portals in every component.
const ROOT_PORTALS: Range<u64> = 1..3;

/// One fuzzed call, with the UTCB content that goes with an IPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Syscall {
    pub rax: u64,
    pub args: [u64; 6],
    /// UTCB `untyped` as claimed (may exceed what fits: the kernel must refuse).
    pub untyped: u64,
    /// UTCB `typed` as claimed; the first `items.len()` items are written.
    pub typed: u64,
    pub items: [[u64; 3]; MAX_ITEMS],
    /// UTCB receive windows: object base, count, memory base, count.
    pub recv: [u64; 4],
}

impl Syscall {
    pub fn word(&self) -> CallWord {
        CallWord::decode(self.rax)
    }

    /// How many payload words the fuzzer should write into its UTCB before
    /// the call: the claimed counts, cut to what the UTCB holds.
    pub fn words_to_write(&self) -> usize {
        (self.untyped as usize).min(UTCB_WORDS - 3 * MAX_ITEMS)
    }
}

pub struct Generator {
    rng: Xorshift,
    layout: Layout,
}

/// Calls the fuzzer makes with valid numbers: all but `exit` and `reply`,
/// which would end the fuzzer rather than exercise the kernel. Derived from
/// the ABI so new calls are fuzzed as soon as they exist.
fn fuzzable(call: Call) -> bool {
    !matches!(call, Call::Exit | Call::Reply)
}

fn valid_calls() -> impl Iterator<Item = Call> {
    Call::ALL.into_iter().filter(|&call| fuzzable(call))
}

impl Generator {
    pub fn new(seed: u64, layout: Layout) -> Self {
        Self {
            rng: Xorshift::new(seed),
            layout,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// A random word for the payload.
    pub fn word(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// The next call, already sanitized; `now` is the current TSC.
    pub fn next(&mut self, now: u64) -> Syscall {
        loop {
            let mut call = match self.rng.below(4) {
                0 => self.random_words(),
                1 => self.small_selectors(),
                _ => self.valid_call(),
            };
            let number = call.word().number;
            if number == Call::Exit.number() || number == Call::Reply.number() {
                continue;
            }
            sanitize(&mut call, &self.layout, now);
            return call;
        }
    }

    fn random_words(&mut self) -> Syscall {
        let mut call = Syscall::new(self.rng.next_u64());
        for arg in &mut call.args {
            *arg = self.rng.next_u64();
        }
        call.untyped = self.rng.next_u64();
        call.typed = self.rng.next_u64();
        call
    }

    fn small_selectors(&mut self) -> Syscall {
        let number = self.rng.below(20);
        let flags = self.rng.below(256);
        let rax = number | flags << 8 | self.rng.below(64) << 16;
        let mut call = Syscall::new(rax);
        for arg in &mut call.args {
            *arg = self.any_arg();
        }
        self.message(&mut call);
        call
    }

    fn valid_call(&mut self) -> Syscall {
        let count = valid_calls().count() as u64;
        let call_number = valid_calls()
            .nth(self.rng.below(count) as usize)
            .unwrap_or(Call::ConsoleWrite);
        let flags = match self.rng.below(4) {
            0 => self.rng.below(256) as u8,
            1 => self.rng.below(8) as u8,
            _ => 0,
        };
        let selector = self.selector();
        let mut call = Syscall::new(CallWord::new(call_number, flags, selector).encode());
        for arg in &mut call.args {
            *arg = self.any_arg();
        }
        match call_number {
            Call::ConsoleWrite => {
                call.args[0] = self.pointer();
                call.args[1] = self.length();
            }
            Call::CreateEc => {
                call.args[0] = self.selector();
                call.args[1] = self.pointer();
                call.args[2] = self.pointer();
                call.args[3] = self.pointer() & !0xfff;
            }
            Call::CreateSc => {
                call.args[0] = self.selector();
                call.args[1] = self.selector();
                call.args[2] = self.rng.below(70);
            }
            Call::CreatePd | Call::CreatePt | Call::CreateSm => {
                call.args[0] = self.selector();
            }
            Call::Delegate | Call::Revoke => {
                call.args[0] = self.rng.below(5);
                let memory = call.args[0] == Space::Memory as u64;
                for i in 1..3 {
                    call.args[i] = if memory {
                        self.pointer() >> 12
                    } else {
                        self.selector()
                    };
                }
                let count = self.count();
                if call_number == Call::Delegate {
                    call.args[3] = count;
                    call.args[4] = self.rng.below(256);
                } else {
                    call.args[2] = count;
                }
            }
            Call::Call => self.message(&mut call),
            _ => {}
        }
        call
    }
}

impl Syscall {
    fn new(rax: u64) -> Syscall {
        Syscall {
            rax,
            args: [0; 6],
            untyped: 0,
            typed: 0,
            items: [[0; 3]; MAX_ITEMS],
            recv: [0; 4],
        }
    }
}

impl Generator {
    /// UTCB content of an IPC: extra words, typed items, receive windows.
    fn message(&mut self, call: &mut Syscall) {
        call.untyped = match self.rng.below(8) {
            0 => self.rng.next_u64(),
            1 => self.rng.below(2 * UTCB_WORDS as u64),
            _ => self.rng.below(8),
        };
        call.typed = match self.rng.below(8) {
            0 => self.rng.below(1000),
            1..=3 => self.rng.below(MAX_ITEMS as u64 + 1),
            _ => 0,
        };
        for i in 0..MAX_ITEMS {
            let space = self.rng.below(5);
            let memory = space == Space::Memory as u64;
            let rights = self.rng.below(256);
            let head = space | rights << 8 | self.count() << 16;
            let (source, destination) = if memory {
                (self.pointer() >> 12, self.pointer() >> 12)
            } else {
                (self.selector(), self.selector())
            };
            call.items[i] = [head, source, destination];
        }
        call.recv = [
            self.selector(),
            self.count(),
            self.pointer() >> 12,
            self.count(),
        ];
    }

    fn selector(&mut self) -> u64 {
        match self.rng.below(8) {
            0..=4 => self.rng.below(64),
            5 => self.rng.below(1 << 16),
            6 => 4096 + self.rng.below(64),
            _ => self.rng.next_u64(),
        }
    }

    fn count(&mut self) -> u64 {
        match self.rng.below(8) {
            0 => 0,
            1 => self.rng.next_u64(),
            2 => 65_536 + self.rng.below(3),
            _ => 1 + self.rng.below(4),
        }
    }

    fn length(&mut self) -> u64 {
        match self.rng.below(4) {
            0 => self.rng.next_u64(),
            1 => 4096 + self.rng.below(3),
            _ => self.rng.below(64),
        }
    }

    fn pointer(&mut self) -> u64 {
        let l = &self.layout;
        let within = |rng: &mut Xorshift, r: &Range<u64>| r.start + rng.below(r.end - r.start);
        match self.rng.below(10) {
            0 => within(&mut self.rng, &l.image),
            1 => within(&mut self.rng, &l.stack),
            2 => within(&mut self.rng, &l.utcb),
            3 => within(&mut self.rng, &l.scratch),
            4 => KERNEL_HALF | self.rng.below(1 << 47),
            5 => self.rng.below(l.image.start.max(1)),
            6 => USER_END + self.rng.below(KERNEL_HALF - USER_END),
            7 => USER_END - 1 - self.rng.below(16),
            8 => self.rng.below(USER_END),
            _ => self.rng.next_u64(),
        }
    }

    fn any_arg(&mut self) -> u64 {
        match self.rng.below(6) {
            0 => self.selector(),
            1 => self.pointer(),
            2 => self.count(),
            3 => self.rng.below(256),
            _ => self.rng.next_u64(),
        }
    }
}

fn overlaps(a: Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// `count` things from `base` on, as a range (saturating).
fn span(base: u64, count: u64) -> Range<u64> {
    base..base.saturating_add(count.max(1))
}

fn pages(r: &Range<u64>) -> Range<u64> {
    r.start >> 12..r.end.div_ceil(4096)
}

impl Layout {
    /// Memory whose bytes are the fuzzer's own (or aliases of them).
    fn own(&self) -> [&Range<u64>; 4] {
        [&self.image, &self.stack, &self.utcb, &self.scratch]
    }

    /// A code address that surely does not run the fuzzer's own code.
    fn harmless_rip(&self, rip: u64) -> u64 {
        if rip < USER_END && rip >= self.image.start {
            rip % self.image.start.max(1)
        } else {
            rip
        }
    }
}

/// Makes `call` unable to destroy or hang the fuzzer (see the module doc).
pub fn sanitize(call: &mut Syscall, layout: &Layout, now: u64) {
    let mut word = call.word();
    let Ok(number) = Call::try_from(word.number) else {
        return;
    };
    let a = &mut call.args;
    match number {
        Call::ConsoleWrite => {
            let range = span(a[0], a[1]);
            if layout.own().iter().any(|r| overlaps(range.clone(), r)) {
                a[0] = layout.noise.start;
                a[1] %= layout.noise.end - layout.noise.start + 1;
            }
        }
        Call::Call => {
            if ROOT_PORTALS.contains(&word.selector) {
                word.selector += ROOT_PORTALS.end;
            }
            for item in &mut call.items {
                if item[0] & 0xff == Space::Object as u64
                    && overlaps(span(item[1], item[0] >> 16), &ROOT_PORTALS)
                {
                    item[1] = ROOT_PORTALS.end + (item[1] & 0x3f);
                    item[0] = item[0] & 0xffff | 1 << 16;
                }
            }
        }
        Call::CreateEc => {
            a[1] = layout.harmless_rip(a[1]);
            a[4] = u64::MAX;
        }
        Call::CreatePt => a[2] = layout.harmless_rip(a[2]),
        Call::SmDown if word.flags & flags::NONBLOCK == 0 => {
            let wait = 1 + a[0] % MAX_WAIT_TICKS;
            a[0] = if a[0].is_multiple_of(4) {
                now.wrapping_add(wait)
            } else {
                // Already past: the call must time out at once.
                now.saturating_sub(wait).max(1)
            };
        }
        Call::Delegate
            if a[0] == Space::Object as u64 && overlaps(span(a[1], a[3]), &ROOT_PORTALS) =>
        {
            a[1] = ROOT_PORTALS.end + (a[1] & 0x3f);
            a[3] = 1;
        }
        Call::Revoke if word.flags & flags::SELF != 0 => {
            let range = span(a[1], a[2]);
            let allowed = match Space::try_from(a[0]) {
                Ok(Space::Object) => range.start >= ROOT_PORTALS.end,
                Ok(Space::Memory) => {
                    let scratch = pages(&layout.scratch);
                    range.start >= scratch.start && range.end <= scratch.end
                }
                _ => true,
            };
            if !allowed {
                word.flags &= !flags::SELF;
            }
        }
        _ => {}
    }
    // `decode` kept all 48 selector bits, so this changes only what was changed.
    call.rax = word.encode();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            image: 0x20_0000..0x24_0000,
            stack: 0x7fff_dff0_0000..0x7fff_e000_0000,
            utcb: 0x7fff_f000_1000..0x7fff_f000_2000,
            scratch: 0x5000_0000_0000..0x5000_0004_0000,
            noise: 0x23_0000..0x23_0010,
        }
    }

    fn calls(seed: u64, n: usize) -> Vec<Syscall> {
        let mut g = Generator::new(seed, layout());
        (0..n).map(|i| g.next(1_000_000 + i as u64)).collect()
    }

    #[test]
    fn same_seed_same_calls() {
        assert_eq!(calls(7, 2000), calls(7, 2000));
        assert_ne!(calls(7, 100), calls(8, 100));
    }

    #[test]
    fn mixes_every_call_and_random_numbers() {
        let all = calls(1, 100_000);
        for call in Call::ALL {
            let n = all
                .iter()
                .filter(|c| c.word().number == call.number())
                .count();
            if call == Call::Exit || call == Call::Reply {
                assert_eq!(n, 0, "{call:?} made");
            } else {
                assert!(n > 1000, "{call:?} made only {n} times");
            }
        }
        let invalid = all
            .iter()
            .filter(|c| Call::try_from(c.word().number).is_err());
        assert!(invalid.count() > 10_000);
    }

    #[test]
    fn never_self_destructive() {
        let l = layout();
        let now = 1_000_000;
        for c in calls(3, 200_000) {
            let w = c.word();
            let Ok(number) = Call::try_from(w.number) else {
                continue;
            };
            match number {
                Call::Call => {
                    assert!(!ROOT_PORTALS.contains(&w.selector), "{c:?}");
                    for item in c.items {
                        if item[0] & 0xff == 0 {
                            assert!(!overlaps(span(item[1], item[0] >> 16), &ROOT_PORTALS));
                        }
                    }
                }
                Call::ConsoleWrite => {
                    let range = span(c.args[0], c.args[1]);
                    let own = l.own().iter().any(|r| overlaps(range.clone(), r));
                    assert!(!own || range.end <= l.noise.end + 1, "{c:?}");
                }
                Call::CreateEc => {
                    assert_eq!(c.args[4], u64::MAX);
                    assert!(!(l.image.start..USER_END).contains(&c.args[1]));
                }
                Call::CreatePt => assert!(!(l.image.start..USER_END).contains(&c.args[2])),
                Call::SmDown if w.flags & flags::NONBLOCK == 0 => {
                    assert!(c.args[0] != 0 && c.args[0] <= now + MAX_WAIT_TICKS + 200_000);
                }
                Call::Delegate if c.args[0] == 0 => {
                    assert!(!overlaps(span(c.args[1], c.args[3]), &ROOT_PORTALS));
                }
                Call::Revoke if w.flags & flags::SELF != 0 => {
                    let range = span(c.args[1], c.args[2]);
                    match c.args[0] {
                        0 => assert!(range.start >= 3),
                        1 => {
                            let s = pages(&l.scratch);
                            assert!(range.start >= s.start && range.end <= s.end);
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }

    #[test]
    fn hits_the_interesting_cases() {
        let all = calls(5, 100_000);
        let self_revokes = all
            .iter()
            .filter(|c| c.word().number == Call::Revoke.number())
            .filter(|c| c.word().flags & flags::SELF != 0 && c.args[0] == 1)
            .count();
        assert!(self_revokes > 0);
        let kernel_pointers = all
            .iter()
            .filter(|c| c.word().number == Call::ConsoleWrite.number())
            .filter(|c| c.args[0] >= KERNEL_HALF)
            .count();
        assert!(kernel_pointers > 100);
    }

    #[test]
    fn untouched_calls_keep_their_registers() {
        let mut g = Generator::new(9, layout());
        let untouched = [Call::CreatePd, Call::CreateSc, Call::CreateSm, Call::SmUp];
        for _ in 0..5000 {
            let call = g.random_words();
            let mut copy = call.clone();
            let number = Call::try_from(call.word().number);
            if number.is_err() || number.is_ok_and(|n| untouched.contains(&n)) {
                sanitize(&mut copy, &layout(), 1000);
                assert_eq!(copy, call);
            }
        }
    }
}
