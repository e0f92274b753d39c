//! The guests' machine code. Each blob lies between `testvm_<name>_start`
//! and `testvm_<name>_end` in a read-only section of its own; it is copied,
//! never executed, by the VMM. Code is position independent: 64-bit code
//! addresses its data RIP-relative, 16- and 32-bit code uses absolute
//! addresses written as `label - start + LOAD_ADDRESS` (assembler
//! constants). Every blob ends in `.code64` so nothing after it is
//! assembled in another mode.

use core::arch::global_asm;

use crate::layout::{FAULT_PAGE, IDT, LOAD_ADDRESS, MODES_TABLES, PAGE_TABLE};
use crate::{
    mark, mmio, port, HYPERCALL_ECHO, HYPERCALL_MISSING, INTERRUPT_VECTOR, IRQONCE_ROUNDS,
    IRQONCE_SPIN, NOT_GIVEN, TEST_MSR, UD_VECTOR,
};

/// The bytes from `start` to `end`.
///
/// # Safety
/// `start` and `end` must delimit one blob defined in this file: both
/// symbols in the same read-only section, `start` not after `end`.
unsafe fn bytes_between(start: *const u8, end: *const u8) -> &'static [u8] {
    let len = (end as usize).saturating_sub(start as usize);
    // SAFETY: by the caller's promise the range is one blob, read-only
    // data of this crate that lives for the whole program.
    unsafe { core::slice::from_raw_parts(start, len) }
}

macro_rules! blob {
    ($name:ident, $start:ident, $end:ident) => {
        pub(crate) fn $name() -> &'static [u8] {
            extern "C" {
                static $start: u8;
                static $end: u8;
            }
            // SAFETY: the pair is defined below by one `global_asm!`, start
            // label first and end label last in the blob's own section.
            unsafe { bytes_between(&raw const $start, &raw const $end) }
        }
    };
}

blob!(modes, testvm_modes_start, testvm_modes_end);
blob!(portio, testvm_portio_start, testvm_portio_end);
blob!(mmio, testvm_mmio_start, testvm_mmio_end);
blob!(cpuid_msr, testvm_cpuid_msr_start, testvm_cpuid_msr_end);
blob!(interrupt, testvm_interrupt_start, testvm_interrupt_end);
blob!(pagefault, testvm_pagefault_start, testvm_pagefault_end);
blob!(hypercall, testvm_hypercall_start, testvm_hypercall_end);
blob!(nogive, testvm_nogive_start, testvm_nogive_end);
blob!(debug, testvm_debug_start, testvm_debug_end);
blob!(tsc, testvm_tsc_start, testvm_tsc_end);
blob!(cr8, testvm_cr8_start, testvm_cr8_end);
blob!(irqonce, testvm_irqonce_start, testvm_irqonce_end);

/// Opens blob `$p`: its section and start label.
macro_rules! begin {
    ($p:literal) => {
        concat!(
            ".pushsection .rodata.",
            $p,
            ", \"a\"\n",
            ".globl ",
            $p,
            "_start\n",
            ".hidden ",
            $p,
            "_start\n",
            $p,
            "_start:\n",
        )
    };
}

/// Closes blob `$p`: its end label, back to 64-bit code.
macro_rules! end {
    ($p:literal) => {
        concat!(
            ".globl ",
            $p,
            "_end\n",
            ".hidden ",
            $p,
            "_end\n",
            $p,
            "_end:\n",
            ".code64\n",
            ".popsection\n",
        )
    };
}

/// 64-bit ending of blob `$p`: prints `<p>_ok` and halts for good; label
/// `4:` prints `<p>_<fail>` instead. `2:` is the halt loop.
macro_rules! verdict64 {
    ($p:literal, $fail:literal) => {
        concat!(
            "    lea ",
            $p,
            "_ok(%rip), %rsi\n",
            "    call ",
            $p,
            "_puts\n",
            "2:  hlt\n",
            "    jmp 2b\n",
            "4:  lea ",
            $p,
            "_",
            $fail,
            "(%rip), %rsi\n",
            "    call ",
            $p,
            "_puts\n",
            "    jmp 2b\n",
        )
    };
}

