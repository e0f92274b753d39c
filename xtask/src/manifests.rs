//! Boot manifests of the system tests and benchmarks: the root task reads
//! the module named `manifest` and starts the components it lists. Each
//! text is written to `target/systest/<test>/manifest`.
//!
//! The grammar is the root task's (hypervisor/roottask/src/manifest.rs):
//! `component NAME` opens an entry whose indented lines give `module`,
//! `priority`, `memory`, `quota`, `provides PORTAL`, `uses PORTAL at SEL`,
//! `args WORDS…` and `restart N` (most restarts after faults; default 3);
//! `semaphore NAME up A at SEL down B at SEL` shares a semaphore. The root
//! appends ` index=N tsc_hz=H` to every component's arguments.

/// The `echo` server entry most manifests start with (a macro, so that
/// `concat!` can put it in front of a manifest literal).
macro_rules! echo_server {
    () => {
        "\
component echo
    module echo
    priority 20
    memory 256K
    quota 64K
    provides echo
"
    };
}

/// `echo` serves, `ping` makes 10,000 payload-checked calls.
pub const IPC_PINGPONG: &str = concat!(
    echo_server!(),
    "\
component ping
    module ping
    priority 10
    memory 256K
    quota 64K
    uses echo at 20
    args calls=10000
"
);

/// `faulty` faults and is restarted while `ticker` counts on.
pub const SUPERVISION: &str = "\
component ticker
    module ticker
    priority 20
    memory 128K
    quota 64K
    args count=150 period_ms=20
component faulty
    module faulty
    priority 10
    memory 128K
    quota 64K
    restart 3
    args delay_ms=20
";

pub const SEMAPHORE: &str = "\
component waiter
    module waiter
    priority 20
    memory 128K
    quota 64K
    args count=100
component notifier
    module notifier
    priority 10
    memory 128K
    quota 64K
    args count=100 interval_ms=5
semaphore tick up notifier at 21 down waiter at 21
";

/// The `rtc` driver with its ports and interrupt, on the CPU the lines
/// `$cpu` give (a macro, so that `concat!` can use it).
macro_rules! rtc_driver {
    ($cpu:literal) => {
        concat!(
            "\
component rtc
    module rtc
    priority 30
",
            $cpu,
            "    memory 128K
    quota 64K
    restart 0
    args count=20
ioports 0x70-0x71 to rtc
irq 8 to rtc
"
        )
    };
}

/// `rtc` drives the CMOS clock's periodic interrupt through ports and a GSI
/// given by capability; `ticker` runs beside it.
pub const INTERRUPT: &str = rtc_driver!("");

/// `echo` crashes inside a call from `ping`: ping gets `Dead`, the root
/// restarts echo and ping reaches the new instance.
pub const SERVER_DIES: &str = concat!(
    echo_server!(),
    "\
component ping
    module ping
    priority 10
    memory 256K
    quota 64K
    uses echo at 20
    args crash-server
"
);

/// `ping` alone: a server of its own faults in its call and the server's
/// exception handler destroys it before replying (`lent-fault`).
pub const LENT_FAULT: &str = "\
component ping
    module ping
    priority 10
    memory 256K
    quota 64K
    args lent-fault
";

/// `ping` is destroyed while `echo` handles its slow call: echo's reply
/// comes back `Aborted`; `ticker` keeps echo's service wanted meanwhile.
pub const CALLER_DIES: &str = concat!(
    echo_server!(),
    "\
component ticker
    module ticker
    priority 15
    memory 128K
    quota 64K
    uses echo at 20
    args count=30
component ping
    module ping
    priority 10
    ceiling 40
    memory 256K
    quota 64K
    uses echo at 20
    restart 0
    args die-during-call
"
);

/// Two CPU-bound spinners of equal priority: round robin must preempt both.
pub const ROUND_ROBIN: &str = "\
component spina
    module spinner
    priority 10
    memory 128K
    quota 64K
    args name=a ms=300
