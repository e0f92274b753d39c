use super::*;
use crate::cpu::{access, efer, Gpr};
use crate::paging::{pf, pte};
use crate::testutil::{cpu_in, CpuMode, FakePlatform, Mmio, PageTables, Paging, Rng};

const RAM: usize = 0x40_0000;
const TABLES: u64 = 0x30_0000;
const CODE: u64 = 0x1000;
/// Guest RAM for the RAM side of string instructions.
const DATA: u64 = 0x8000;
const MMIO: u64 = 0xfee0_0000;
/// The fake's MMIO hole below 1 MiB, reachable from real mode.
const VGA: u64 = 0xa_0000;

struct Vm {
    platform: FakePlatform,
    cpu: CpuState,
}

impl Vm {
    /// A vCPU in `mode`, with the first 4 GiB identity-mapped if `paging`.
    fn new(mode: CpuMode, paging: Option<Paging>) -> Self {
        Self::identity_mapped(mode, paging).0
    }

    fn identity_mapped(mode: CpuMode, paging: Option<Paging>) -> (Self, Option<PageTables>) {
        let mut platform = FakePlatform::new(RAM);
        let mut cpu = cpu_in(mode);
        let tables = paging.map(|paging| {
            let mut tables = PageTables::new(&mut platform, paging, TABLES);
            tables.identity_4g(&mut platform, pte::RW);
            tables.enable(&mut cpu);
            tables
        });
        cpu.rip = CODE;
        (Self { platform, cpu }, tables)
    }

    fn long() -> Self {
        Self::new(CpuMode::Long, Some(Paging::Long4))
    }

    /// Long mode with only what the test maps (4 KiB pages).
    fn long_with_tables() -> (Self, PageTables) {
        let mut vm = Self::new(CpuMode::Long, None);
        let tables = PageTables::new(&mut vm.platform, Paging::Long4, TABLES);
        tables.enable(&mut vm.cpu);
        (vm, tables)
    }

    fn set(&mut self, reg: Gpr, value: u64) -> &mut Self {
        self.cpu.set_gpr(reg, value);
        self
    }

    fn get(&self, reg: Gpr) -> u64 {
        self.cpu.gpr(reg)
    }

    fn reads(&mut self, values: &[u64]) -> &mut Self {
        self.platform.reads.extend(values);
        self
    }

    /// Place `code` at CS:RIP (identity-mapped or unpaged) and emulate it.
    fn run(&mut self, code: &[u8], exit_gpa: u64) -> Outcome {
        if !code.is_empty() {
            let at = self.cpu.cs.base + self.cpu.rip;
            self.platform.poke(at, code);
        }
        emulate(&mut self.platform, &mut self.cpu, exit_gpa)
    }

    /// Emulate `code`, expect `Done` and RIP past it; return the bus log.
    fn done(&mut self, code: &[u8], exit_gpa: u64) -> Vec<Mmio> {
        self.platform.log.clear();
        let rip = self.cpu.rip;
        assert_eq!(self.run(code, exit_gpa), Outcome::Done, "{code:02x?}");
        assert_eq!(self.cpu.rip, rip + code.len() as u64, "{code:02x?}");
        core::mem::take(&mut self.platform.log)
    }

    fn status(&self) -> u64 {
        self.cpu.rflags & rflags::STATUS
    }
}

fn write(gpa: u64, len: usize, value: u64) -> Mmio {
    Mmio::Write { gpa, len, value }
}

fn read(gpa: u64, len: usize, value: u64) -> Mmio {
    Mmio::Read { gpa, len, value }
}

use rflags::{AF, CF, OF, PF, SF, ZF};

/// (code, width, device value, RBX, value written back if any, status flags after)
type AluCase = (&'static [u8], usize, u64, u64, Option<u64>, u64);

#[test]
fn mov_register_to_memory_every_width() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, MMIO + 0x10)
        .set(Gpr::Rbx, 0x1122_3344_5566_7788);
    vm.set(Gpr::R8, 0xa1a2_a3a4_a5a6_a7a8).set(Gpr::Rsi, 0x5e);
    let cases: [(&[u8], usize, u64); 7] = [
        (&[0x88, 0x18], 1, 0x88),                        // mov [rax], bl
        (&[0x66, 0x89, 0x18], 2, 0x7788),                // mov [rax], bx
        (&[0x89, 0x18], 4, 0x5566_7788),                 // mov [rax], ebx
        (&[0x48, 0x89, 0x18], 8, 0x1122_3344_5566_7788), // mov [rax], rbx
        (&[0x4c, 0x89, 0x00], 8, 0xa1a2_a3a4_a5a6_a7a8), // mov [rax], r8
        (&[0x44, 0x88, 0x00], 1, 0xa8),                  // mov [rax], r8b
        (&[0x40, 0x88, 0x30], 1, 0x5e),                  // mov [rax], sil
    ];
    for (code, len, value) in cases {
        assert_eq!(vm.done(code, MMIO + 0x10), [write(MMIO + 0x10, len, value)]);
    }
}

#[test]
fn mov_memory_to_register_every_width() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, MMIO);
    let cases: [(&[u8], usize, u64, u64); 4] = [
        (&[0x8a, 0x18], 1, 0x12, 0xffff_ffff_ffff_ff12), // mov bl, [rax]
        (&[0x66, 0x8b, 0x18], 2, 0x1234, 0xffff_ffff_ffff_1234), // mov bx, [rax]
        (&[0x8b, 0x18], 4, 0x1234_5678, 0x1234_5678),    // mov ebx, [rax]: zero-extends
        (
            &[0x48, 0x8b, 0x18],
            8,
            0x0102_0304_0506_0708,
            0x0102_0304_0506_0708,
        ),
    ];
    for (code, len, value, rbx) in cases {
        vm.set(Gpr::Rbx, u64::MAX).reads(&[value]);
        assert_eq!(vm.done(code, MMIO), [read(MMIO, len, value)]);
        assert_eq!(vm.get(Gpr::Rbx), rbx, "{code:02x?}");
    }
}