/// 64-bit `<p>_puts`: prints the NUL-terminated string at `rsi` to the
/// debug port; keeps every register.
macro_rules! puts64 {
    ($p:literal) => {
        concat!(
            $p,
            "_puts:\n",
            "    push %rax\n",
            "    push %rdx\n",
            "    push %rsi\n",
            "    mov $0xe9, %dx\n",
            "2:  lodsb\n",
            "    test %al, %al\n",
            "    jz 3f\n",
            "    out %al, %dx\n",
            "    jmp 2b\n",
            "3:  pop %rsi\n",
            "    pop %rdx\n",
            "    pop %rax\n",
            "    ret\n",
        )
    };
}

/// 64-bit `<p>_gate`: IDT entry `rdi` becomes an interrupt gate to `rax`
/// (code selector 0x08); clobbers `rax`, `rdi`. `<p>_idtr` describes the
/// 256-entry IDT at `layout::IDT`.
macro_rules! idt64 {
    ($p:literal) => {
        concat!(
            $p,
            "_gate:\n",
            "    shl $4, %rdi\n",
            "    add ${idt}, %rdi\n",
            "    mov %ax, (%rdi)\n",
            "    movw $0x08, 2(%rdi)\n",
            // IST 0; type 0xe (64-bit interrupt gate), DPL 0, present.
            "    movw $0x8e00, 4(%rdi)\n",
            "    shr $16, %rax\n",
            "    mov %ax, 6(%rdi)\n",
            "    shr $16, %rax\n",
            "    mov %eax, 8(%rdi)\n",
            "    movl $0, 12(%rdi)\n",
            "    ret\n",
            ".balign 8\n",
            $p,
            "_idtr:\n",
            "    .2byte 0xfff\n",
            "    .8byte {idt}\n",
        )
    };
}

// `modes`: real mode → protected mode (own GDT) → long mode (own 1 GiB
// identity map in 2 MiB pages at MODES_TABLES), printing one word in each.
global_asm!(
    begin!("testvm_modes"),
    ".code16",
    "    cli",
    "    xor %ax, %ax",
    "    mov %ax, %ds",
    "    mov %ax, %es",
    "    mov %ax, %ss",
    "    mov ${load}, %sp",
    "    mov $(testvm_modes_real - testvm_modes_start + {load}), %si",
    "    call testvm_modes_puts16",
    "    lgdtl (testvm_modes_gdtr - testvm_modes_start + {load})",
    "    mov %cr0, %eax",
    "    or $1, %eax",
    "    mov %eax, %cr0",
    "    ljmp $0x08, $(testvm_modes_pm - testvm_modes_start + {load})",
    "testvm_modes_puts16:",
    "    mov $0xe9, %dx",
    "2:  lodsb",
    "    test %al, %al",
    "    jz 3f",
    "    out %al, %dx",
    "    jmp 2b",
    "3:  ret",
    ".code32",
    "testvm_modes_pm:",
    "    mov $0x10, %ax",
    "    mov %ax, %ds",
    "    mov %ax, %es",
    "    mov %ax, %ss",
    "    mov %ax, %fs",
    "    mov %ax, %gs",
    "    mov ${load}, %esp",
    "    mov $(testvm_modes_protected - testvm_modes_start + {load}), %esi",
    "    mov $0xe9, %dx",
    "2:  lodsb",
    "    test %al, %al",
    "    jz 3f",
    "    out %al, %dx",
    "    jmp 2b",
    "3:",
    // PML4 → PDPT → PD, each one page; the PD maps 512 × 2 MiB.
    "    mov ${tables}, %edi",
    "    xor %eax, %eax",
    "    mov $(3 * 1024), %ecx",
    "    cld",
    "    rep stosl",
    "    movl $({tables} + 0x1000 + 3), ({tables})",
    "    movl $({tables} + 0x2000 + 3), ({tables} + 0x1000)",
    "    mov $({tables} + 0x2000), %edi",
    "    mov $0x83, %eax",
    "    mov $512, %ecx",
    "2:  mov %eax, (%edi)",
    "    add $0x200000, %eax",
    "    add $8, %edi",
    "    loop 2b",
    "    mov %cr4, %eax",
    "    or $0x20, %eax", // PAE
    "    mov %eax, %cr4",
    "    mov ${tables}, %eax",
    "    mov %eax, %cr3",
    "    mov $0xc0000080, %ecx", // EFER: the VMM emulates the access
    "    rdmsr",
    "    or $0x100, %eax", // LME
    "    wrmsr",
    "    mov %cr0, %eax",
    "    or $0x80000000, %eax", // PG: long mode, compatibility submode
    "    mov %eax, %cr0",
    "    ljmp $0x18, $(testvm_modes_long - testvm_modes_start + {load})",
    ".code64",
    "testvm_modes_long:",
    "    lea testvm_modes_lm(%rip), %rsi",
    "    call testvm_modes_puts",
    // Only 64-bit code keeps bit 32 of rax.
    "    movabs $0x100000000, %rax",
    "    shr $32, %rax",
    "    cmp $1, %rax",
    "    jne 4f",
    verdict64!("testvm_modes", "fail"),
    puts64!("testvm_modes"),
    "testvm_modes_real: .asciz \"real\"",
    "testvm_modes_protected: .asciz \" protected\"",
    "testvm_modes_lm: .asciz \" long\"",
    "testvm_modes_ok: .asciz \" ok\\n\"",
    "testvm_modes_fail: .asciz \" FAIL not in 64-bit mode\\n\"",
    ".balign 8",
    "testvm_modes_gdt:",
    "    .quad 0",
    "    .quad 0x00cf9a000000ffff", // 0x08: 32-bit code
    "    .quad 0x00cf92000000ffff", // 0x10: data
    "    .quad 0x00af9a000000ffff", // 0x18: 64-bit code
    "testvm_modes_gdtr:",
    "    .2byte 31",
    "    .4byte testvm_modes_gdt - testvm_modes_start + {load}",
    end!("testvm_modes"),
    load = const LOAD_ADDRESS,
    tables = const MODES_TABLES,
    options(att_syntax)
);