component spinb
    module spinner
    priority 10
    memory 128K
    quota 64K
    args name=b ms=300
";

/// The boot module name the root task reads its manifest from.
pub const MANIFEST_MODULE: &str = "manifest";

/// `lender` lends a page to `borrower` and revokes it; the borrower's
/// next access faults and it is not restarted.
pub const DELEGATE_REVOKE: &str = "\
component lender
    module lender
    priority 20
    memory 256K
    quota 64K
    provides lender
component borrower
    module borrower
    priority 10
    memory 128K
    quota 64K
    uses lender at 20
    restart 0
";

/// The hostile `fuzzer` beside a `ticker` of higher priority; the
/// `fuzzer` arguments (seed and call count) follow.
macro_rules! fuzzer_beside_ticker {
    ($args:literal) => {
        concat!(
            "\
component ticker
    module ticker
    priority 20
    memory 128K
    quota 64K
    args count=100 period_ms=20
component fuzzer
    module fuzzer
    priority 10
    memory 256K
    quota 64K
    restart 0
    args ",
            $args,
            "\n"
        )
    };
}

pub const FUZZER: &str = fuzzer_beside_ticker!("seed=0x5eed calls=100000");

/// `fuzzer_long` (opt-in): a million hostile calls from another seed.
pub const FUZZER_LONG: &str = fuzzer_beside_ticker!("seed=0xf00d calls=1000000");

/// `quota` runs out of kernel memory on purpose, with a small quota.
pub const QUOTA: &str = "\
component quota
    module quota
    priority 10
    memory 128K
    quota 48K
";

/// `ping` in bench mode against `echo`; 64-bit samples need heap room.
pub const BENCH_IPC: &str = concat!(
    echo_server!(),
    "\
component ping
    module ping
    priority 10
    memory 512K
    quota 64K
    uses echo at 20
    args bench iterations=10000
"
);

/// One `echo`/`ping` pair of `cargo xtask bench smp`, both on CPU `$k`.
macro_rules! bench_smp_pair {
    ($k:literal) => {
        concat!(
            "component echo",
            $k,
            "
    module echo
    priority 20
    cpu ",
            $k,
            "
    memory 256K
    quota 64K
    provides echo",
            $k,
            "
    args service=echo",
            $k,
            "
component ping",
            $k,
            "
    module ping
    priority 10
    cpu ",
            $k,
            "
    memory 512K
    quota 64K
    uses echo",
            $k,
            " at 20
    args throughput calls=50000 cpu=",
            $k,
            "
"
        )
    };
}

/// `cargo xtask bench smp`: one `echo`/`ping` pair per CPU on the first N
/// CPUs, each pair on its own CPU, all at once (`ping throughput`).
pub const BENCH_SMP1: &str = bench_smp_pair!(0);
pub const BENCH_SMP2: &str = concat!(bench_smp_pair!(0), bench_smp_pair!(1));
pub const BENCH_SMP4: &str = concat!(
    bench_smp_pair!(0),
    bench_smp_pair!(1),
    bench_smp_pair!(2),
    bench_smp_pair!(3)
);

/// `cargo xtask bench smp`: the cross-CPU semaphore wake-up, from CPU 0 to
/// an EC of the same PD on CPU 1.
pub const BENCH_SMP_WAKEUP: &str = "\
component ping
    module ping
    priority 10
    cpu 0
    memory 512K
    quota 64K
    args wakeup-cpu=1 iterations=2000 cpu=0
";

/// `testvmm` in bench mode: CPUID exits, guest IPC hypercalls to `echo`
/// and native calls to `echo`, measured in one run.
pub const BENCH_EXITS: &str = concat!(
    echo_server!(),
    "\
component testvmm
    module testvmm
    priority 10
    memory 1M
    quota 512K
    uses echo at 20
    restart 0
    args bench
"
);