#[test]
fn high_byte_registers() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, MMIO).set(Gpr::Rbx, 0xaabb);
    assert_eq!(vm.done(&[0x88, 0x38], MMIO), [write(MMIO, 1, 0xaa)]); // mov [rax], bh

    vm.set(Gpr::Rbx, MMIO + 4)
        .set(Gpr::Rax, 0x1111_2222_3333_4444)
        .reads(&[0x99]);
    assert_eq!(vm.done(&[0x8a, 0x23], MMIO + 4), [read(MMIO + 4, 1, 0x99)]); // mov ah, [rbx]
    assert_eq!(vm.get(Gpr::Rax), 0x1111_2222_3333_9944);

    vm.set(Gpr::Rcx, 0xf000).reads(&[0x3c]);
    let log = vm.done(&[0x20, 0x2b], MMIO + 4); // and [rbx], ch
    assert_eq!(log, [read(MMIO + 4, 1, 0x3c), write(MMIO + 4, 1, 0x30)]);

    vm.set(Gpr::Rax, MMIO).set(Gpr::Rbx, 0x7700).reads(&[0x55]);
    let log = vm.done(&[0x86, 0x38], MMIO); // xchg [rax], bh
    assert_eq!(log, [read(MMIO, 1, 0x55), write(MMIO, 1, 0x77)]);
    assert_eq!(vm.get(Gpr::Rbx), 0x5500);
}

#[test]
fn mov_immediate_to_memory() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, MMIO);
    let cases: [(&[u8], usize, u64); 4] = [
        (&[0xc6, 0x00, 0x12], 1, 0x12),
        (&[0x66, 0xc7, 0x00, 0x34, 0x12], 2, 0x1234),
        (&[0xc7, 0x00, 0x78, 0x56, 0x34, 0x12], 4, 0x1234_5678),
        // The imm32 is sign-extended to 64 bits.
        (
            &[0x48, 0xc7, 0x00, 0xf0, 0xff, 0xff, 0xff],
            8,
            0xffff_ffff_ffff_fff0,
        ),
    ];
    for (code, len, value) in cases {
        assert_eq!(vm.done(code, MMIO), [write(MMIO, len, value)]);
    }
}

#[test]
fn mov_moffs_forms() {
    let mut vm = Vm::long();
    let addr = (MMIO + 0x20).to_le_bytes();
    let with = |opcode: &[u8]| [opcode, &addr[..]].concat();
    vm.set(Gpr::Rax, 0x1122_3344_5566_7788);
    assert_eq!(
        vm.done(&with(&[0x48, 0xa3]), MMIO + 0x20),
        [write(MMIO + 0x20, 8, 0x1122_3344_5566_7788)]
    );
    assert_eq!(
        vm.done(&with(&[0xa2]), MMIO + 0x20),
        [write(MMIO + 0x20, 1, 0x88)]
    );
    vm.reads(&[0xcafe_f00d]);
    assert_eq!(
        vm.done(&with(&[0xa1]), MMIO + 0x20),
        [read(MMIO + 0x20, 4, 0xcafe_f00d)]
    );
    assert_eq!(vm.get(Gpr::Rax), 0xcafe_f00d);
    vm.reads(&[0xbeef]);
    assert_eq!(
        vm.done(&with(&[0x66, 0xa1]), MMIO + 0x20),
        [read(MMIO + 0x20, 2, 0xbeef)]
    );
    assert_eq!(vm.get(Gpr::Rax), 0xcafe_beef);

    // 32-bit mode: a 4-byte offset.
    let mut vm = Vm::new(CpuMode::Protected32, None);
    vm.reads(&[7]);
    assert_eq!(
        vm.done(&[0xa1, 0x00, 0x00, 0xe0, 0xfe], MMIO),
        [read(MMIO, 4, 7)]
    );
    assert_eq!(vm.get(Gpr::Rax), 7);
}

#[test]
fn movzx_movsx_movsxd() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rbx, MMIO);
    let cases: [(&[u8], usize, u64, u64); 7] = [
        (&[0x0f, 0xb6, 0x03], 1, 0x80, 0x80), // movzx eax, byte [rbx]
        (&[0x48, 0x0f, 0xb6, 0x03], 1, 0xff, 0xff), // movzx rax, byte [rbx]
        (&[0x0f, 0xb7, 0x03], 2, 0x8000, 0x8000), // movzx eax, word [rbx]
        (&[0x48, 0x0f, 0xbe, 0x03], 1, 0x80, 0xffff_ffff_ffff_ff80), // movsx rax, byte [rbx]
        (&[0x0f, 0xbf, 0x03], 2, 0x8000, 0xffff_8000), // movsx eax, word [rbx]
        (&[0x66, 0x0f, 0xbe, 0x03], 1, 0x80, 0x1111_2222_3333_ff80), // movsx ax, byte [rbx]
        (&[0x48, 0x63, 0x03], 4, 0x8000_0000, 0xffff_ffff_8000_0000), // movsxd rax, dword [rbx]
    ];
    for (code, len, value, rax) in cases {
        vm.set(Gpr::Rax, 0x1111_2222_3333_4444).reads(&[value]);
        assert_eq!(vm.done(code, MMIO), [read(MMIO, len, value)]);
        assert_eq!(vm.get(Gpr::Rax), rax, "{code:02x?}");
    }
}

