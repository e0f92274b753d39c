//! Junk instructions aimed at MMIO: random prefixes, an opcode (half the
//! time one the VMM's emulator handles, else any byte), a ModRM byte whose
//! memory operand goes through a register holding a device address, and
//! random bytes after it. The executor runs them in user mode (CPL 3,
//! where nothing they do reaches the guest's own state) with the
//! registers set; what faults is caught and counted.
//!
//! Opcodes that jump are left out, so the bytes cannot loop for ever, and
//! the count register is kept small, so a `rep` prefix cannot run for
//! millions of MMIO exits.

use crate::pci::Region;
use crate::Xorshift;

pub const CODE_LEN: usize = 16;

/// Bytes to run and the general registers to run them with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Junk {
    pub code: [u8; CODE_LEN],
    /// rax, rbx, rcx, rdx, rsi, rdi.
    pub regs: [u64; 6],
}

const PREFIXES: [u8; 15] = [
    0x66, 0x67, 0xf2, 0xf3, 0xf0, 0x2e, 0x3e, 0x26, 0x64, 0x65, 0x36, 0x48, 0x41, 0x44, 0x4f,
];

/// Opcodes with a memory operand the emulator decodes (mov, movzx/movsx,
/// arithmetic, test, xchg, string moves and stores), one or two bytes.
const EMULATED: [&[u8]; 26] = [
    &[0x88],
    &[0x89],
    &[0x8a],
    &[0x8b],
    &[0xc6],
    &[0xc7],
    &[0x0f, 0xb6],
    &[0x0f, 0xb7],
    &[0x0f, 0xbe],
    &[0x0f, 0xbf],
    &[0x01],
    &[0x03],
    &[0x09],
    &[0x0b],
    &[0x21],
    &[0x23],
    &[0x29],
    &[0x31],
    &[0x39],
    &[0x3b],
    &[0x84],
    &[0x85],
    &[0x86],
    &[0x87],
    &[0xa5],
    &[0xab],
];

/// Bytes that, read as an opcode, transfer control (short and near jumps
/// and calls, conditional jumps, loops, returns, far forms, `ff` /2-/5)
/// or wait (`hlt`), and `0f` (whose second byte could be a jump). None of
/// them appears anywhere but as the chosen opcode, so wherever decoding
/// starts inside the bytes, nothing jumps.
fn jumps(op: u8) -> bool {
    matches!(
        op,
        0x70..=0x7f | 0xe0..=0xe3 | 0xe8..=0xeb | 0xc2 | 0xc3 | 0xca | 0xcb | 0xcf | 0x9a | 0xff | 0xf4 | 0x0f
    )
}

/// Prefixes of long mode (legacy and REX): not taken as the opcode.
fn prefix(b: u8) -> bool {
    matches!(b, 0x26 | 0x2e | 0x36 | 0x3e | 0x40..=0x4f | 0x64..=0x67 | 0xf0 | 0xf2 | 0xf3)
}

/// Second bytes of `0f` left out: conditional jumps, and SYSCALL, SYSRET,
/// SYSENTER, SYSEXIT (whose targets come from MSRs the plan randomises).
fn bad_second(b: u8) -> bool {
    matches!(b, 0x80..=0x8f | 0x05 | 0x07 | 0x34 | 0x35)
}

/// A random byte that is not in [`jumps`].
fn safe_byte(rng: &mut Xorshift) -> u8 {
    loop {
        let b = rng.next_u64() as u8;
        if !jumps(b) {
            return b;
        }
    }
}

/// A device address for a register: inside one of `targets`, mostly near
/// its start.
fn aim(rng: &mut Xorshift, targets: &[Region]) -> u64 {
    let Some(len) = u64::try_from(targets.len()).ok().filter(|&n| n > 0) else {
        return crate::LAPIC;
    };
    let r = targets[rng.below(len) as usize];
    let span = r.len.clamp(1, 0x1000);
    r.base + (rng.below(span) & !3)
}

pub fn generate(rng: &mut Xorshift, targets: &[Region]) -> Junk {
    let mut junk = Junk::default();
    let mut code = [0u8; CODE_LEN];
    let mut at = 0;
    for _ in 0..rng.below(4) {
        code[at] = PREFIXES[rng.below(PREFIXES.len() as u64) as usize];
        at += 1;
    }
    if rng.one_in(2) {
        for &b in EMULATED[rng.below(EMULATED.len() as u64) as usize] {
            code[at] = b;
            at += 1;
        }
    } else {
        let op = loop {
            let op = rng.next_u64() as u8;
            if op == 0x0f || (!jumps(op) && !prefix(op)) {
                break op;
            }
        };
        code[at] = op;
        at += 1;
        if op == 0x0f {
            code[at] = loop {
                let b = safe_byte(rng);
                if !bad_second(b) {
                    break b;
                }
            };
            at += 1;
        }
    }
    // ModRM: a memory operand through a register (mod 00/01/10, no
    // SIB/RIP forms half the time), then random displacement/immediate.
    code[at] = loop {
        let modrm = safe_byte(rng);
        let modrm = if rng.one_in(2) {
            (modrm & 0b0011_1000)
                | (rng.below(3) as u8) << 6
                | [0, 1, 2, 3, 6, 7][rng.below(6) as usize]
        } else {
            modrm
        };
        if !jumps(modrm) {
            break modrm;
        }
    };
    at += 1;
    while at < CODE_LEN {
        code[at] = safe_byte(rng);
        at += 1;
    }
    junk.code = code;
    for reg in junk.regs.iter_mut() {
        *reg = match rng.below(8) {
            0 => rng.next_u64(),
            1 => rng.below(16),
            _ => aim(rng, targets),
        };
    }
    // rcx: a small count for `rep` and shifts.
    junk.regs[2] = rng.below(8);
    junk
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junk_has_no_jump_opcode_after_its_prefixes_and_a_small_count() {
        let targets = [Region {
            base: 0xfee0_0000,
            len: 0x1000,
        }];
        let mut rng = Xorshift::new(1);
        let mut aimed = 0;
        for _ in 0..10_000 {
            let j = generate(&mut rng, &targets);
            let first = j.code.iter().position(|b| !PREFIXES.contains(b)).unwrap();
            let op = j.code[first];
            if op == 0x0f {
                assert!(!bad_second(j.code[first + 1]) && !jumps(j.code[first + 1]));
            }
            // No jump opcode anywhere after the opcode.
            assert!(
                j.code[first + 1..].iter().all(|&b| !jumps(b)),
                "{:02x?}",
                j.code
            );
            assert!(op == 0x0f || !jumps(op), "{:02x?}", j.code);
            assert!(j.regs[2] < 8);
            aimed += j
                .regs
                .iter()
                .filter(|&&r| (0xfee0_0000..0xfee0_1000).contains(&r))
                .count();
        }
        assert!(aimed > 20_000, "{aimed}");
    }
}