/// `testvmm` runs every test guest in a VM of its own; the `hypercall`
/// guest calls `echo` through the guest IPC hypercall. Each VM (its vCPU,
/// guest-physical tables and capabilities) is paid from testvmm's quota.
pub const TESTVM: &str = concat!(
    echo_server!(),
    "\
component testvmm
    module testvmm
    priority 10
    memory 1M
    quota 512K
    uses echo at 20
    restart 0
"
);

/// The Linux guest's VMM entry: RAM, heap, kernel and initramfs; each
/// manifest adds its disk, command line and arguments (a macro, so that
/// `concat!` can put it in front of the rest).
macro_rules! linux_vmm {
    () => {
        "\
component linux
    module vmm
    priority 10
    ceiling 30
    memory 2M
    stack 64K
    quota 32M
    restart 0
    ram guest 256M at 0x10000000000
    ram heap 16M at 0x20000000000
    file kernel bzImage at 0x30000000000
    file initrd initramfs.cpio at 0x31000000000
"
    };
}

/// The native modem, above every other priority and on a CPU of its own
/// when the machine has two (on one CPU, CPU 0), with the lines `$more`
/// (its `restart` and `args`).
macro_rules! modem_component {
    ($more:literal) => {
        concat!(
            "\
component modem
    module modem
    priority 40
    cpu 1
    memory 256K
    quota 64K
    provides modem
",
            $more
        )
    };
}

/// The machine's clock: the `rtc` driver in its `serve` mode, with the
/// CMOS ports, publishing `clock` (the VMM's `clock=` asks it the time).
macro_rules! clock_driver {
    () => {
        "\
component clock
    module rtc
    priority 20
    memory 128K
    quota 64K
    provides clock
    args serve
ioports 0x70-0x71 to clock
"
    };
}

/// The native services beside the Linux guest: the `echo` server (the
/// guest calls it with the IPC hypercall) and the `modem` (its AT service
/// reached through the virtio-console port `modem`), above the guest.
macro_rules! linux_neighbours {
    () => {
        concat!(
            echo_server!(),
            modem_component!("    args report_every=10000\n")
        )
    };
}

/// A Debian Linux guest under `vmm`: 256 MiB of RAM, a 16 MiB heap for the
/// VMM, and the kernel, initramfs, test disk and command line as files;
/// beside it `echo` (given to the VM for the hypercall, from guest user
/// space too), `modem` (relayed to the guest's `modem` port) and the
/// `clock` its VMM takes the guest's time from.
pub const LINUX: &str = concat!(
    linux_neighbours!(),
    clock_driver!(),
    linux_vmm!(),
    "\
    file disk disk.img at 0x32000000000
    file cmdline cmdline at 0x33000000000
    uses echo at 20
    uses modem at 21
    uses clock at 22
    args clock=22 modem=21 vm-portals=20 user-hypercalls
irq 255 to linux
"
);

/// `cargo xtask demo modem`: the Linux guest in its demo mode beside
/// `echo` and a `modem` that reports every 1000 frames (1 s) and accepts
/// `AT+MOATFAULT` (step d crashes it so); the VMM restarts a guest that
/// panics (step c).
pub const DEMO: &str = concat!(
    echo_server!(),
    modem_component!("    args report_every=1000 fault_injection\n"),
    linux_vmm!(),
    "\
    file disk disk.img at 0x32000000000
    file cmdline cmdline at 0x33000000000
    uses echo at 20
    uses modem at 21
    args epoch=1764000000 modem=21 vm-portals=20 user-hypercalls on-panic=restart
irq 255 to linux
"
);

