//! `netpeer`: a native component with a port of the virtual switch (the
//! `net` component), through its shared region (`port=MAPPING`) and
//! semaphores (30: up the switch, 31: frames for us). Two modes:
//!
//! - `mode=echo ip=A.B.C.D`: a host on the wire at `mac=` and that IPv4
//!   address, answering ARP requests for it and ICMP echo requests to it
//!   (vdev's `EchoPeer`, the VMM's test fixture, here on a real port), so
//!   a guest can ping a native component;
//! - `mode=hostile victims=MAC,MAC`: first sends what a switch must drop —
//!   runts, frames longer than a frame may be (by a slot's length field,
//!   past the slot and inside it), group and zero source addresses, the
//!   victims' source addresses (spoofed) — and a burst of broadcasts, then
//!   listens: a frame addressed to a victim reaching it is a failure
//!   (`NAME: FAIL …`), since the switch must deliver unicast to its owner
//!   only;
//! - `mode=broken`: sends one good broadcast, then moves its transmit
//!   ring's head far past its tail (more frames than the ring holds) and
//!   tells the switch, which must ignore this port from then on and go on
//!   serving the others.
//!
//! Arguments: `name=NAME`, `port=MAPPING` and that mapping, `mac=MAC`,
//! the mode's, `tsc_hz`.
#![no_std]
#![no_main]

extern crate alloc;

use common::args;
use common::net::{self, parse_mac, Mac, MacText, MAX_FRAME};
use common::net_client::Port;
use moat_user::mmio::window_arg;
use moat_user::{println, sys};
use vdev::virtio::net::{EchoPeer, NetBackend};

moat_user::entry!(main);

const SWITCH_SM: u64 = 30;
const PORT_SM: u64 = 31;
/// Broadcasts the hostile client tries to send in its burst.
const BURST: u32 = 200;
/// An EtherType for local experiments (IEEE 802), which no host answers.
const ETHERTYPE_EXPERIMENTAL: u16 = 0x88b5;

fn main(args: &str) -> i32 {
    let name = args::value(args, "name").unwrap_or("netpeer");
    // SAFETY: the root task maps the `shared` region the argument names.
    let Some(region) = (unsafe { args::value(args, "port").and_then(|m| window_arg(args, m)) })
    else {
        println!("{name}: FAIL no port region");
        return 1;
    };
    let Some(mut port) = Port::new(region, SWITCH_SM) else {
        println!("{name}: FAIL the port region is too small");
        return 1;
    };
    let Some(mac) = args::value(args, "mac").and_then(parse_mac) else {
        println!("{name}: FAIL no mac=");
        return 1;
    };
    match args::value(args, "mode") {
        Some("echo") => echo(name, args, &mut port, mac),
        Some("hostile") => hostile(name, args, &mut port, mac),
        Some("broken") => broken(name, &mut port),
        _ => {
            println!("{name}: FAIL mode= is echo, hostile or broken");
            1
        }
    }
}