#[test]
fn logic_operations_read_modify_write_and_set_flags() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, MMIO);
    let cases: [AluCase; 8] = [
        (
            &[0x21, 0x18],
            4,
            0xf0f0_f0f0,
            0x0ff0_0000,
            Some(0x00f0_0000),
            PF,
        ), // and [rax], ebx
        (&[0x09, 0x18], 4, 0x8000_0000, 1, Some(0x8000_0001), SF), // or [rax], ebx
        (&[0x80, 0x30, 0xff], 1, 0xff, 0, Some(0), ZF | PF),       // xor byte [rax], 0xff
        (&[0x83, 0x08, 0x01], 4, 0x10, 0, Some(0x11), PF),         // or dword [rax], 1
        (
            &[0x81, 0x20, 0xff, 0x00, 0xff, 0x00],
            4,
            0x1234_5678,
            0,
            Some(0x0034_0078),
            PF,
        ),
        (
            &[0x48, 0x83, 0x20, 0xf0],
            8,
            0x9234_5678_9abc_def7,
            0,
            Some(0x9234_5678_9abc_def0),
            SF | PF,
        ),
        (&[0x66, 0x31, 0x18], 2, 0x00ff, 0x0f0f, Some(0x0ff0), PF), // xor [rax], bx
        (&[0x30, 0x18], 1, 0x01, 0x03, Some(0x02), 0),              // xor [rax], bl
    ];
    for (code, width, value, rbx, result, flags) in cases {
        vm.set(Gpr::Rbx, rbx).reads(&[value]);
        vm.cpu.rflags |= CF | OF | AF;
        let mut expected = vec![read(MMIO, width, value)];
        expected.extend(result.map(|r| write(MMIO, width, r)));
        assert_eq!(vm.done(code, MMIO), expected, "{code:02x?}");
        assert_eq!(vm.status(), flags, "{code:02x?}");
    }
}

#[test]
fn test_sets_flags_without_writing() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, MMIO);
    let cases: [(&[u8], usize, u64, u64, u64); 4] = [
        (&[0x85, 0x18], 4, 0x0000_ff00, 0x0000_0f00, PF), // test [rax], ebx
        (&[0xf6, 0x00, 0x80], 1, 0x80, 0, SF),            // test byte [rax], 0x80
        (
            &[0xf7, 0x00, 0x00, 0x00, 0x00, 0x80],
            4,
            0x7fff_ffff,
            0,
            ZF | PF,
        ),
        (&[0x48, 0x85, 0x18], 8, 1 << 63, 1 << 63, SF | PF), // test [rax], rbx
    ];
    for (code, width, value, rbx, flags) in cases {
        vm.set(Gpr::Rbx, rbx).reads(&[value]);
        vm.cpu.rflags |= CF | OF;
        assert_eq!(
            vm.done(code, MMIO),
            [read(MMIO, width, value)],
            "{code:02x?}"
        );
        assert_eq!(vm.status(), flags, "{code:02x?}");
    }
}

#[test]
fn register_destination_forms_leave_the_device_alone() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, MMIO);
    vm.set(Gpr::Rbx, 0xffff_ffff_0000_ff0f).reads(&[0xf0f0]);
    assert_eq!(vm.done(&[0x23, 0x18], MMIO), [read(MMIO, 4, 0xf0f0)]); // and ebx, [rax]
    assert_eq!(vm.get(Gpr::Rbx), 0xf000);

    vm.set(Gpr::Rbx, 10).reads(&[3]);
    assert_eq!(vm.done(&[0x2b, 0x18], MMIO), [read(MMIO, 4, 3)]); // sub ebx, [rax]
    assert_eq!(vm.get(Gpr::Rbx), 7);

    vm.set(Gpr::Rbx, 3).reads(&[3]);
    assert_eq!(vm.done(&[0x3b, 0x18], MMIO), [read(MMIO, 4, 3)]); // cmp ebx, [rax]
    assert_eq!((vm.get(Gpr::Rbx), vm.status()), (3, ZF | PF));
}

#[test]
fn add_sub_cmp_flags() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, MMIO);
    let cases: [AluCase; 8] = [
        (&[0x01, 0x18], 4, 0x0f, 0x01, Some(0x10), AF), // a nibble carry
        (&[0x01, 0x18], 4, 0x10, 0x10, Some(0x20), 0),
        (&[0x01, 0x18], 4, 0xffff_ffff, 1, Some(0), CF | ZF | AF | PF), // add [rax], ebx
        (
            &[0x83, 0x00, 0x01],
            4,
            0x7fff_ffff,
            0,
            Some(0x8000_0000),
            OF | SF | AF | PF,
        ),
        (&[0x29, 0x18], 4, 0, 1, Some(0xffff_ffff), CF | SF | AF | PF), // sub [rax], ebx
        (&[0x83, 0x38, 0x05], 4, 5, 0, None, ZF | PF),                  // cmp dword [rax], 5
        (&[0x80, 0x38, 0x01], 1, 0x80, 0, None, OF | AF),               // cmp byte [rax], 1
        (&[0x48, 0x01, 0x18], 8, u64::MAX, 2, Some(1), CF | AF),        // add [rax], rbx
    ];
    for (code, width, value, rbx, result, flags) in cases {
        vm.set(Gpr::Rbx, rbx).reads(&[value]);
        let mut expected = vec![read(MMIO, width, value)];
        expected.extend(result.map(|r| write(MMIO, width, r)));
        assert_eq!(vm.done(code, MMIO), expected, "{code:02x?}");
        assert_eq!(vm.status(), flags, "{code:02x?}");
    }
}

#[test]
fn xchg_swaps_register_and_device() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, MMIO)
        .set(Gpr::Rbx, 0xffff_ffff_dead_beef)
        .reads(&[0x1234]);
    let log = vm.done(&[0x87, 0x18], MMIO); // xchg [rax], ebx
    assert_eq!(log, [read(MMIO, 4, 0x1234), write(MMIO, 4, 0xdead_beef)]);
    assert_eq!(vm.get(Gpr::Rbx), 0x1234);
}

