//! Host tests of the views: round trips, garbage, and the README.

use super::*;
use core::fmt::Debug;

/// xorshift64: a seeded, repeatable stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Mostly values at the edges of the ranges the calls check.
    fn register(&mut self) -> u64 {
        const EDGES: [u64; 16] = [
            0,
            1,
            2,
            3,
            4,
            63,
            64,
            255,
            256,
            512,
            513,
            4096,
            4097,
            65536,
            1 << 20,
            10_000_000,
        ];
        match self.next() % 8 {
            0 => self.next(),
            1 => u64::MAX - self.next() % 4,
            2 => layout::USER_END - PAGE_SIZE * (self.next() % 3) + self.next() % 2,
            3 => ((self.next() % 64) * PAGE_SIZE) | (self.next() % 2 * (self.next() & 0xfff)),
            _ => EDGES[(self.next() % 16) as usize] + self.next() % 2,
        }
    }

    fn args(&mut self) -> [u64; 6] {
        core::array::from_fn(|_| self.register())
    }
}

fn round_trips<V: Syscall + PartialEq + Debug>(view: V) {
    let (word, args) = view.encode();
    assert_eq!(word.number, V::CALL.number());
    assert_eq!(CallWord::decode(word.encode()), word, "{view:?}");
    assert_eq!(V::decode(word, args), Ok(view));
}

#[test]
fn every_view_round_trips() {
    let mut rng = Rng(0x0005_eed0_fab1);
    for _ in 0..2000 {
        let sel = rng.next() & crate::SELECTOR_MAX;
        let bit = rng.next() & 1 == 1;
        let a = rng.args();
        round_trips(ConsoleWrite {
            raw: bit,
            address: a[0],
            len: ConsoleLen::new((a[1] % 4097) as u16).unwrap().into(),
        });
        round_trips(Exit { code: a[0] });
        round_trips(IpcCall {
            portal: sel,
            nonblock: bit,
            words: a,
        });
        round_trips(Reply { words: a });
        round_trips(CreatePd {
            dst: sel,
            vm: bit,
            user_hypercalls: rng.next() & 1 == 1,
            owner: a[0],
            quota_bytes: a[1],
            capacity: Capacity::new((a[2] % (1 << 20)) as u32 + 1).unwrap().into(),
            ceiling: Ceiling::new((a[3] % 64) as u8).unwrap().into(),
        });
        round_trips(CreateEc {
            dst: sel,
            handler: bit,
            pd: a[0],
            rip: a[1],
            rsp: a[2],
            utcb: UserPage::new(PAGE_SIZE * (1 + a[3] % 1000)).unwrap().into(),
            cpu: if a[4].is_multiple_of(5) {
                Cpu::OfCaller
            } else {
                Cpu::Number((a[4] % 0xfff) as u16)
            },
            exception_portal: Some(a[5]).filter(|&sel| sel != u64::MAX),
            ec_id: a[0] ^ a[1],
        });
        round_trips(CreateSc {
            dst: sel,
            owner: a[0],
            ec: a[1],
            priority: Priority::new((a[2] % 64) as u8).unwrap().into(),
            budget: BudgetUs::new((a[3] % 10_000_000) as u32 + 1)
                .unwrap()
                .into(),
        });
        round_trips(CreatePt {
            dst: sel,
            owner: a[0],
            ec: a[1],
            entry: a[2],
            id: a[3],
        });
        round_trips(CreateSm {
            dst: sel,
            owner: a[0],
            count: a[1],
        });
        round_trips(SmUp { sm: sel });
        round_trips(SmDown {
            sm: sel,
            nonblock: bit,
            deadline_tsc: a[0],
        });
        let space = Space::try_from(a[0] % 4).unwrap();
        let count = CapCount::new((a[3] % 65536) as u32 + 1).unwrap();
        round_trips(Delegate {
            dst_pd: sel,
            space: space.into(),
            src: a[1],
            dst: a[2],
            count: count.into(),
            rights: (a[4] as u8).into(),
        });
        round_trips(Revoke {
            include_self: bit,
            space,
            base: a[1] % (u64::MAX - 65536),
            count,
        });
        round_trips(IrqAssign {
            sm: sel,
            key: a[0],
            mode: IrqMode::from_bits_truncate(a[1] as u8).into(),
        });
        round_trips(IrqUnmask { key: a[0] });
        round_trips(CreateVcpu {
            dst: sel,
            vm: a[0],
            state: UserPage::new(layout::USER_END - PAGE_SIZE * (1 + a[1] % 1000))
                .unwrap()
                .into(),
        });
        round_trips(VcpuRun { vcpu: sel });
        round_trips(VcpuPoke { vcpu: sel });
        round_trips(MapDevice {
            first_frame: a[0],
            vpn: a[1],
            count: DevicePages::new((a[2] % 512) as u16 + 1).unwrap().into(),
        });
        round_trips(MemPhys { vpn: a[0] });
    }
}

