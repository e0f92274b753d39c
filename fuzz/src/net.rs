//! The virtual switch's forwarding logic (`common::net::Switch`), fed
//! frames from any port: whatever the frames, a frame goes only where the
//! switch's rules allow — never back where it came from, unicast to a
//! client only if addressed to that client's fixed MAC, never flooded when
//! addressed to a client — and every frame is counted once.

use arbitrary::{Arbitrary, Unstructured};
use common::net::{Forward, Mac, Switch, ETH_HEADER, MAX_FRAME, MAX_PORTS};

use crate::for_each_op;

/// Addresses the inputs pick from often, so that learning and fixed
/// ports are hit, not only random bytes.
const KNOWN: [Mac; 5] = [
    [0x52, 0x54, 0, 0x12, 0x34, 0x56],
    [0x52, 0x54, 0, 0, 0, 0x20],
    [0x52, 0x55, 10, 0, 2, 2],
    [0xff; 6],
    [0x01, 0x00, 0x5e, 0, 0, 1],
];

#[derive(Arbitrary, Debug)]
struct Frame {
    from: u8,
    dst: Address,
    src: Address,
    len: u16,
    fill: u8,
}

#[derive(Arbitrary, Debug)]
enum Address {
    Known(u8),
    Any([u8; 6]),
}

impl Address {
    fn mac(&self) -> Mac {
        match self {
            Address::Known(i) => KNOWN[usize::from(*i) % KNOWN.len()],
            Address::Any(mac) => *mac,
        }
    }
}

pub fn switch(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let ports = usize::from(u.arbitrary::<u8>().unwrap_or(0)) % MAX_PORTS + 1;
    let mut switch = Switch::new(ports);
    // Ports 1 and 2 (if there) are clients with the first two addresses.
    let fixed: Vec<(usize, Mac)> = (1..ports.min(3)).map(|p| (p, KNOWN[p - 1])).collect();
    for &(port, mac) in &fixed {
        assert!(switch.fix(port, mac));
    }
    let mut frames = vec![0u64; MAX_PORTS + 1];
    for_each_op(&mut u, |f: Frame| {
        let from = usize::from(f.from) % (ports + 1);
        let len = usize::from(f.len) % (MAX_FRAME + 16);
        let mut bytes = vec![f.fill; len];
        let (dst, src) = (f.dst.mac(), f.src.mac());
        for (i, b) in dst.iter().chain(&src).enumerate().take(len) {
            bytes[i] = *b;
        }
        let destination = switch.destination(&bytes);
        assert!(destination.is_none_or(|to| to < ports), "no such port");
        let decision = switch.forward(from, &bytes);
        if from >= ports {
            assert!(
                matches!(decision, Forward::Drop(_)),
                "from a port that is not"
            );
            return;
        }
        frames[from] += 1;
        if len < ETH_HEADER || len > MAX_FRAME {
            assert!(
                matches!(decision, Forward::Drop(_)),
                "{len} bytes forwarded"
            );
        }
        match decision {
            Forward::Port(to) => {
                assert_eq!(destination, Some(to), "flow control looks elsewhere");
                assert_ne!(to, from, "back where it came from");
                assert!(to < ports);
                if let Some(&(_, mac)) = fixed.iter().find(|(p, _)| *p == to) {
                    assert_eq!(dst, mac, "unicast to a client not addressed");
                }
            }
            Forward::Flood => {
                assert!(
                    fixed.iter().all(|(_, mac)| *mac != dst),
                    "a client's frame flooded"
                );
            }
            Forward::Drop(_) => {}
        }
        if let Some(&(_, mac)) = fixed.iter().find(|(p, _)| *p == from) {
            if !matches!(decision, Forward::Drop(_)) {
                assert_eq!(src, mac, "a client sent from another address");
            }
        }
    });
    for (port, &sent) in frames.iter().enumerate().take(ports) {
        let stats = switch.stats(port);
        let dropped: u64 = stats.dropped.iter().sum();
        assert_eq!(stats.received + dropped, sent, "port {port}'s count");
    }
}