#[test]
fn stos_every_width_and_direction() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, 0x1122_3344_5566_7788);
    let cases: [(&[u8], usize, u64); 4] = [
        (&[0xaa], 1, 0x88),
        (&[0x66, 0xab], 2, 0x7788),
        (&[0xab], 4, 0x5566_7788),
        (&[0x48, 0xab], 8, 0x1122_3344_5566_7788),
    ];
    for (code, width, value) in cases {
        vm.set(Gpr::Rdi, MMIO).set(Gpr::Rcx, 99);
        vm.cpu.rflags &= !rflags::DF;
        assert_eq!(vm.done(code, MMIO), [write(MMIO, width, value)]);
        assert_eq!(
            (vm.get(Gpr::Rdi), vm.get(Gpr::Rcx)),
            (MMIO + width as u64, 99)
        );
        vm.set(Gpr::Rdi, MMIO);
        vm.cpu.rflags |= rflags::DF;
        assert_eq!(vm.done(code, MMIO), [write(MMIO, width, value)]);
        assert_eq!(vm.get(Gpr::Rdi), MMIO - width as u64);
    }
}

#[test]
fn rep_stos_counts_rcx_down() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, 7).set(Gpr::Rdi, MMIO).set(Gpr::Rcx, 3);
    let log = vm.done(&[0xf3, 0x48, 0xab], MMIO); // rep stosq
    assert_eq!(
        log,
        [
            write(MMIO, 8, 7),
            write(MMIO + 8, 8, 7),
            write(MMIO + 16, 8, 7)
        ]
    );
    assert_eq!((vm.get(Gpr::Rdi), vm.get(Gpr::Rcx)), (MMIO + 24, 0));

    vm.set(Gpr::Rdi, MMIO).set(Gpr::Rcx, 2);
    vm.cpu.rflags |= rflags::DF;
    let log = vm.done(&[0xf3, 0xab], MMIO); // rep stosd, downwards
    assert_eq!(log, [write(MMIO, 4, 7), write(MMIO - 4, 4, 7)]);
    assert_eq!(vm.get(Gpr::Rdi), MMIO - 8);

    // RCX = 0: nothing happens, but the instruction completes.
    vm.set(Gpr::Rcx, 0);
    assert!(vm.done(&[0xf3, 0xab], MMIO).is_empty());
}

#[test]
fn rep_with_32_bit_addresses_in_64_bit_mode() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, 1)
        .set(Gpr::Rcx, 0xffff_ffff_0000_0002)
        .set(Gpr::Rdi, 0xdead_beef_0000_0000 | MMIO);
    let log = vm.done(&[0x67, 0xf3, 0xab], MMIO); // rep stos dword [edi], eax
    assert_eq!(log, [write(MMIO, 4, 1), write(MMIO + 4, 4, 1)]);
    // 32-bit register writes zero the upper halves.
    assert_eq!((vm.get(Gpr::Rcx), vm.get(Gpr::Rdi)), (0, MMIO + 8));
}

#[test]
fn huge_rep_count_is_done_in_bounded_chunks() {
    let mut vm = Vm::long();
    let count = 1u64 << 40;
    vm.set(Gpr::Rax, 0x5a)
        .set(Gpr::Rdi, MMIO)
        .set(Gpr::Rcx, count);
    vm.platform.poke(CODE, &[0xf3, 0xaa]); // rep stosb
    assert_eq!(
        emulate(&mut vm.platform, &mut vm.cpu, MMIO),
        Outcome::Repeat
    );
    assert_eq!(vm.platform.log.len() as u64, REP_CHUNK);
    assert_eq!(
        vm.platform.log.last(),
        Some(&write(MMIO + REP_CHUNK - 1, 1, 0x5a))
    );
    assert_eq!(
        (vm.cpu.rip, vm.get(Gpr::Rcx), vm.get(Gpr::Rdi)),
        (CODE, count - REP_CHUNK, MMIO + REP_CHUNK)
    );

    // The guest re-executes and exits on the next element.
    assert_eq!(
        emulate(&mut vm.platform, &mut vm.cpu, MMIO + REP_CHUNK),
        Outcome::Repeat
    );
    assert_eq!(vm.get(Gpr::Rcx), count - 2 * REP_CHUNK);

    vm.set(Gpr::Rcx, 5);
    vm.platform.log.clear();
    let rdi = vm.get(Gpr::Rdi);
    assert_eq!(emulate(&mut vm.platform, &mut vm.cpu, rdi), Outcome::Done);
    assert_eq!((vm.cpu.rip, vm.platform.log.len()), (CODE + 2, 5));
}

#[test]
fn movs_between_device_and_ram_either_way() {
    let mut vm = Vm::long();
    // Device to RAM.
    vm.set(Gpr::Rsi, MMIO)
        .set(Gpr::Rdi, DATA)
        .set(Gpr::Rcx, 4)
        .reads(&[1, 2, 3, 4]);
    let log = vm.done(&[0xf3, 0xa4], MMIO); // rep movsb
    assert_eq!(
        log,
        [
            read(MMIO, 1, 1),
            read(MMIO + 1, 1, 2),
            read(MMIO + 2, 1, 3),
            read(MMIO + 3, 1, 4)
        ]
    );
    assert_eq!(
        vm.platform.ram[DATA as usize..DATA as usize + 4],
        [1, 2, 3, 4]
    );
    assert_eq!(
        (vm.get(Gpr::Rsi), vm.get(Gpr::Rdi), vm.get(Gpr::Rcx)),
        (MMIO + 4, DATA + 4, 0)
    );

    // RAM to device; the exit was on the destination.
    vm.platform.write_u64(DATA, 0x0102_0304_0506_0708);
    vm.platform.write_u64(DATA + 8, 0x1112_1314_1516_1718);
    vm.set(Gpr::Rsi, DATA).set(Gpr::Rdi, MMIO).set(Gpr::Rcx, 2);
    let log = vm.done(&[0xf3, 0x48, 0xa5], MMIO); // rep movsq
    assert_eq!(
        log,
        [
            write(MMIO, 8, 0x0102_0304_0506_0708),
            write(MMIO + 8, 8, 0x1112_1314_1516_1718)
        ]
    );

    // Device to device, downwards.
    vm.set(Gpr::Rsi, MMIO)
        .set(Gpr::Rdi, MMIO + 0x100)
        .reads(&[0xabcd_ef01]);
    vm.cpu.rflags |= rflags::DF;
    let log = vm.done(&[0xa5], MMIO + 0x100); // movsd
    assert_eq!(
        log,
        [
            read(MMIO, 4, 0xabcd_ef01),
            write(MMIO + 0x100, 4, 0xabcd_ef01)
        ]
    );
    assert_eq!(
        (vm.get(Gpr::Rsi), vm.get(Gpr::Rdi)),
        (MMIO - 4, MMIO + 0xfc)
    );
}