/// `cargo xtask soak` and the system test `soak_short`: the Linux guest
/// under load (`moat.soak=`) beside `echo` and a `modem` that reports
/// every 1000 frames (1 s): the clock by which the soak measures the gaps
/// between the guest's heartbeats. A guest that panics is not restarted.
pub const SOAK: &str = concat!(
    echo_server!(),
    modem_component!("    args report_every=1000\n"),
    linux_vmm!(),
    "\
    file disk disk.img at 0x32000000000
    file cmdline cmdline at 0x33000000000
    uses echo at 20
    uses modem at 21
    args epoch=1764000000 modem=21 vm-portals=20 user-hypercalls
irq 255 to linux
"
);

/// The Linux guest without a disk, told to panic once `/init` is done,
/// beside `ticker`, which must go on counting after the guest is gone.
pub const LINUX_PANIC: &str = concat!(
    linux_vmm!(),
    "\
    file cmdline cmdline at 0x33000000000
    args epoch=1764000000
component ticker
    module ticker
    priority 20
    memory 128K
    quota 64K
    args count=1000000 period_ms=500
"
);

/// The Linux guest without a disk, left at its shell with nothing typed:
/// the system stalls on purpose, and the harness's state dump (the
/// kernel's debug event, GSI 255, which the VMM holds) is what the test
/// `stall_dump` judges.
pub const STALL: &str = concat!(
    linux_vmm!(),
    "\
    file cmdline cmdline at 0x33000000000
    args epoch=1764000000
irq 255 to linux
"
);

/// `modem` ticks its 1 ms frames above every other priority and serves
/// its AT sessions to `modemclient`; it crashes on purpose after 1200
/// frames and is restarted once; the client stays (keeping the modem
/// wanted), reconnects, and ends after 1100 frames of the new instance.
pub const MODEM: &str = concat!(
    modem_component!("    restart 1\n    args report_every=500 crash_after=1200\n"),
    "\
component modemclient
    module modemclient
    priority 10
    memory 128K
    quota 64K
    uses modem at 20
    restart 0
    args restarts=1 frames=1100
"
);

/// Two CPUs at once: a ping on each CPU calls the one `echo` (its handler
/// runs on each caller's CPU in turn), `notifier` on CPU 0 ups a semaphore
/// 10,000 times for `waiter` on CPU 1, and `rtc` takes its interrupts on
/// CPU 1.
pub const SMP_IPC: &str = concat!(
    echo_server!(),
    "\
component ping0
    module ping
    priority 10
    cpu 0
    memory 256K
    quota 64K
    uses echo at 20
    args calls=10000
component ping1
    module ping
    priority 10
    cpu 1
    memory 256K
    quota 64K
    uses echo at 20
    args calls=10000
component waiter
    module waiter
    priority 20
    cpu 1
    memory 128K
    quota 64K
    args count=10000 then-none
component notifier
    module notifier
    priority 10
    cpu 0
    memory 128K
    quota 64K
    args count=10000 interval_ms=0
semaphore tick up notifier at 21 down waiter at 21
",
    rtc_driver!("    cpu 1\n"),
);

/// `testvmm` runs a spinning vCPU on CPU 1 while its second EC, on CPU 0,
/// pokes it and then destroys its VM.
pub const SMP_VCPU: &str = concat!(
    echo_server!(),
    "\
component testvmm
    module testvmm
    priority 10
    cpu 1
    memory 1M
    quota 512K
    uses echo at 20
    restart 0
    args remote-cpu=0
"
);

/// A hostile `fuzzer` on each of two CPUs at once (their own seeds,
/// 30,000 calls each: Bochs needs ~2 minutes on a shared machine)
/// beside a `ticker` on CPU 0 that must keep its period.
pub const SMP_FUZZER: &str = "\
component ticker
    module ticker
    priority 20
    memory 128K
    quota 64K
    args count=100 period_ms=20
component fuzzer0
    module fuzzer
    priority 10
    cpu 0
    memory 256K
    quota 64K
    restart 0
    args seed=0x5eed calls=30000
component fuzzer1
    module fuzzer
    priority 10
    cpu 1
    memory 256K
    quota 64K
    restart 0
    args seed=0x5eee calls=30000