fn parse_ip(text: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = text.split('.');
    for byte in ip.iter_mut() {
        *byte = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

fn echo(name: &str, args: &str, port: &mut Port, mac: Mac) -> i32 {
    let Some(ip) = args::value(args, "ip").and_then(parse_ip) else {
        println!("{name}: FAIL no ip=");
        return 1;
    };
    let mut peer = EchoPeer::new(mac, ip);
    println!(
        "{name}: answering ARP and ping for {}.{}.{}.{} at {} on its switch port",
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        MacText::new(&mac).as_str()
    );
    let mut frame = [0u8; MAX_FRAME];
    let mut reported = 0;
    loop {
        if sys::sm_down(PORT_SM, 0, false).is_err() {
            println!("{name}: FAIL sm_down");
            return 1;
        }
        if let Some(starts) = port.switch_started().filter(|&s| s > 1) {
            println!("{name}: the switch restarted (start {starts}); carrying on");
        }
        while let Some(len) = port.receive(&mut frame) {
            peer.send(&frame[..len]);
            while let Some(reply) = peer.poll() {
                port.send(&reply);
            }
        }
        let answered = peer.answered();
        if answered > reported && answered.is_power_of_two() {
            println!("{name}: {answered} requests answered");
        }
        reported = answered;
    }
}

/// A maximum-size Ethernet frame from `src`, to be cut to length.
fn frame(dst: Mac, src: Mac) -> [u8; MAX_FRAME] {
    let mut f = [0x5a; MAX_FRAME];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ETHERTYPE_EXPERIMENTAL.to_be_bytes());
    f
}

/// Writes a raw slot: a length field that need not match what follows.
fn raw_slot(port: &mut Port, len_field: u32) {
    let region = *port.region();
    let head = region.read::<u32>(net::TX_HEAD as u64);
    let at = net::slot(net::TX_RING, head) as u64;
    region.write::<u32>(at, len_field);
    region.write::<u32>(net::TX_HEAD as u64, head.wrapping_add(1));
    port.notify();
}

fn hostile(name: &str, args: &str, port: &mut Port, mac: Mac) -> i32 {
    let mut victims = [[0u8; 6]; 4];
    let mut count = 0;
    for text in args::value(args, "victims").unwrap_or("").split(',') {
        if let (Some(victim), true) = (parse_mac(text), count < victims.len()) {
            victims[count] = victim;
            count += 1;
        }
    }
    let victims = &victims[..count];
    let tsc_hz = args::tsc_hz(args);
    let pause = || {
        let deadline = moat_user::rdtsc().saturating_add(tsc_hz / 100);
        let _ = sys::sm_down(PORT_SM, deadline, false);
    };
    let mut sent = 0u32;
    let mut burst = 0u32;
    // Runts.
    for len in [0, 1, 13] {
        sent += u32::from(port.send(&frame(net::BROADCAST, mac)[..len]));
    }
    pause();
    // Lengths past the slot and past a frame: the port's own send refuses
    // the first, so the ring is written raw; then a frame one byte long.
    raw_slot(port, 0xffff_fff0);
    raw_slot(port, (net::SLOT - 8) as u32);
    raw_slot(port, (MAX_FRAME + 1) as u32);
    sent += 3;
    // The port takes up the ring where the raw writes left it.
    let Some(resumed) = Port::new(*port.region(), SWITCH_SM) else {
        return 1;
    };
    *port = resumed;
    pause();
    // Group and zero sources, and the victims' addresses as ours.
    let multicast = [0x01, 0x00, 0x5e, 0, 0, 1];
    for src in [net::BROADCAST, multicast, [0; 6]] {
        sent += u32::from(port.send(&frame(net::BROADCAST, src)[..64]));
    }
    for victim in victims {
        sent += u32::from(port.send(&frame(net::BROADCAST, *victim)[..64]));
        sent += u32::from(port.send(&frame(*victim, *victim)[..64]));
    }
    pause();
    // A burst of broadcasts from our own address: legal, but more than
    // the rings hold (what does not fit is dropped, somewhere).
    for _ in 0..BURST {
        if port.send(&frame(net::BROADCAST, mac)[..60]) {
            burst += 1;
        } else {
            pause();
        }
    }
    println!(
        "{name}: {sent} malformed or spoofed frames and {burst} of {BURST} broadcasts sent; listening"
    );
    let mut buf = [0u8; MAX_FRAME];
    let mut seen = 0u64;
    loop {
        if sys::sm_down(PORT_SM, 0, false).is_err() {
            println!("{name}: FAIL sm_down");
            return 1;
        }
        while let Some(len) = port.receive(&mut buf) {
            seen += 1;
            let dst: Mac = buf[..6].try_into().unwrap_or([0; 6]);
            if len >= net::ETH_HEADER && victims.contains(&dst) {
                println!(
                    "{name}: FAIL received a frame for {} (the switch must send it to its owner only)",
                    MacText::new(&dst).as_str()
                );
            }
            if seen.is_power_of_two() && seen >= 8 {
                println!("{name}: {seen} frames received, none for another port");
            }
        }
    }
}

fn broken(name: &str, port: &mut Port) -> i32 {
    let region = *port.region();
    let mut good = [0x5a; 60];
    good[..6].copy_from_slice(&net::BROADCAST);
    good[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 0x77]);
    port.send(&good);
    let tail = region.read::<u32>(net::TX_TAIL as u64);
    region.write::<u32>(net::TX_HEAD as u64, tail.wrapping_add(1000));
    port.notify();
    println!("{name}: transmit ring head moved 1000 past its tail");
    0
}