#[test]
fn movs_source_segment_override() {
    let mut vm = Vm::long();
    vm.cpu.fs.base = 0x1000_0000;
    vm.set(Gpr::Rsi, MMIO - 0x1000_0000)
        .set(Gpr::Rdi, DATA)
        .reads(&[0x42]);
    assert_eq!(vm.done(&[0x64, 0xa4], MMIO), [read(MMIO, 1, 0x42)]); // movsb fs:[rsi]
    assert_eq!(vm.platform.ram[DATA as usize], 0x42);
}

#[test]
fn rip_relative_and_sib_addressing() {
    let mut vm = Vm::long();
    // mov eax, [rip + 0x9effa]: RIP after the instruction is CODE + 6.
    vm.reads(&[0x77]);
    assert_eq!(
        vm.done(&[0x8b, 0x05, 0xfa, 0xef, 0x09, 0x00], VGA),
        [read(VGA, 4, 0x77)]
    );
    assert_eq!(vm.get(Gpr::Rax), 0x77);

    vm.set(Gpr::Rbx, MMIO).set(Gpr::Rcx, 3).reads(&[1]);
    assert_eq!(
        vm.done(&[0x8b, 0x44, 0x8b, 0x10], MMIO + 0x1c),
        [read(MMIO + 0x1c, 4, 1)]
    ); // [rbx+rcx*4+0x10]

    vm.set(Gpr::R13, MMIO).set(Gpr::R12, 0x10).set(Gpr::Rax, 9);
    assert_eq!(
        vm.done(&[0x43, 0x89, 0x44, 0xa5, 0x08], MMIO + 0x48),
        [write(MMIO + 0x48, 4, 9)]
    ); // [r13+r12*4+8]
}

#[test]
fn fs_gs_bases_count_in_64_bit_mode_others_do_not() {
    let mut vm = Vm::long();
    vm.cpu.fs.base = 0x1000_0000;
    vm.cpu.gs.base = 0x2000_0000;
    vm.cpu.ds.base = 0x5000;
    vm.cpu.es.base = 0x5000;
    vm.set(Gpr::Rax, MMIO - 0x1000_0000).reads(&[3]);
    assert_eq!(vm.done(&[0x64, 0x8b, 0x00], MMIO), [read(MMIO, 4, 3)]); // mov eax, fs:[rax]
    vm.set(Gpr::Rax, MMIO - 0x2000_0000).set(Gpr::Rbx, 4);
    assert_eq!(vm.done(&[0x65, 0x89, 0x18], MMIO), [write(MMIO, 4, 4)]); // mov gs:[rax], ebx
    vm.set(Gpr::Rax, MMIO);
    assert_eq!(vm.done(&[0x26, 0x89, 0x18], MMIO), [write(MMIO, 4, 4)]); // mov es:[rax], ebx
}

#[test]
fn protected_mode_segment_bases_wrap_at_4_gib() {
    let mut vm = Vm::new(CpuMode::Protected32, None);
    vm.cpu.ds.base = 0xfef0_0000;
    vm.set(Gpr::Rbx, 0xfff0_0000)
        .set(Gpr::Rax, 0xffff_ffff_1234_5678);
    assert_eq!(vm.done(&[0x89, 0x03], MMIO), [write(MMIO, 4, 0x1234_5678)]); // mov [ebx], eax

    vm.cpu.ds.base = 0;
    vm.set(Gpr::Rcx, 4).reads(&[5]);
    assert_eq!(
        vm.done(&[0x8b, 0x04, 0x8d, 0x00, 0x00, 0xe0, 0xfe], MMIO + 0x10),
        [read(MMIO + 0x10, 4, 5)]
    );
}

#[test]
fn compatibility_mode_goes_through_long_mode_paging() {
    let (mut vm, mut tables) = Vm::long_with_tables();
    vm.cpu.cs.access = (vm.cpu.cs.access & !access::L) | access::DB;
    tables.map(&mut vm.platform, CODE, CODE, 1, 0);
    tables.map(&mut vm.platform, 0x4000_0000, MMIO, 1, pte::RW);
    vm.set(Gpr::Rax, 0x4000_0010).set(Gpr::Rbx, 0x99);
    assert_eq!(
        vm.done(&[0x89, 0x18], MMIO + 0x10),
        [write(MMIO + 0x10, 4, 0x99)]
    ); // mov [eax], ebx
}