";

/// `borrower` on CPU 0 has the page it borrowed revoked while its second
/// EC, on CPU 1, reads the page in a loop: the reader's next read faults.
pub const SMP_SHOOTDOWN: &str = "\
component lender
    module lender
    priority 20
    memory 256K
    quota 64K
    provides lender
component borrower
    module borrower
    priority 10
    cpu 0
    memory 128K
    quota 64K
    uses lender at 20
    restart 0
    args reader-cpu=1
";

/// A VMM booting the Multiboot test kernel `mbtest` (guests/mbtest) as
/// the component `$name` from the kernel module `$kernel` in `$ram` of RAM,
/// with two modules, a command line and the isa-debug-exit device.
macro_rules! multiboot_vmm {
    ($name:literal, $kernel:literal, $ram:literal) => {
        concat!(
            "component ",
            $name,
            "
    module vmm
    priority 10
    ceiling 30
    memory 2M
    stack 64K
    quota 4M
    restart 0
    ram guest ",
            $ram,
            " at 0x10000000000
    ram heap 4M at 0x20000000000
    file kernel ",
            $kernel,
            " at 0x30000000000
    file mod1 mbmod1 at 0x31000000000
    file mod2 mbmod2 at 0x32000000000
    file cmdline mbcmdline at 0x33000000000
    file modcmdlines mbmodcmdlines at 0x34000000000
    args debug-exit
"
        )
    };
}

/// The Multiboot test kernel under the VMM, alone: its isa-debug-exit
/// value becomes the machine's (system tests `multiboot`, `multiboot_elf`).
pub const MULTIBOOT: &str = multiboot_vmm!("mbguest", "mbtest", "16M");

/// Guests the VMM must refuse, each with a clear error, beside `ticker`,
/// which counts on: a truncated bzImage, a bzImage in 4 MiB of RAM, and
/// Multiboot kernels with a bad checksum, load addresses outside RAM and
/// the entry point outside the image (system test `bad_guests`).
pub const BAD_GUESTS: &str = concat!(
    "\
component ticker
    module ticker
    priority 20
    memory 128K
    quota 64K
    args count=100 period_ms=100
component truncated
    module vmm
    priority 10
    ceiling 30
    memory 2M
    stack 64K
    quota 4M
    restart 0
    ram guest 16M at 0x10000000000
    ram heap 4M at 0x20000000000
    file kernel bzImage.truncated at 0x30000000000
    file initrd initramfs.cpio at 0x31000000000
component toobig
    module vmm
    priority 10
    ceiling 30
    memory 2M
    stack 64K
    quota 4M
    restart 0
    ram guest 4M at 0x10000000000
    ram heap 4M at 0x20000000000
    file kernel bzImage at 0x30000000000
    file initrd initramfs.cpio at 0x31000000000
",
    multiboot_vmm!("badsum", "mbtest.badsum", "16M"),
    multiboot_vmm!("badload", "mbtest.badload", "16M"),
    multiboot_vmm!("badentry", "mbtest.badentry", "16M"),
);

/// A bare-metal hostile guest (`guests/hostile`) under `vmm`: 32 MiB of
/// RAM, its command line (seed and count) as the module `$cmdline` (also
/// given as the initrd, which the VMM requires), the VM given `echo` so
/// that some hypercalls reach a live portal; a triple fault stops it.
macro_rules! hostile_vmm {
    ($name:literal, $cmdline:literal, $disk:literal) => {
        concat!(
            "component ",
            $name,
            "
    module vmm
    priority 10
    ceiling 30
    memory 2M
    stack 64K
    quota 8M
    restart 0
    ram guest 32M at 0x10000000000
    ram heap 4M at 0x20000000000
    file kernel hostile at 0x30000000000
    file initrd ",
            $cmdline,
            " at 0x31000000000
    file cmdline ",
            $cmdline,
            " at 0x33000000000
",
            $disk,
            "    uses echo at 20
    args epoch=1764000000 vm-portals=20 on-triple-fault=stop
"
        )
    };
}