// `portio`: OUT of each size to the record port, IN from the answer port
// (immediate and DX forms), `rep insb` and `rep outsb`.
global_asm!(
    begin!("testvm_portio"),
    ".code64",
    "    mov ${record}, %dx",
    "    mov $0x11, %al",
    "    out %al, %dx",
    "    mov $0x2222, %ax",
    "    out %ax, %dx",
    "    mov $0x44444444, %eax",
    "    out %eax, %dx",
    "    mov $0x88, %al",
    "    out %al, ${record}",
    "    in ${answer_port}, %al",
    "    cmp ${answer}, %al",
    "    jne 4f",
    "    mov ${answer_port}, %dx",
    "    mov $-1, %rax",
    "    in %dx, %eax", // zero-extends into rax
    "    cmp ${answer}, %rax",
    "    jne 4f",
    // Two answers into memory with rep insb.
    "    lea testvm_portio_buffer(%rip), %rdi",
    "    mov $2, %ecx",
    "    cld",
    "    rep insb",
    "    test %rcx, %rcx",
    "    jne 4f",
    "    cmpw $({answer} * 0x101), testvm_portio_buffer(%rip)",
    "    jne 4f",
    "    lea testvm_portio_buffer + 2(%rip), %rax",
    "    cmp %rax, %rdi",
    "    jne 4f",
    // The line "string ok" with rep outsb.
    "    lea testvm_portio_string(%rip), %rsi",
    "    mov $(testvm_portio_string_end - testvm_portio_string), %ecx",
    "    mov ${debug}, %dx",
    "    rep outsb",
    "    test %rcx, %rcx",
    "    jne 4f",
    "    lea testvm_portio_string_end(%rip), %rax",
    "    cmp %rax, %rsi",
    "    jne 4f",
    verdict64!("testvm_portio", "fail"),
    puts64!("testvm_portio"),
    "testvm_portio_string: .ascii \"string ok\\n\"",
    "testvm_portio_string_end:",
    "testvm_portio_ok: .asciz \"ok\\n\"",
    "testvm_portio_fail: .asciz \"FAIL port input or string I/O\\n\"",
    "testvm_portio_buffer: .2byte 0",
    end!("testvm_portio"),
    record = const port::RECORD,
    answer_port = const port::ANSWER,
    answer = const crate::ANSWER,
    debug = const port::DEBUG,
    options(att_syntax)
);