/// What a decoded view re-encodes to must decode to the same view: the
/// view keeps every bit of the registers the kernel reads.
fn stable<V: Syscall + PartialEq + Debug>(word: CallWord, args: [u64; 6]) -> Option<V> {
    let view = V::decode(word, args).ok()?;
    let (again_word, again_args) = view.encode();
    assert_eq!(V::decode(again_word, again_args).as_ref(), Ok(&view));
    Some(view)
}

fn expect_range(raw: u64, range: core::ops::RangeInclusive<u64>, status: Status) -> Status {
    if range.contains(&raw) {
        Status::Success
    } else {
        status
    }
}

fn status_of<T>(result: Result<T, Status>) -> Status {
    result.err().unwrap_or(Status::Success)
}

/// Garbage in every register: decoding never panics, and each check
/// fails with the status the kernel's check had before the views.
#[test]
fn garbage_decodes_to_the_kernels_status() {
    let mut rng = Rng(0xdead_beef_1234_5678);
    for _ in 0..100_000 {
        let number = (rng.next() % 24) as u8;
        let word = CallWord {
            number,
            flags: rng.next() as u8,
            selector: rng.next() & crate::SELECTOR_MAX,
        };
        let a = rng.args();
        let Ok(call) = Call::try_from(number) else {
            assert!(ConsoleWrite::decode(word, a).is_err());
            continue;
        };
        let bad = Status::BadParameter;
        match call {
            Call::ConsoleWrite => {
                let v = stable::<ConsoleWrite>(word, a).unwrap();
                assert_eq!(v.raw, word.flags & flags::RAW != 0);
                assert_eq!(v.address, a[0]);
                let want = expect_range(a[1], 0..=CONSOLE_WRITE_MAX as u64, bad);
                assert_eq!(status_of(v.len.check()), want);
            }
            Call::Exit => assert_eq!(stable::<Exit>(word, a).unwrap().code, a[0]),
            Call::Call => {
                let v = stable::<IpcCall>(word, a).unwrap();
                assert_eq!((v.portal, v.words), (word.selector, a));
                assert_eq!(v.nonblock, word.flags & flags::NONBLOCK != 0);
            }
            Call::Reply => assert_eq!(stable::<Reply>(word, a).unwrap().words, a),
            Call::CreatePd => {
                let v = stable::<CreatePd>(word, a).unwrap();
                assert_eq!((v.dst, v.owner, v.quota_bytes), (word.selector, a[0], a[1]));
                assert_eq!(v.vm, word.flags & flags::VM != 0);
                assert_eq!(v.user_hypercalls, word.flags & flags::USER_HYPERCALLS != 0);
                let want = expect_range(a[2], 1..=1 << 20, bad);
                assert_eq!(status_of(v.capacity.check()), want);
                // The kernel compared with a ceiling of at most 63.
                let want = expect_range(a[3], 0..=63, Status::InsufficientRights);
                assert_eq!(status_of(v.ceiling.check()), want);
            }
            Call::CreateEc => {
                let v = stable::<CreateEc>(word, a).unwrap();
                assert_eq!(v.handler, word.flags & flags::HANDLER != 0);
                assert_eq!((v.pd, v.rip, v.rsp, v.ec_id), (a[0], a[1], a[2], a[5]));
                let page = a[3] - a[3] % PAGE_SIZE;
                let want = expect_range(page, PAGE_SIZE..=layout::USER_END - 1, bad);
                assert_eq!(status_of(v.utcb.check()), want);
                match v.cpu {
                    Cpu::OfCaller => assert_eq!(a[3] % PAGE_SIZE, CPU_OF_CALLER),
                    Cpu::Number(n) => assert_eq!(u64::from(n), a[3] % PAGE_SIZE),
                }
                assert_eq!(v.exception_portal.unwrap_or(u64::MAX), a[4]);
            }
            Call::CreateSc => {
                let v = stable::<CreateSc>(word, a).unwrap();
                assert_eq!((v.dst, v.owner, v.ec), (word.selector, a[0], a[1]));
                assert_eq!(
                    status_of(v.priority.check()),
                    expect_range(a[2], 0..=63, bad)
                );
                let want = expect_range(a[3], 1..=10_000_000, bad);
                assert_eq!(status_of(v.budget.check()), want);
            }
            Call::CreatePt => {
                let v = stable::<CreatePt>(word, a).unwrap();
                assert_eq!((v.owner, v.ec, v.entry, v.id), (a[0], a[1], a[2], a[3]));
            }
            Call::CreateSm => {
                let v = stable::<CreateSm>(word, a).unwrap();
                assert_eq!((v.dst, v.owner, v.count), (word.selector, a[0], a[1]));
            }
            Call::SmUp => assert_eq!(stable::<SmUp>(word, a).unwrap().sm, word.selector),
            Call::SmDown => {
                let v = stable::<SmDown>(word, a).unwrap();
                assert_eq!((v.sm, v.deadline_tsc), (word.selector, a[0]));
                assert_eq!(v.nonblock, word.flags & flags::NONBLOCK != 0);
            }
            Call::Delegate => {
                let v = stable::<Delegate>(word, a).unwrap();
                assert_eq!((v.dst_pd, v.src, v.dst), (word.selector, a[1], a[2]));
                assert_eq!(status_of(v.space.check()), expect_range(a[0], 0..=3, bad));
                assert_eq!(
                    status_of(v.count.check()),
                    expect_range(a[3], 1..=65536, bad)
                );
                assert_eq!(
                    status_of(v.rights.check()),
                    expect_range(a[4], 0..=255, bad)
                );
            }
            Call::Revoke => {
                let ok =
                    a[0] <= 3 && (1..=65536).contains(&a[2]) && a[1].checked_add(a[2]).is_some();
                match stable::<Revoke>(word, a) {
                    Some(v) => {
                        assert!(ok);
                        assert_eq!((v.space as u64, v.base), (a[0], a[1]));
                        assert_eq!(u64::from(v.count.get()), a[2]);
                        assert_eq!(v.include_self, word.flags & flags::SELF != 0);
                    }
                    None => {
                        assert!(!ok);
                        assert_eq!(Revoke::decode(word, a), Err(bad));
                    }
                }
            }
            Call::IrqAssign => {
                let v = stable::<IrqAssign>(word, a).unwrap();
                assert_eq!((v.sm, v.key), (word.selector, a[0]));
                assert_eq!(status_of(v.mode.check()), expect_range(a[1], 0..=3, bad));
            }
            Call::IrqUnmask => assert_eq!(stable::<IrqUnmask>(word, a).unwrap().key, a[0]),
            Call::CreateVcpu => {
                let v = stable::<CreateVcpu>(word, a).unwrap();
                assert_eq!((v.dst, v.vm), (word.selector, a[0]));
                let want = if a[1].is_multiple_of(PAGE_SIZE) {
                    expect_range(a[1], PAGE_SIZE..=layout::USER_END - 1, bad)
                } else {
                    bad
                };
                assert_eq!(status_of(v.state.check()), want);
            }
            Call::VcpuRun => {
                assert_eq!(stable::<VcpuRun>(word, a).unwrap().vcpu, word.selector)
            }
            Call::VcpuPoke => {
                assert_eq!(stable::<VcpuPoke>(word, a).unwrap().vcpu, word.selector)
            }
            Call::MapDevice => {
                let v = stable::<MapDevice>(word, a).unwrap();
                assert_eq!((v.first_frame, v.vpn), (a[0], a[1]));
                let ok = (1..=512).contains(&a[2])
                    && a[0]
                        .checked_add(a[2])
                        .and_then(|end| end.checked_mul(PAGE_SIZE))
                        .is_some()
                    && a[1].checked_add(a[2]).is_some();
                let want = if ok { Status::Success } else { bad };
                assert_eq!(status_of(v.checked_count()), want);
            }
            Call::MemPhys => assert_eq!(stable::<MemPhys>(word, a).unwrap().vpn, a[0]),
        }
    }
}