#[test]
fn real_mode_16_bit_addressing() {
    let mut vm = Vm::new(CpuMode::Real, None);
    vm.cpu.ds.base = VGA; // DS = 0xa000
    vm.set(Gpr::Rbx, 0x10)
        .set(Gpr::Rsi, 0x20)
        .set(Gpr::Rax, 0xffff_0000)
        .reads(&[0x1234]);
    assert_eq!(
        vm.done(&[0x8b, 0x00], VGA + 0x30),
        [read(VGA + 0x30, 2, 0x1234)]
    ); // mov ax, [bx+si]
    assert_eq!(vm.get(Gpr::Rax), 0xffff_1234);

    // The 16-bit offset wraps.
    vm.set(Gpr::Rbx, 0xfff0).reads(&[0]);
    assert_eq!(vm.done(&[0x8b, 0x00], VGA + 0x10), [read(VGA + 0x10, 2, 0)]);

    vm.set(Gpr::Rbx, 0x100).set(Gpr::Rax, 0xaabb_ccdd);
    assert_eq!(
        vm.done(&[0x89, 0x47, 0x04], VGA + 0x104),
        [write(VGA + 0x104, 2, 0xccdd)]
    ); // mov [bx+4], ax
    assert_eq!(
        vm.done(&[0x66, 0x89, 0x07], VGA + 0x100),
        [write(VGA + 0x100, 4, 0xaabb_ccdd)]
    ); // mov [bx], eax
    let log = vm.done(&[0xc7, 0x06, 0x34, 0x12, 0x78, 0x56], VGA + 0x1234); // mov word [0x1234], 0x5678
    assert_eq!(log, [write(VGA + 0x1234, 2, 0x5678)]);
    vm.set(Gpr::Rbx, 0x1_0000).reads(&[0x4321]);
    assert_eq!(
        vm.done(&[0x67, 0x8b, 0x03], VGA + 0x1_0000),
        [read(VGA + 0x1_0000, 2, 0x4321)]
    ); // mov ax, [ebx]

    // BP-based forms default to SS.
    vm.cpu.ss.base = 0xb_0000;
    vm.set(Gpr::Rbp, 0x10).reads(&[1]);
    assert_eq!(
        vm.done(&[0x8b, 0x46, 0x02], 0xb_0012),
        [read(0xb_0012, 2, 1)]
    ); // mov ax, [bp+2]

    // IP wraps at 64 KiB.
    vm.cpu.rip = 0xfffe;
    vm.set(Gpr::Rbx, 0).set(Gpr::Rsi, 0).reads(&[0]);
    vm.platform.poke(0xfffe, &[0x8b, 0x00]);
    assert_eq!(emulate(&mut vm.platform, &mut vm.cpu, VGA), Outcome::Done);
    assert_eq!(vm.cpu.rip, 0);

    // String instructions use SI/DI/CX.
    vm.cpu.rip = CODE;
    vm.cpu.es.base = VGA;
    vm.set(Gpr::Rdi, 0xffff_0000_0000_fffe)
        .set(Gpr::Rcx, 0x7_0002)
        .set(Gpr::Rax, 0x55);
    let log = vm.done(&[0xf3, 0xaa], VGA + 0xfffe); // rep stosb
    assert_eq!(
        log,
        [write(VGA + 0xfffe, 1, 0x55), write(VGA + 0xffff, 1, 0x55)]
    );
    assert_eq!(
        (vm.get(Gpr::Rdi), vm.get(Gpr::Rcx)),
        (0xffff_0000_0000_0000, 0x7_0000)
    );
}

#[test]
fn fetch_crosses_a_page_boundary() {
    let (mut vm, mut tables) = Vm::long_with_tables();
    // Two virtually adjacent code pages backed by scattered frames.
    tables.map(&mut vm.platform, 0x40_0000, 0x5000, 1, 0);
    tables.map(&mut vm.platform, 0x40_1000, 0x9000, 1, 0);
    tables.map(&mut vm.platform, MMIO, MMIO, 1, pte::RW);
    let code = [0x48, 0xc7, 0x00, 0x78, 0x56, 0x34, 0x12]; // mov qword [rax], 0x12345678
    vm.platform.poke(0x5ffd, &code[..3]);
    vm.platform.poke(0x9000, &code[3..]);
    vm.cpu.rip = 0x40_0ffd;
    vm.set(Gpr::Rax, MMIO);
    assert_eq!(emulate(&mut vm.platform, &mut vm.cpu, MMIO), Outcome::Done);
    assert_eq!(vm.platform.log, [write(MMIO, 8, 0x1234_5678)]);
    assert_eq!(vm.cpu.rip, 0x40_1004);
}

#[test]
fn fetch_touches_the_next_page_only_if_needed() {
    let (mut vm, mut tables) = Vm::long_with_tables();
    tables.map(&mut vm.platform, 0x40_0000, 0x5000, 1, 0);
    tables.map(&mut vm.platform, MMIO, MMIO, 1, pte::RW);
    vm.set(Gpr::Rax, MMIO);
    // A 2-byte instruction ending at the page's end: the unmapped next page is never read.
    vm.platform.poke(0x5ffe, &[0x89, 0x18]);
    vm.cpu.rip = 0x40_0ffe;
    assert_eq!(emulate(&mut vm.platform, &mut vm.cpu, MMIO), Outcome::Done);
    // A 3-byte one needs it: #PF on the next page, as an instruction fetch.
    vm.platform.poke(0x5ffe, &[0x48, 0x89]);
    vm.cpu.rip = 0x40_0ffe;
    let fault = Exception::page_fault(pf::ID, 0x40_1000);
    assert_eq!(
        emulate(&mut vm.platform, &mut vm.cpu, MMIO),
        Outcome::Fault(fault)
    );
    assert_eq!(vm.cpu.rip, 0x40_0ffe);
}

#[test]
fn fetch_from_an_unmapped_page_faults() {
    let (mut vm, _tables) = Vm::long_with_tables();
    vm.cpu.rip = 0x7000_0123;
    let fault = Exception::page_fault(pf::ID, 0x7000_0123);
    assert_eq!(vm.run(&[], MMIO), Outcome::Fault(fault));
    // From user mode, the U bit too.
    vm.cpu.ss.access |= 3 << access::DPL_SHIFT;
    let fault = Exception::page_fault(pf::ID | pf::U, 0x7000_0123);
    assert_eq!(vm.run(&[], MMIO), Outcome::Fault(fault));
}