// `mmio`: stores and loads on the unmapped device page, in the forms
// `mov r32, (reg)` / `mov (reg), r32` (with and without displacement) and
// `movabs` with a 64-bit absolute address.
global_asm!(
    begin!("testvm_mmio"),
    ".code64",
    "    mov ${base}, %ebx",
    "    mov $0x12345678, %eax",
    "    mov %eax, {scratch}(%rbx)",
    "    xor %eax, %eax",
    "    movabs ({base} + {scratch}), %eax",
    "    cmp $0x12345678, %eax",
    "    jne 4f",
    "    mov {id_offset}(%rbx), %edx",
    "    cmp ${id}, %edx",
    "    jne 4f",
    "    mov $0x0badcafe, %eax",
    "    movabs %eax, ({base} + {scratch})",
    "    mov {scratch}(%rbx), %r9d",
    "    cmp %eax, %r9d",
    "    jne 4f",
    verdict64!("testvm_mmio", "fail"),
    puts64!("testvm_mmio"),
    "testvm_mmio_ok: .asciz \"ok\\n\"",
    "testvm_mmio_fail: .asciz \"FAIL device registers read back wrong\\n\"",
    end!("testvm_mmio"),
    base = const mmio::BASE,
    scratch = const mmio::SCRATCH,
    id_offset = const mmio::ID_OFFSET,
    id = const mmio::ID,
    options(att_syntax)
);

// `cpuid_msr`: the VMM's CPUID signature, then a WRMSR/RDMSR round trip
// through its MSR.
global_asm!(
    begin!("testvm_cpuid_msr"),
    ".code64",
    "    mov ${leaf}, %eax",
    "    xor %ecx, %ecx",
    "    cpuid",
    "    cmp ${sig0}, %ebx",
    "    jne 4f",
    "    cmp ${sig1}, %ecx",
    "    jne 4f",
    "    cmp ${sig2}, %edx",
    "    jne 4f",
    "    mov ${msr}, %ecx",
    "    mov $0x9abcdef0, %eax",
    "    mov $0x12345678, %edx",
    "    wrmsr",
    "    xor %eax, %eax",
    "    xor %edx, %edx",
    "    rdmsr",
    "    cmp $0x9abcdef0, %eax",
    "    jne 5f",
    "    cmp $0x12345678, %edx",
    "    jne 5f",
    verdict64!("testvm_cpuid_msr", "bad_cpuid"),
    "5:  lea testvm_cpuid_msr_bad_msr(%rip), %rsi",
    "    call testvm_cpuid_msr_puts",
    "    jmp 2b",
    puts64!("testvm_cpuid_msr"),
    "testvm_cpuid_msr_ok: .asciz \"ok\\n\"",
    "testvm_cpuid_msr_bad_cpuid: .asciz \"FAIL cpuid signature\\n\"",
    "testvm_cpuid_msr_bad_msr: .asciz \"FAIL msr read back wrong\\n\"",
    end!("testvm_cpuid_msr"),
    leaf = const crate::CPUID_LEAF,
    sig0 = const u32::from_le_bytes(*b"Moat"),
    sig1 = const u32::from_le_bytes(*b"Test"),
    sig2 = const u32::from_le_bytes(*b"VMM!"),
    msr = const TEST_MSR,
    options(att_syntax)
);