#[test]
fn a_view_refuses_another_calls_word() {
    let word = CallWord::new(Call::SmUp, 0, 5);
    assert_eq!(SmDown::decode(word, [0; 6]), Err(Status::BadCall));
    assert_eq!(SmUp::decode(word, [0; 6]), Ok(SmUp { sm: 5 }));
}

#[test]
fn results_read_the_status_and_the_outputs() {
    let regs = [1, 2, 3, 4, 5, 6];
    assert_eq!(MemPhys::result(0, regs), Ok(1));
    assert_eq!(
        IrqAssign::result(0, regs),
        Ok(MsiMessage {
            address: 1,
            data: 2
        })
    );
    assert_eq!(IpcCall::result(0, regs), Ok(regs));
    assert_eq!(
        IpcCall::result(Status::Dead.code(), regs),
        Err(Status::Dead)
    );
    assert_eq!(SmUp::result(9999, regs), Err(Status::BadCall));
    let mut out = [0; 6];
    MemPhys::write_output(&7, &mut out);
    IrqAssign::write_output(
        &MsiMessage {
            address: 8,
            data: 9,
        },
        &mut out,
    );
    assert_eq!(out, [8, 9, 0, 0, 0, 0]);
}

/// README.md's table of each call says which registers, flags and
/// selector it reads; the views must read exactly those.
mod readme {
    use super::super::*;