#[test]
fn data_page_fault_leaves_no_half_access() {
    let (mut vm, mut tables) = Vm::long_with_tables();
    tables.map(&mut vm.platform, CODE, CODE, 1, 0);
    tables.map(&mut vm.platform, MMIO, MMIO, 1, pte::RW);
    // An unmapped operand.
    vm.set(Gpr::Rax, 0x7000_0000).set(Gpr::Rbx, 1);
    let before = vm.cpu;
    assert_eq!(
        vm.run(&[0x89, 0x18], MMIO),
        Outcome::Fault(Exception::page_fault(pf::W, 0x7000_0000))
    );
    assert_eq!(vm.cpu, before);
    // A write straddling into an unmapped page: neither part reaches the bus.
    vm.set(Gpr::Rax, MMIO + 0xffe);
    let fault = Exception::page_fault(pf::W, MMIO + 0x1000);
    assert_eq!(vm.run(&[0x89, 0x18], MMIO + 0xffe), Outcome::Fault(fault));
    assert!(vm.platform.log.is_empty());
}

#[test]
fn device_access_split_at_a_page_boundary() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, MMIO + 0xffe).set(Gpr::Rbx, 0x1122_3344);
    // The exit may name the second page (the first half was also MMIO).
    let log = vm.done(&[0x89, 0x18], MMIO + 0x1000);
    assert_eq!(
        log,
        [
            write(MMIO + 0xffe, 2, 0x3344),
            write(MMIO + 0x1000, 2, 0x1122)
        ]
    );
    // Reads put the halves together.
    vm.reads(&[0xbbaa, 0xddcc]);
    vm.done(&[0x8b, 0x18], MMIO + 0xffe);
    assert_eq!(vm.get(Gpr::Rbx), 0xddcc_bbaa);
}

#[test]
fn exit_gpa_mismatch_changes_nothing() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, MMIO).set(Gpr::Rbx, 1);
    let before = vm.cpu;
    assert_eq!(vm.run(&[0x89, 0x18], MMIO + 0x1000), Outcome::Mismatch);
    assert_eq!(vm.run(&[0x89, 0x18], MMIO + 4), Outcome::Mismatch);
    vm.set(Gpr::Rsi, MMIO).set(Gpr::Rdi, DATA);
    let before_movs = vm.cpu;
    assert_eq!(vm.run(&[0xa5], MMIO + 0x10), Outcome::Mismatch);
    assert_eq!(vm.cpu, before_movs);
    assert!(vm.platform.log.is_empty());
    assert_eq!(before.rip, vm.cpu.rip);
}

#[test]
fn unsupported_forms_change_nothing() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, MMIO).set(Gpr::Rbx, 1);
    let cases: [(&[u8], Code); 8] = [
        (&[0x0f, 0x0b], Code::Ud2),
        (&[0xf0, 0x01, 0x18], Code::Add_rm32_r32), // lock add [rax], ebx
        (&[0x89, 0xd8], Code::Mov_rm32_r32),       // mov eax, ebx: no memory operand
        (&[0xff, 0x00], Code::Inc_rm32),           // inc dword [rax]
        (&[0x0f, 0x10, 0x00], Code::Movups_xmm_xmmm128),
        (&[0x8e, 0x18], Code::Mov_Sreg_r32m16), // mov ds, [rax]
        (&[0x06], Code::INVALID),               // push es: invalid in 64-bit mode
        (&[0xc4, 0xc4, 0xc4, 0xc4], Code::INVALID),
    ];
    let before = vm.cpu;
    for (code, expected) in cases {
        let mut bytes = [0x90u8; MAX_INSN_LEN];
        bytes[..code.len()].copy_from_slice(code);
        // Garbage after the instruction must not matter.
        bytes[code.len()..].fill(0xc4);
        assert_eq!(
            vm.run(&bytes, MMIO),
            Outcome::Unsupported(expected),
            "{code:02x?}"
        );
        assert_eq!(vm.cpu, before);
    }
    assert!(vm.platform.log.is_empty());
}

#[test]
fn non_canonical_operands_raise_gp_or_ss() {
    let mut vm = Vm::long();
    vm.set(Gpr::Rax, 0x8000_0000_0000_0000)
        .set(Gpr::Rsp, 0x0001_0000_0000_0000);
    let gp = Outcome::Fault(Exception::with_zero_code(Exception::GP));
    assert_eq!(vm.run(&[0x89, 0x18], MMIO), gp);
    let ss = Outcome::Fault(Exception::with_zero_code(Exception::SS));
    assert_eq!(vm.run(&[0x89, 0x1c, 0x24], MMIO), ss); // mov [rsp], ebx
}

#[test]
fn instruction_outside_ram_stops_the_vm() {
    let mut vm = Vm::new(CpuMode::Protected32, None);
    vm.cpu.rip = MMIO;
    assert_eq!(
        emulate(&mut vm.platform, &mut vm.cpu, MMIO),
        Outcome::NotRam(MMIO)
    );
}