/// Two hostile guests side by side (one with a disk), each making its
/// seeded actions against its own VMM, beside `echo` (which both VMs may
/// call) and a `ticker` above them that must count on without a gap.
macro_rules! hostile_system {
    () => {
        concat!(
            echo_server!(),
            "\
component ticker
    module ticker
    priority 20
    memory 128K
    quota 64K
    args count=100 period_ms=20
",
            hostile_vmm!(
                "hostile_a",
                "cmdline_a",
                "    file disk disk.img at 0x32000000000\n"
            ),
            hostile_vmm!("hostile_b", "cmdline_b", "")
        )
    };
}

pub const HOSTILE: &str = hostile_system!();

/// `HOSTILE` with the real-time `modem` beside the hostile guests
/// (`hostile_modem`, opt-in: it misses frames today, issue 11).
pub const HOSTILE_MODEM: &str = concat!(
    hostile_system!(),
    modem_component!("    args report_every=1000\n"),
);

/// The `blk` driver on QEMU's virtio-blk device, serving two clients
/// through the regions `c0` and `c1`; `$disks` gives their sectors.
macro_rules! blk_driver {
    ($disks:literal) => {
        concat!(
            "\
component blk
    module blk
    priority 20
    memory 256K
    quota 128K
    restart 0
    pci dev 1af4:1042 at 0x20000000000
    dma dma 32K at 0x30000000000
    shared c0 64K at 0x10000000000
    shared c1 64K at 0x11000000000
    args ",
            $disks,
            "\n"
        )
    };
}

/// A `blktest` client named `$name` on the block service's region
/// `$region`.
macro_rules! blktest_client {
    ($name:literal, $region:literal) => {
        concat!(
            "component ",
            $name,
            "\n    module blktest\n    priority 10\n    memory 128K\n    quota 64K\n    \
             restart 0\n    shared ",
            $region,
            " 64K at 0x10000000000\n    args name=",
            $name,
            " region=",
            $region,
            "\n"
        )
    };
}

/// The block service on QEMU's virtio-blk device (a 2 MiB image): client
/// `blktest-a` owns sectors 0..2048, `blktest-b` 2048..4096; each has a
/// 64 KiB region shared with `blk` only, and a reply semaphore.
pub const BLK: &str = concat!(
    blk_driver!("c0.disk=0,2048 c1.disk=2048,2048"),
    blktest_client!("blktest-a", "c0"),
    blktest_client!("blktest-b", "c1"),
    "\
semaphore blkreq up blktest-a at 30 up blktest-b at 30 down blk at 30
semaphore areply up blk at 31 down blktest-a at 31
semaphore breply up blk at 32 down blktest-b at 31
"
);

/// The Linux guest whose virtio disk is the block service's (QEMU's
/// virtio-blk device on the 1 MiB test disk image): the guest's VMM is
/// client `c0` with sectors 0..1536, a native `blktest` beside it client
/// `c1` with sectors 1536..2048; each region is shared with `blk` alone.
pub const VMM_BLK: &str = concat!(
    linux_neighbours!(),
    clock_driver!(),
    blk_driver!("c0.disk=0,1536 c1.disk=1536,512"),
    blktest_client!("blktest", "c1"),
    linux_vmm!(),
    "\
    file cmdline cmdline at 0x33000000000
    shared c0 64K at 0x34000000000
    uses echo at 20
    uses modem at 21
    uses clock at 22
    args clock=22 modem=21 vm-portals=20 user-hypercalls blk=c0
irq 255 to linux
semaphore blkreq up linux at 30 up blktest at 30 down blk at 30
semaphore guestdisk up blk at 31 down linux at 31
semaphore testdisk up blk at 32 down blktest at 31
"
);