    const README: &str = include_str!("../../README.md");
    const REGISTERS: [&str; 6] = ["rdi", "rsi", "rdx", "r10", "r8", "r9"];
    const FLAGS: [(&str, u8); 6] = [
        ("NONBLOCK", flags::NONBLOCK),
        ("HANDLER", flags::HANDLER),
        ("SELF", flags::SELF),
        ("VM", flags::VM),
        ("USER_HYPERCALLS", flags::USER_HYPERCALLS),
        ("RAW", flags::RAW),
    ];

    /// What a view reads: the argument registers, the flag bits and
    /// whether the selector.
    #[derive(Debug, PartialEq, Eq)]
    struct Reads {
        registers: [bool; 6],
        flags: u8,
        selector: bool,
    }

    /// Decodes registers that are all valid and non-zero and encodes the
    /// view again: what it did not read comes back as zero.
    fn reads<V: Syscall>() -> Reads {
        let word = CallWord::new(V::CALL, 0xff, 7);
        let (again, args) = V::decode(word, [1, 2, 3, 4 * PAGE_SIZE + 1, 5, 6])
            .unwrap()
            .encode();
        Reads {
            registers: args.map(|arg| arg != 0),
            flags: again.flags,
            selector: again.selector != 0,
        }
    }

    fn view_reads(call: Call) -> Reads {
        match call {
            Call::ConsoleWrite => reads::<ConsoleWrite>(),
            Call::Exit => reads::<Exit>(),
            Call::Call => reads::<IpcCall>(),
            Call::Reply => reads::<Reply>(),
            Call::CreatePd => reads::<CreatePd>(),
            Call::CreateEc => reads::<CreateEc>(),
            Call::CreateSc => reads::<CreateSc>(),
            Call::CreatePt => reads::<CreatePt>(),
            Call::CreateSm => reads::<CreateSm>(),
            Call::SmUp => reads::<SmUp>(),
            Call::SmDown => reads::<SmDown>(),
            Call::Delegate => reads::<Delegate>(),
            Call::Revoke => reads::<Revoke>(),
            Call::IrqAssign => reads::<IrqAssign>(),
            Call::IrqUnmask => reads::<IrqUnmask>(),
            Call::CreateVcpu => reads::<CreateVcpu>(),
            Call::VcpuRun => reads::<VcpuRun>(),
            Call::VcpuPoke => reads::<VcpuPoke>(),
            Call::MapDevice => reads::<MapDevice>(),
            Call::MemPhys => reads::<MemPhys>(),
        }
    }

    /// The "in" rows of the call's table (until the next heading).
    fn readme_reads(call: Call) -> Reads {
        let heading = README
            .lines()
            .position(|line| line.starts_with(&format!("### {} — ", call.number())))
            .unwrap_or_else(|| panic!("no heading for {call:?}"));
        let mut found = Reads {
            registers: [false; 6],
            flags: 0,
            selector: false,
        };
        for line in README.lines().skip(heading + 1) {
            if line.starts_with("## ") || line.starts_with("### ") {
                break;
            }
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if cells.len() < 4 || cells[1] != "in" {
                continue;
            }
            match cells[2] {
                "`sel`" => found.selector = true,
                "`rdi`..`r9`" => found.registers = [true; 6],
                "flags" => {
                    for (name, bit) in FLAGS {
                        if cells[3].contains(&format!("`{name}`")) {
                            found.flags |= bit;
                        }
                    }
                }
                register => {
                    if let Some(i) = REGISTERS.iter().position(|r| register == format!("`{r}`")) {
                        found.registers[i] = true;
                    }
                }
            }
        }
        found
    }

    extern crate std;
    use std::{format, vec::Vec};

    #[test]
    fn the_readme_says_what_each_view_reads() {
        for call in Call::ALL {
            assert_eq!(readme_reads(call), view_reads(call), "{call:?}");
        }
    }
}