// `interrupt`: HLT with IF=0 (the VMM must wait for the interrupt window
// the following STI opens), then an injected #UD, an injected NMI and a
// second NMI through the NMI window, each handled through the guest's IDT.
global_asm!(
    begin!("testvm_interrupt"),
    ".code64",
    "    mov ${vector}, %edi",
    "    lea testvm_interrupt_irq(%rip), %rax",
    "    call testvm_interrupt_gate",
    "    mov ${ud}, %edi",
    "    lea testvm_interrupt_ud(%rip), %rax",
    "    call testvm_interrupt_gate",
    "    mov $2, %edi",
    "    lea testvm_interrupt_nmi(%rip), %rax",
    "    call testvm_interrupt_gate",
    "    lidt testvm_interrupt_idtr(%rip)",
    "    cli",
    "    hlt", // event 1: the interrupt, not deliverable with IF=0
    "    sti",
    "    nop", // the STI shadow ends: the window opens
    "    mov $1000000, %ecx",
    "2:  cmpb $1, testvm_interrupt_seen(%rip)",
    "    je 3f",
    "    pause",
    "    loop 2b",
    "    jmp 4f",
    "3:  cli",
    "    lea testvm_interrupt_ok(%rip), %rsi",
    "    call testvm_interrupt_puts",
    "    hlt", // event 2: #UD
    "    cmpb $2, testvm_interrupt_seen(%rip)",
    "    jne 4f",
    "    hlt", // event 3: NMI
    "    cmpb $4, testvm_interrupt_seen(%rip)",
    "    jne 4f",
    "5:  hlt", // the end
    "    jmp 5b",
    "4:  lea testvm_interrupt_fail(%rip), %rsi",
    "    call testvm_interrupt_puts",
    "    jmp 5b",
    "testvm_interrupt_irq:",
    "    movb $1, testvm_interrupt_seen(%rip)",
    "    iretq",
    "testvm_interrupt_ud:",
    "    movb $2, testvm_interrupt_seen(%rip)",
    "    push %rsi",
    "    lea testvm_interrupt_exception(%rip), %rsi",
    "    call testvm_interrupt_puts",
    "    pop %rsi",
    "    iretq",
    // The first NMI halts inside its handler (NMIs blocked): the VMM must
    // wait for the NMI window, which this IRET opens, to deliver the second.
    "testvm_interrupt_nmi:",
    "    push %rsi",
    "    incb testvm_interrupt_seen(%rip)",
    "    cmpb $4, testvm_interrupt_seen(%rip)",
    "    je 2f",
    "    lea testvm_interrupt_nmi_ok(%rip), %rsi",
    "    call testvm_interrupt_puts",
    "    hlt", // event 4: an NMI that must wait for the NMI window
    "    pop %rsi",
    "    iretq",
    "2:  lea testvm_interrupt_nmi_window(%rip), %rsi",
    "    call testvm_interrupt_puts",
    "    pop %rsi",
    "    iretq",
    puts64!("testvm_interrupt"),
    idt64!("testvm_interrupt"),
    "testvm_interrupt_seen: .byte 0",
    "testvm_interrupt_ok: .asciz \"ok\\n\"",
    "testvm_interrupt_exception: .asciz \"exception: ok\\n\"",
    "testvm_interrupt_nmi_ok: .asciz \"nmi: ok\\n\"",
    "testvm_interrupt_nmi_window: .asciz \"nmi window: ok\\n\"",
    "testvm_interrupt_fail: .asciz \"FAIL an event was not handled in order\\n\"",
    end!("testvm_interrupt"),
    vector = const INTERRUPT_VECTOR,
    ud = const UD_VECTOR,
    idt = const IDT,
    options(att_syntax)
);

// `pagefault`: between two marks, maps the first 2 MiB in 4 KiB pages with
// FAULT_PAGE absent, writes to it and lets its #PF handler map it. No exit
// may reach the VMM in between.
global_asm!(
    begin!("testvm_pagefault"),
    ".code64",
    "    mov $14, %edi",
    "    lea testvm_pagefault_handler(%rip), %rax",
    "    call testvm_pagefault_gate",
    "    lidt testvm_pagefault_idtr(%rip)",
    "    mov ${begin}, %al",
    "    out %al, ${mark}",
    // rbx = the PD of the first GiB, found from CR3.
    "    movabs $0x000ffffffffff000, %rcx",
    "    mov %cr3, %rbx",
    "    and %rcx, %rbx",
    "    mov (%rbx), %rbx",
    "    and %rcx, %rbx",
    "    mov (%rbx), %rbx",
    "    and %rcx, %rbx",
    // The new page table: identity, present and writable, but one page.
    "    mov ${pt}, %edi",
    "    mov $3, %eax",
    "    mov $512, %ecx",
    "2:  mov %rax, (%rdi)",
    "    add $0x1000, %rax",
    "    add $8, %rdi",
    "    loop 2b",
    "    movq $0, ({pt} + ({fault} >> 12) * 8)",
    "    movq $({pt} + 3), (%rbx)",
    "    mov %cr3, %rax",
    "    mov %rax, %cr3",
    "    mov $0x1234abcd, %eax",
    "    mov %eax, ({fault})", // #PF: the handler maps the page
    "    mov ({fault}), %edx",
    "    cmp %eax, %edx",
    "    jne 4f",
    "    cmpb $1, testvm_pagefault_faults(%rip)",
    "    jne 4f",
    "    mov ${passed}, %al",
    "    out %al, ${mark}",
    "3:  hlt",
    "    jmp 3b",
    "4:  mov ${failed}, %al",
    "    out %al, ${mark}",
    "    jmp 3b",
    // Maps the page at CR2 (it lies in the first 2 MiB) and retries.
    "testvm_pagefault_handler:",
    "    push %rax",
    "    push %rdi",
    "    mov %cr2, %rax",
    "    shr $12, %rax",
    "    and $0x1ff, %eax",
    "    lea {pt}(,%rax,8), %rdi",
    "    mov %cr2, %rax",
    "    and $-4096, %rax",
    "    or $3, %rax",
    "    mov %rax, (%rdi)",
    "    mov %cr2, %rax",
    "    invlpg (%rax)",
    "    incb testvm_pagefault_faults(%rip)",
    "    pop %rdi",
    "    pop %rax",
    "    add $8, %rsp", // the error code
    "    iretq",
    idt64!("testvm_pagefault"),
    "testvm_pagefault_faults: .byte 0",
    end!("testvm_pagefault"),
    idt = const IDT,
    pt = const PAGE_TABLE,
    fault = const FAULT_PAGE,
    mark = const port::MARK,
    begin = const mark::BEGIN,
    passed = const mark::PASSED,
    failed = const mark::FAILED,
    options(att_syntax)
);