/// The block service crashed and restarted under a running guest (test
/// `blk_restart`): `blk` as in [`VMM_BLK`] with the guest's VMM its only
/// client, restarted up to three times, its first instance crashing on
/// purpose when it is to serve a read of the guest's sector 1500 (which
/// the guest's first disk check reads).
pub const BLK_RESTART: &str = concat!(
    linux_neighbours!(),
    clock_driver!(),
    "\
component blk
    module blk
    priority 20
    memory 256K
    quota 128K
    restart 3 backoff 10ms
    pci dev 1af4:1042 at 0x20000000000
    dma dma 32K at 0x30000000000
    shared c0 64K at 0x10000000000
    args c0.disk=0,1536 crash-sector=1500
",
    linux_vmm!(),
    "\
    file cmdline cmdline at 0x33000000000
    shared c0 64K at 0x34000000000
    uses echo at 20
    uses modem at 21
    uses clock at 22
    args clock=22 modem=21 vm-portals=20 user-hypercalls blk=c0
irq 255 to linux
semaphore blkreq up linux at 30 down blk at 30
semaphore guestdisk up blk at 31 down linux at 31
"
);

/// The Linux guest on a port of the virtual switch (`net`, on QEMU's
/// virtio-net device, user networking as the uplink), beside two native
/// components with ports of their own: `peer`, which answers ARP and ping
/// at 10.0.2.20, `hostile`, which sends what the switch must drop and
/// must never receive a frame for the others, and `broken`, whose
/// transmit ring the switch must give up on. Each region is shared with
/// `net` alone; `net` waits on one semaphore (`netsw`) that every client
/// and the device's MSI up.
pub const VMM_NET: &str = concat!(
    linux_neighbours!(),
    clock_driver!(),
    "\
component net
    module net
    priority 20
    memory 256K
    quota 128K
    restart 0
    pci dev 1af4:1041 at 0x20000000000
    dma dma 136K at 0x30000000000
    shared n0 132K at 0x10000000000
    shared n1 132K at 0x11000000000
    shared n2 132K at 0x12000000000
    shared n3 132K at 0x13000000000
    args n0.mac=52:54:00:12:34:56 n1.mac=52:54:00:00:00:20 n2.mac=52:54:00:00:00:66 n3.mac=52:54:00:00:00:77
component peer
    module netpeer
    priority 10
    memory 256K
    quota 64K
    restart 0
    shared n1 132K at 0x10000000000
    args name=peer port=n1 mode=echo mac=52:54:00:00:00:20 ip=10.0.2.20
component hostile
    module netpeer
    priority 10
    memory 256K
    quota 64K
    restart 0
    shared n2 132K at 0x10000000000
    args name=hostile port=n2 mode=hostile mac=52:54:00:00:00:66 victims=52:54:00:12:34:56,52:54:00:00:00:20
component broken
    module netpeer
    priority 10
    memory 256K
    quota 64K
    restart 0
    shared n3 132K at 0x10000000000
    args name=broken port=n3 mode=broken mac=52:54:00:00:00:77
",
    linux_vmm!(),
    "\
    file disk disk.img at 0x32000000000
    file cmdline cmdline at 0x33000000000
    shared n0 132K at 0x34000000000
    uses echo at 20
    uses modem at 21
    uses clock at 22
    args clock=22 modem=21 vm-portals=20 user-hypercalls net=n0 mac=52:54:00:12:34:56
irq 255 to linux
semaphore netsw updown net at 30 up linux at 32 up peer at 30 up hostile at 30 up broken at 30
semaphore guestnet up net at 31 down linux at 33
semaphore peernet up net at 32 down peer at 31
semaphore hostilenet up net at 33 down hostile at 31
semaphore brokennet up net at 34 down broken at 31
"
);