/// What the fuzz test expects an exit address to be: the linear address
/// of the instruction's memory operand, which the identity map makes the
/// GPA too.
fn operand_address(cpu: &CpuState, code: &[u8]) -> Option<u64> {
    let mode = cpu.mode();
    let mut decoder =
        Decoder::try_with_ip(mode.bits(), code, cpu.rip, DecoderOptions::NONE).ok()?;
    let instr = decoder.decode();
    let op = (0..instr.op_count()).find(|&i| {
        !matches!(instr.op_kind(i), OpKind::Register)
            && instr.op_kind(i) as u32 >= OpKind::MemorySegSI as u32
    })?;
    let long = mode == Mode::Long;
    let linear = instr.virtual_address(op, 0, |reg, _, _| match reg {
        Register::FS => Some(cpu.fs.base),
        Register::GS => Some(cpu.gs.base),
        Register::ES | Register::CS | Register::SS | Register::DS if long => Some(0),
        Register::ES => Some(cpu.es.base),
        Register::CS => Some(cpu.cs.base),
        Register::SS => Some(cpu.ss.base),
        Register::DS => Some(cpu.ds.base),
        _ => gpr_read(cpu, reg),
    })?;
    Some(if long { linear } else { linear & 0xffff_ffff })
}

#[test]
fn fuzz_random_instructions_in_every_mode() {
    // Opcodes and prefixes the emulator handles, to steer the bytes there.
    const INTERESTING: &[u8] = &[
        0x88, 0x89, 0x8a, 0x8b, 0xc6, 0xc7, 0xa0, 0xa1, 0xa2, 0xa3, 0x0f, 0x63, 0x80, 0x81, 0x83,
        0x84, 0x85, 0x86, 0x87, 0xf6, 0xf7, 0x01, 0x09, 0x21, 0x29, 0x31, 0x39, 0x3b, 0xa4, 0xa5,
        0xaa, 0xab, 0xf3, 0xf2, 0x66, 0x67, 0x48, 0x4c, 0x41, 0x64, 0x65, 0xf0, 0x26, 0x36,
    ];
    let modes = [
        (CpuMode::Real, None),
        (CpuMode::Protected16, None),
        (CpuMode::Protected32, None),
        (CpuMode::Protected32, Some(Paging::Legacy32)),
        (CpuMode::Protected32, Some(Paging::Pae)),
        (CpuMode::Compat32, Some(Paging::Long4)),
        (CpuMode::Long, Some(Paging::Long4)),
        (CpuMode::Long, Some(Paging::Long5)),
    ];
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut done = 0;
    for (mode, paging) in modes {
        let (mut vm, tables) = Vm::identity_mapped(mode, paging);
        if let Some(mut tables) = tables {
            // Holes and a read-only stretch, so operands fault too.
            let (level, size): (u32, u64) = match paging {
                Some(Paging::Legacy32) => (2, 1 << 22),
                Some(Paging::Pae) => (2, 1 << 21),
                _ => (3, 1 << 30),
            };
            for page in (0x4000_0000..0xc000_0000u64).step_by(size as usize) {
                if (page / size) % 2 == 0 {
                    let entry = tables.entry_gpa(&mut vm.platform, page, level);
                    vm.platform.write_u64(entry, 0);
                } else {
                    tables.map(&mut vm.platform, page, page, level, 0);
                }
            }
        }
        let pristine = vm.platform.ram.clone();
        for _ in 0..4000 {
            if vm.platform.ram_written {
                vm.platform.ram.copy_from_slice(&pristine);
                vm.platform.ram_written = false;
            }
            let mut code = [0u8; MAX_INSN_LEN];
            for byte in code.iter_mut() {
                let r = rng.next();
                *byte = if r.is_multiple_of(3) {
                    INTERESTING[(r >> 8) as usize % INTERESTING.len()]
                } else {
                    (r >> 16) as u8
                };
            }
            // Small register values keep most operands inside the 4 GiB map.
            for reg in vm.cpu.gpr.iter_mut() {
                *reg = rng.next() & [0xff, 0xffff, 0xfee0_ffff, u64::MAX][rng.below(4) as usize];
            }
            vm.cpu.rflags = 0x2 | (rng.next() & (rflags::DF | rflags::STATUS));
            vm.cpu.rip = CODE + rng.below(0x1000);
            vm.platform.reads.clear();
            vm.platform.log.clear();
            let exit_gpa = match operand_address(&vm.cpu, &code) {
                Some(gpa) if rng.below(4) != 0 => gpa,
                _ => rng.next() & 0xffff_ffff,
            };
            let len = decode(vm.cpu.mode().bits(), &code, vm.cpu.rip).0.len() as u64;
            let before = vm.cpu;
            let outcome = vm.run(&code, exit_gpa);
            let rip_mask = width_mask(vm.cpu.mode().bits() as usize / 8);
            match outcome {
                Outcome::Done => {
                    assert_eq!(
                        vm.cpu.rip,
                        (before.rip + len) & rip_mask,
                        "{mode:?} {code:02x?}"
                    );
                    done += 1;
                }
                Outcome::Repeat => assert_eq!(vm.cpu.rip, before.rip),
                Outcome::Fault(e) => {
                    assert_eq!(vm.cpu.rip, before.rip);
                    assert!(
                        matches!(e.vector, Exception::PF | Exception::GP | Exception::SS),
                        "{e:?}"
                    );
                    assert_eq!(e.cr2.is_some(), e.vector == Exception::PF);
                }
                Outcome::Unsupported(_) | Outcome::Mismatch => {
                    assert_eq!(vm.cpu, before, "{outcome:?} {code:02x?}");
                    assert!(vm.platform.log.is_empty(), "{outcome:?} {code:02x?}");
                }
                // Only a REP instruction that overwrote page tables gets here.
                Outcome::NotRam(_) => assert_eq!(vm.cpu.rip, before.rip),
            }
        }
    }
    // The steering has to reach the emulation paths, not just the rejects.
    assert!(done > 1000, "only {done} emulated");
}

#[test]
fn efer_nxe_clear_fetch_faults_carry_no_id_bit_without_smep() {
    let (mut vm, _tables) = Vm::long_with_tables();
    vm.cpu.efer &= !efer::NXE;
    vm.cpu.rip = 0x7000_0000;
    assert_eq!(
        vm.run(&[], MMIO),
        Outcome::Fault(Exception::page_fault(0, 0x7000_0000))
    );
}