// `hypercall`: the guest IPC hypercall (VMCALL on Intel, VMMCALL on AMD,
// told apart by the CPUID vendor) to the echo portal, payload checked,
// then to a selector the VM was not given.
global_asm!(
    begin!("testvm_hypercall"),
    ".code64",
    "    xor %eax, %eax",
    "    xor %ecx, %ecx",
    "    cpuid",
    "    cmp $0x756e6547, %ebx", // "Genu"
    "    sete testvm_hypercall_intel(%rip)",
    "    movabs ${echo}, %rax",
    "    movabs $0x0101010101010100, %rdi",
    "    movabs $0x0202020202020200, %rsi",
    "    movabs $0x0303030303030300, %rdx",
    "    movabs $0x0404040404040400, %r10",
    "    movabs $0x0505050505050500, %r8",
    "    movabs $0x0606060606060600, %r9",
    "    call testvm_hypercall_call",
    "    test %rax, %rax",
    "    jnz 4f",
    "    movabs $0x0101010101010101, %rax",
    "    cmp %rax, %rdi",
    "    jne 5f",
    "    movabs $0x0202020202020201, %rax",
    "    cmp %rax, %rsi",
    "    jne 5f",
    "    movabs $0x0303030303030301, %rax",
    "    cmp %rax, %rdx",
    "    jne 5f",
    "    movabs $0x0404040404040401, %rax",
    "    cmp %rax, %r10",
    "    jne 5f",
    "    movabs $0x0505050505050501, %rax",
    "    cmp %rax, %r8",
    "    jne 5f",
    "    movabs $0x0606060606060601, %rax",
    "    cmp %rax, %r9",
    "    jne 5f",
    "    movabs ${missing}, %rax",
    "    call testvm_hypercall_call",
    "    cmp $4, %rax", // BadCapability
    "    jne 6f",
    verdict64!("testvm_hypercall", "status"),
    "5:  lea testvm_hypercall_payload(%rip), %rsi",
    "    call testvm_hypercall_puts",
    "    jmp 2b",
    "6:  lea testvm_hypercall_missing(%rip), %rsi",
    "    call testvm_hypercall_puts",
    "    jmp 2b",
    "testvm_hypercall_call:",
    "    cmpb $0, testvm_hypercall_intel(%rip)",
    "    je 3f",
    "    vmcall",
    "    ret",
    "3:  vmmcall",
    "    ret",
    puts64!("testvm_hypercall"),
    "testvm_hypercall_intel: .byte 0",
    "testvm_hypercall_ok: .asciz \"ok\\n\"",
    "testvm_hypercall_status: .asciz \"FAIL the echo call did not succeed\\n\"",
    "testvm_hypercall_payload: .asciz \"FAIL a reply word is not its word + 1\\n\"",
    "testvm_hypercall_missing: .asciz \"FAIL a selector not given did not give BadCapability\\n\"",
    end!("testvm_hypercall"),
    echo = const HYPERCALL_ECHO,
    missing = const HYPERCALL_MISSING,
    options(att_syntax)
);