/// The switch crashed and restarted under a running guest (test
/// `net_restart`): `net` as in [`VMM_NET`] with only `peer` beside the
/// guest, restarted up to three times, and crashing on purpose when a
/// client sends a frame of 1276 bytes (the guest's `ping -s 1234`).
pub const NET_RESTART: &str = concat!(
    linux_neighbours!(),
    clock_driver!(),
    "\
component net
    module net
    priority 20
    memory 256K
    quota 128K
    restart 3 backoff 10ms
    pci dev 1af4:1041 at 0x20000000000
    dma dma 136K at 0x30000000000
    shared n0 132K at 0x10000000000
    shared n1 132K at 0x11000000000
    args n0.mac=52:54:00:12:34:56 n1.mac=52:54:00:00:00:20 crash-len=1276
component peer
    module netpeer
    priority 10
    memory 256K
    quota 64K
    restart 0
    shared n1 132K at 0x10000000000
    args name=peer port=n1 mode=echo mac=52:54:00:00:00:20 ip=10.0.2.20
",
    linux_vmm!(),
    "\
    file disk disk.img at 0x32000000000
    file cmdline cmdline at 0x33000000000
    shared n0 132K at 0x34000000000
    uses echo at 20
    uses modem at 21
    uses clock at 22
    args clock=22 modem=21 vm-portals=20 user-hypercalls net=n0 mac=52:54:00:12:34:56
irq 255 to linux
semaphore netsw updown net at 30 up linux at 32 up peer at 30
semaphore guestnet up net at 31 down linux at 33
semaphore peernet up net at 32 down peer at 31
"
);

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [&str; 34] = [
        STALL,
        IPC_PINGPONG,
        SUPERVISION,
        SEMAPHORE,
        INTERRUPT,
        ROUND_ROBIN,
        LINUX,
        LINUX_PANIC,
        MODEM,
        SERVER_DIES,
        CALLER_DIES,
        DELEGATE_REVOKE,
        FUZZER,
        FUZZER_LONG,
        QUOTA,
        BENCH_IPC,
        BENCH_SMP1,
        BENCH_SMP2,
        BENCH_SMP4,
        BENCH_SMP_WAKEUP,
        BENCH_EXITS,
        TESTVM,
        SMP_IPC,
        SMP_SHOOTDOWN,
        SMP_VCPU,
        SMP_FUZZER,
        MULTIBOOT,
        BAD_GUESTS,
        HOSTILE,
        BLK,
        VMM_BLK,
        VMM_NET,
        NET_RESTART,
        BLK_RESTART,
    ];

    /// The components each manifest names, in order.
    fn components(manifest: &str) -> Vec<&str> {
        manifest
            .lines()
            .filter_map(|l| l.strip_prefix("component "))
            .collect()
    }

    #[test]
    fn every_component_names_its_module_and_the_basics() {
        for manifest in ALL {
            let entries: Vec<&str> = manifest.split("component ").skip(1).collect();
            assert!(!entries.is_empty());
            for entry in entries {
                let name = entry.lines().next().unwrap();
                for key in ["module", "priority", "memory", "quota"] {
                    assert!(
                        entry.lines().any(|l| l.trim_start().starts_with(key)),
                        "{name}: no {key}"
                    );
                }
                let module = entry
                    .lines()
                    .find_map(|l| l.trim_start().strip_prefix("module "))
                    .unwrap_or("");
                assert!(
                    crate::build::USER_TASKS.iter().any(|t| t.binary == module),
                    "{name}: module {module} is no user task"
                );
            }
        }
    }

    #[test]
    fn users_have_providers() {
        for manifest in ALL {
            for line in manifest.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("uses ") {
                    let portal = rest.split_whitespace().next().unwrap();
                    assert!(
                        manifest.contains(&format!("provides {portal}\n")),
                        "nobody provides {portal}"
                    );
                }
            }
        }
        assert_eq!(components(IPC_PINGPONG), ["echo", "ping"]);
    }
}