// `nogive`: reads memory the VM was not given; the VMM must stop it there.
global_asm!(
    begin!("testvm_nogive"),
    ".code64",
    "    mov ${address}, %eax",
    "    mov (%rax), %edx",
    "    lea testvm_nogive_leak(%rip), %rsi",
    "    call testvm_nogive_puts",
    "2:  hlt",
    "    jmp 2b",
    puts64!("testvm_nogive"),
    "testvm_nogive_leak: .asciz \"FAIL read memory that was not given\\n\"",
    end!("testvm_nogive"),
    address = const NOT_GIVEN,
    options(att_syntax)
);

// `debug`: the guest's DR0-DR3 and DR6 survive exits (CPUID to the VMM).
global_asm!(
    begin!("testvm_debug"),
    ".code64",
    "    mov $0x1000, %rax",
    "    mov %rax, %dr0",
    "    mov $0x2000, %rax",
    "    mov %rax, %dr1",
    "    mov $0x3000, %rax",
    "    mov %rax, %dr2",
    "    mov $0x4000, %rax",
    "    mov %rax, %dr3",
    "    mov $0xffff0ff5, %eax",
    "    mov %rax, %dr6",
    "    mov $3, %r12d",
    "1:  xor %eax, %eax",
    "    xor %ecx, %ecx",
    "    cpuid",
    "    dec %r12d",
    "    jnz 1b",
    "    mov ${check}, %eax",
    "    xor %ecx, %ecx",
    "    cpuid",
    "    xor %eax, %eax",
    "    cpuid",
    "    mov %dr0, %rax",
    "    cmp $0x1000, %rax",
    "    jne 4f",
    "    mov %dr1, %rax",
    "    cmp $0x2000, %rax",
    "    jne 4f",
    "    mov %dr2, %rax",
    "    cmp $0x3000, %rax",
    "    jne 4f",
    "    mov %dr3, %rax",
    "    cmp ${new_dr3}, %rax",
    "    jne 4f",
    "    mov %dr6, %rax",
    "    and $0xf, %eax",
    "    cmp $5, %eax",
    "    jne 4f",
    verdict64!("testvm_debug", "bad"),
    puts64!("testvm_debug"),
    "testvm_debug_ok: .asciz \"ok\\n\"",
    "testvm_debug_bad: .asciz \"FAIL debug registers lost across exits\\n\"",
    end!("testvm_debug"),
    check = const crate::DEBUG_CHECK_LEAF,
    new_dr3 = const crate::DEBUG_NEW_DR3,
    options(att_syntax)
);

// `cr8`: MOV to and from CR8 cause no exit, and CR8 survives exits both
// ways (CPUID to the VMM, which checks it and sets a new one).
global_asm!(
    begin!("testvm_cr8"),
    ".code64",
    "    mov ${begin}, %al",
    "    out %al, ${mark}",
    "    mov ${guest}, %eax",
    "    mov %rax, %cr8",
    "    mov %cr8, %rbx",
    "    cmp %rax, %rbx",
    "    jne 5f",
    "    mov ${passed}, %al",
    "    out %al, ${mark}",
    "    mov ${check}, %eax",
    "    xor %ecx, %ecx",
    "    cpuid",
    "    mov %cr8, %rax",
    "    cmp ${new}, %rax",
    "    jne 4f",
    verdict64!("testvm_cr8", "bad"),
    "5:  mov ${failed}, %al",
    "    out %al, ${mark}",
    "    jmp 2b",
    puts64!("testvm_cr8"),
    "testvm_cr8_ok: .asciz \"ok\\n\"",
    "testvm_cr8_bad: .asciz \"FAIL CR8 lost across exits\\n\"",
    end!("testvm_cr8"),
    mark = const port::MARK,
    begin = const mark::BEGIN,
    passed = const mark::PASSED,
    failed = const mark::FAILED,
    guest = const crate::CR8_GUEST,
    new = const crate::CR8_NEW,
    check = const crate::CR8_CHECK_LEAF,
    options(att_syntax)
);

// `tsc`: after the VMM sets a TSC offset, RDTSC reads at least the offset.
global_asm!(
    begin!("testvm_tsc"),
    ".code64",
    "    rdtsc",
    "    shl $32, %rdx",
    "    or %rdx, %rax",
    "    movabs ${offset}, %rbx",
    "    cmp %rbx, %rax",
    "    jae 4f",
    "    mov ${leaf}, %eax",
    "    xor %ecx, %ecx",
    "    cpuid",
    "    rdtsc",
    "    shl $32, %rdx",
    "    or %rdx, %rax",
    "    movabs ${offset}, %rbx",
    "    cmp %rbx, %rax",
    "    jb 4f",
    verdict64!("testvm_tsc", "bad"),
    puts64!("testvm_tsc"),
    "testvm_tsc_ok: .asciz \"ok\\n\"",
    "testvm_tsc_bad: .asciz \"FAIL the TSC offset was not applied\\n\"",
    end!("testvm_tsc"),
    leaf = const crate::TSC_OFFSET_LEAF,
    offset = const crate::TSC_OFFSET,
    options(att_syntax)
);

// `irqonce`: each injected interrupt must arrive exactly once. For every
// interrupt the guest halts with IF=0 and then opens the interrupt window
// (as `interrupt` does); the handler runs IRQONCE_SPIN loop iterations
// with IF=0 and no exit, long enough for the emulator's own timers to
// interrupt its execution loop, and notes a re-entry (the same interrupt
// delivered again while IF=0) instead of counting it.
global_asm!(
    begin!("testvm_irqonce"),
    ".code64",
    "    mov ${vector}, %edi",
    "    lea testvm_irqonce_irq(%rip), %rax",
    "    call testvm_irqonce_gate",
    "    lidt testvm_irqonce_idtr(%rip)",
    "    xor %ebx, %ebx",
    "2:  cli",
    "    hlt", // an event: the interrupt, for the window
    "    sti",
    "    nop", // the STI shadow ends: the window opens
    "    inc %ebx",
    "    mov $1000000, %ecx",
    "7:  cmp %ebx, testvm_irqonce_count(%rip)",
    "    je 8f",
    "    pause",
    "    loop 7b",
    "    jmp 5f",
    "8:  cli",
    "    cmpb $0, testvm_irqonce_nested(%rip)",
    "    jne 4f",
    "    cmp ${rounds}, %ebx",
    "    jne 2b",
    "    lea testvm_irqonce_ok(%rip), %rsi",
    "    call testvm_irqonce_puts",
    "3:  hlt", // the end
    "    jmp 3b",
    "4:  lea testvm_irqonce_again(%rip), %rsi",
    "    call testvm_irqonce_puts",
    "    jmp 3b",
    "5:  lea testvm_irqonce_lost(%rip), %rsi",
    "    call testvm_irqonce_puts",
    "    jmp 3b",
    "testvm_irqonce_irq:",
    "    cmpb $0, testvm_irqonce_busy(%rip)",
    "    jne 6f",
    "    movb $1, testvm_irqonce_busy(%rip)",
    "    push %rcx",
    "    mov ${spin}, %ecx",
    "9:  dec %ecx",
    "    jnz 9b",
    "    pop %rcx",
    "    incl testvm_irqonce_count(%rip)",
    "    movb $0, testvm_irqonce_busy(%rip)",
    "    iretq",
    "6:  movb $1, testvm_irqonce_nested(%rip)",
    "    iretq",
    puts64!("testvm_irqonce"),
    idt64!("testvm_irqonce"),
    ".balign 4",
    "testvm_irqonce_count: .4byte 0",
    "testvm_irqonce_busy: .byte 0",
    "testvm_irqonce_nested: .byte 0",
    "testvm_irqonce_ok: .asciz \"ok\\n\"",
    "testvm_irqonce_again: .asciz \"FAIL an interrupt arrived again while its handler ran with IF=0\\n\"",
    "testvm_irqonce_lost: .asciz \"FAIL an injected interrupt did not arrive\\n\"",
    end!("testvm_irqonce"),
    vector = const INTERRUPT_VECTOR,
    rounds = const IRQONCE_ROUNDS,
    spin = const IRQONCE_SPIN,
    idt = const IDT,
    options(att_syntax)
);
