//! The virtual switch's shared-memory protocol (the `net` component and
//! its clients: each guest's VMM, native components with a port) and the
//! switch's forwarding logic: a learning L2 switch whose client ports
//! have a fixed MAC address each.
//!
//! Each client has a region of its own, shared with the switch only:
//!
//! | offset | what |
//! | --- | --- |
//! | 0x000 | `tx_head` (u32, client), `tx_tail` (u32, switch) |
//! | 0x008 | `rx_head` (u32, switch), `rx_tail` (u32, client) |
//! | 0x010 | `switch_starts` (u32, switch): bumped by each start of the switch |
//! | 0x014 | `rx_wanted` (u32, switch sets, client clears): a frame for the client waits for room in its rx ring |
//! | 0x018 | `tx_wanted` (u32, client sets, switch clears): the client waits for room in its tx ring |
//! | 0x1000 | tx ring: [`RING`] slots of [`SLOT`] bytes, client → switch |
//! | 0x1000 + RING × SLOT | rx ring: [`RING`] slots, switch → client |
//!
//! A slot is a u32 frame length, then the Ethernet frame (destination,
//! source, type, payload; no preamble, no FCS). Heads and tails count up
//! for ever (wrapping u32); slot `i` is `i % RING`. The producer writes a
//! slot, then bumps its head, then ups the other side's semaphore; the
//! consumer copies the slot out before it looks at it (the other side may
//! change it at any time), then bumps its tail. A full ring is the
//! producer's to handle, by flow control rather than loss: the producer
//! sets the ring's `*_wanted` word, looks at the ring once more (the
//! consumer may have taken a slot meanwhile), and waits; a consumer that
//! takes a slot and finds the word set clears it and ups the producer's
//! semaphore. The switch waits for a client only a bounded time
//! (`net`'s `HOLD_MS`), holding the frame where it is — in the device's
//! receive queue or the sender's transmit ring —, then drops it (counted)
//! and for a second after that drops frames for that client at once
//! when its ring is full, so a client that keeps its ring full holds up
//! the others for at most a fiftieth of the time. A frame shorter than an Ethernet header, longer than
//! [`MAX_FRAME`], or with a group or zero source address is dropped and
//! counted; so is one whose source is not its port's MAC (spoofed). A
//! ring whose head is further ahead of its tail than [`RING`] is broken:
//! the switch ignores that client from then on.
//!
//! The region outlives the switch: a restarted switch resumes both rings
//! at the indices it finds, bumps `switch_starts` and ups every client's
//! semaphore, so a client learns of the restart (frames the old switch
//! held, and what it learned, are lost) and carries on.

pub const RING: u32 = 32;
pub const SLOT: usize = 2048;
pub const TX_HEAD: usize = 0x00;
pub const TX_TAIL: usize = 0x04;
pub const RX_HEAD: usize = 0x08;
pub const RX_TAIL: usize = 0x0c;
pub const SWITCH_STARTS: usize = 0x10;
pub const RX_WANTED: usize = 0x14;
pub const TX_WANTED: usize = 0x18;
pub const TX_RING: usize = 0x1000;
pub const RX_RING: usize = TX_RING + RING as usize * SLOT;
/// The smallest region that holds both rings.
pub const REGION: usize = RX_RING + RING as usize * SLOT;
/// An Ethernet header: destination, source, type.
pub const ETH_HEADER: usize = 14;
/// The largest frame: 1500 bytes of payload, the header and a VLAN tag.
pub const MAX_FRAME: usize = 1518;
/// Most ports a switch has: the uplink and seven clients.
pub const MAX_PORTS: usize = 8;
/// Learned addresses the switch keeps (the clients' own are fixed).
pub const TABLE: usize = 64;
/// Learned addresses one port may hold, so that no port can push out
/// every other's.
pub const LEARNED_PER_PORT: usize = 32;

pub type Mac = [u8; 6];
pub const BROADCAST: Mac = [0xff; 6];

/// Where slot `index` of the ring at `base` lies.
pub fn slot(base: usize, index: u32) -> usize {
    base + (index % RING) as usize * SLOT
}

/// Frames waiting in a ring with these indices, or `None` if the
/// producer's index is further ahead than a ring holds (a broken peer).
pub fn pending(head: u32, tail: u32) -> Option<u32> {
    let n = head.wrapping_sub(tail);
    (n <= RING).then_some(n)
}

/// Whether a frame of `len` bytes (from a slot's length field) may be
/// copied out of a slot at all.
pub fn fits_slot(len: u32) -> bool {
    len as usize <= SLOT - 4
}

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Shorter than an Ethernet header.
    Runt,
    /// Longer than [`MAX_FRAME`].
    Oversized,
    /// A group (multicast/broadcast) or all-zero source address.
    BadSource,
    /// A source address that is not the port's own, or that is another
    /// port's.
    Spoofed,
    /// For the port it came from (nowhere to go).
    Hairpin,
    /// The destination port's ring (or the device's queue) was full.
    Full,
}

impl Drop {
    pub const ALL: [Drop; 6] = [
        Drop::Runt,
        Drop::Oversized,
        Drop::BadSource,
        Drop::Spoofed,
        Drop::Hairpin,
        Drop::Full,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Drop::Runt => "runt",
            Drop::Oversized => "oversized",
            Drop::BadSource => "bad source",
            Drop::Spoofed => "spoofed",
            Drop::Hairpin => "hairpin",
            Drop::Full => "ring full",
        }
    }
}

/// What the switch does with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// To this port only.
    Port(usize),
    /// To every port but the one it came from.
    Flood,
    Drop(Drop),
}

/// A port's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames accepted from the port.
    pub received: u64,
    /// Frames handed to the port.
    pub sent: u64,
    /// Frames from the port dropped, by [`Drop`] (index in [`Drop::ALL`]);
    /// `Full` counts frames for this port that did not fit.
    pub dropped: [u64; 6],
}

impl PortStats {
    pub fn dropped(&self, why: Drop) -> u64 {
        self.dropped[Drop::ALL.iter().position(|&d| d == why).unwrap_or(0)]
    }
}

#[derive(Clone, Copy, Debug)]
struct Learned {
    mac: Mac,
    port: usize,
    /// The switch's frame count when last seen (for replacing the oldest).
    seen: u64,
}

/// A learning switch: ports 0..`ports`; a port with a fixed MAC (a
/// client's, from the manifest) sends only from that address and is the
/// only port that address reaches; other ports (the uplink) are learned.
pub struct Switch {
    ports: usize,
    fixed: [Option<Mac>; MAX_PORTS],
    table: [Option<Learned>; TABLE],
    stats: [PortStats; MAX_PORTS],
    frames: u64,
}

pub fn is_group(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}

impl Switch {
    /// A switch of `ports` ports (at most [`MAX_PORTS`]), none fixed.
    pub fn new(ports: usize) -> Self {
        Self {
            ports: ports.min(MAX_PORTS),
            fixed: [None; MAX_PORTS],
            table: [None; TABLE],
            stats: [PortStats::default(); MAX_PORTS],
            frames: 0,
        }
    }

    pub fn ports(&self) -> usize {
        self.ports
    }

    /// Gives `port` the fixed address `mac`; false if the port does not
    /// exist or the address is a group one or another port's.
    pub fn fix(&mut self, port: usize, mac: Mac) -> bool {
        if port >= self.ports || is_group(&mac) || mac == [0; 6] || self.fixed_port(&mac).is_some()
        {
            return false;
        }
        self.fixed[port] = Some(mac);
        for entry in self.table.iter_mut() {
            if entry.is_some_and(|e| e.mac == mac) {
                *entry = None;
            }
        }
        true
    }

    pub fn stats(&self, port: usize) -> PortStats {
        self.stats.get(port).copied().unwrap_or_default()
    }

    /// The one port a frame would go to, by its destination address (a
    /// client's fixed one or a learned one); `None` for a frame too short
    /// to have one, a group destination or an unknown one (flooded).
    /// Checks nothing else and changes nothing: for flow control before
    /// [`forward`](Self::forward).
    pub fn destination(&self, frame: &[u8]) -> Option<usize> {
        let dst: Mac = frame.get(0..6)?.try_into().ok()?;
        if is_group(&dst) {
            return None;
        }
        self.fixed_port(&dst).or_else(|| self.learned_port(&dst))
    }

    fn fixed_port(&self, mac: &Mac) -> Option<usize> {
        self.fixed[..self.ports]
            .iter()
            .position(|f| f.as_ref() == Some(mac))
    }

    /// Where a frame from `from` goes: checks it, learns its source, and
    /// counts it (a drop against `from`).
    pub fn forward(&mut self, from: usize, frame: &[u8]) -> Forward {
        if from >= self.ports {
            return Forward::Drop(Drop::Spoofed);
        }
        let decision = self.decide(from, frame);
        match decision {
            Forward::Drop(why) => self.count_drop(from, why),
            _ => self.stats[from].received += 1,
        }
        decision
    }

    /// Counts a frame for `port` that did not fit its ring.
    pub fn count_full(&mut self, port: usize) {
        if port < self.ports {
            self.count_drop(port, Drop::Full);
        }
    }

    /// Counts a frame handed to `port`.
    pub fn count_sent(&mut self, port: usize) {
        if let Some(s) = self.stats.get_mut(port) {
            s.sent += 1;
        }
    }

    /// Counts a frame from `port` dropped before the switch saw it.
    pub fn count_drop(&mut self, port: usize, why: Drop) {
        if port >= self.ports {
            return;
        }
        let i = Drop::ALL.iter().position(|&d| d == why).unwrap_or(0);
        self.stats[port].dropped[i] += 1;
    }

    fn decide(&mut self, from: usize, frame: &[u8]) -> Forward {
        if frame.len() < ETH_HEADER {
            return Forward::Drop(Drop::Runt);
        }
        if frame.len() > MAX_FRAME {
            return Forward::Drop(Drop::Oversized);
        }
        let mut dst = [0; 6];
        let mut src = [0; 6];
        dst.copy_from_slice(&frame[0..6]);
        src.copy_from_slice(&frame[6..12]);
        if is_group(&src) || src == [0; 6] {
            return Forward::Drop(Drop::BadSource);
        }
        match (self.fixed[from], self.fixed_port(&src)) {
            (Some(own), _) if own != src => return Forward::Drop(Drop::Spoofed),
            (None, Some(_)) => return Forward::Drop(Drop::Spoofed),
            (None, None) => self.learn(from, src),
            _ => {}
        }
        if is_group(&dst) {
            return Forward::Flood;
        }
        let to = self.fixed_port(&dst).or_else(|| {
            self.table
                .iter()
                .flatten()
                .find(|e| e.mac == dst)
                .map(|e| e.port)
        });
        match to {
            Some(to) if to == from => Forward::Drop(Drop::Hairpin),
            Some(to) => Forward::Port(to),
            None => Forward::Flood,
        }
    }

    fn learn(&mut self, port: usize, mac: Mac) {
        self.frames += 1;
        let now = self.frames;
        if let Some(entry) = self.table.iter_mut().flatten().find(|e| e.mac == mac) {
            entry.port = port;
            entry.seen = now;
            return;
        }
        let new = Learned {
            mac,
            port,
            seen: now,
        };
        // A port at its share replaces its own oldest entry; else a free
        // slot, else the oldest of all.
        let own = self
            .table
            .iter()
            .flatten()
            .filter(|e| e.port == port)
            .count();
        let victim = if own >= LEARNED_PER_PORT {
            self.oldest(|e| e.port == port)
        } else {
            self.table
                .iter()
                .position(Option::is_none)
                .or_else(|| self.oldest(|_| true))
        };
        if let Some(at) = victim {
            self.table[at] = Some(new);
        }
    }

    fn oldest(&self, pick: impl Fn(&Learned) -> bool) -> Option<usize> {
        self.table
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.filter(|e| pick(e)).map(|e| (i, e.seen)))
            .min_by_key(|&(_, seen)| seen)
            .map(|(i, _)| i)
    }

    /// The port a learned (not fixed) address is on.
    pub fn learned_port(&self, mac: &Mac) -> Option<usize> {
        self.table
            .iter()
            .flatten()
            .find(|e| e.mac == *mac)
            .map(|e| e.port)
    }
}

/// A MAC address from text: six hex bytes separated by `:`.
pub fn parse_mac(text: &str) -> Option<Mac> {
    let mut mac = [0; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// `aa:bb:cc:dd:ee:ff`, without an allocator.
pub struct MacText([u8; 17]);

impl MacText {
    pub fn new(mac: &Mac) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [b':'; 17];
        for (i, b) in mac.iter().enumerate() {
            text[i * 3] = HEX[usize::from(b >> 4)];
            text[i * 3 + 1] = HEX[usize::from(b & 0xf)];
        }
        Self(text)
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.0).unwrap_or("?")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPLINK: usize = 0;
    const A: Mac = [0x52, 0x54, 0, 0, 0, 0xa];
    const B: Mac = [0x52, 0x54, 0, 0, 0, 0xb];
    const HOST: Mac = [0x52, 0x55, 10, 0, 2, 2];
    const OTHER: Mac = [0x52, 0x55, 10, 0, 2, 3];

    fn frame(dst: Mac, src: Mac) -> [u8; 60] {
        let mut f = [0u8; 60];
        f[0..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f
    }

    /// The uplink (learned) and two clients with fixed addresses.
    fn switch() -> Switch {
        let mut s = Switch::new(3);
        assert!(s.fix(1, A));
        assert!(s.fix(2, B));
        s
    }

    #[test]
    fn destination_names_the_one_port_and_changes_nothing() {
        let mut s = switch();
        let before = s.stats(UPLINK);
        assert_eq!(s.destination(&frame(A, HOST)), Some(1));
        assert_eq!(s.destination(&frame(HOST, A)), None, "unknown: flooded");
        assert_eq!(s.destination(&frame(BROADCAST, HOST)), None);
        assert_eq!(s.destination(&[0; 4]), None);
        assert_eq!(s.stats(UPLINK), before);
        assert_eq!(s.learned_port(&HOST), None);
        s.forward(UPLINK, &frame(A, HOST));
        assert_eq!(s.destination(&frame(HOST, A)), Some(UPLINK));
    }

    #[test]
    fn the_layout_fits() {
        assert_eq!(REGION, 0x21000);
        const { assert!(MAX_FRAME + 4 <= SLOT) };
        assert_eq!(slot(RX_RING, RING + 1), RX_RING + SLOT);
        assert_eq!(pending(3, u32::MAX - 1), Some(5));
        assert_eq!(pending(RING + 1, 0), None);
        assert!(fits_slot(MAX_FRAME as u32) && !fits_slot(SLOT as u32));
    }

    #[test]
    fn fixed_ports_are_reached_by_unicast() {
        let mut s = switch();
        assert_eq!(s.forward(1, &frame(B, A)), Forward::Port(2));
        assert_eq!(s.forward(2, &frame(A, B)), Forward::Port(1));
        assert_eq!(s.forward(UPLINK, &frame(A, HOST)), Forward::Port(1));
        assert_eq!(s.stats(1).received, 1);
        assert_eq!(s.stats(UPLINK).received, 1);
    }

    #[test]
    fn broadcast_and_unknown_are_flooded_then_learned() {
        let mut s = switch();
        assert_eq!(s.forward(1, &frame(BROADCAST, A)), Forward::Flood);
        // Nobody knows HOST yet: flooded.
        assert_eq!(s.forward(1, &frame(HOST, A)), Forward::Flood);
        // HOST answers through the uplink: learned there.
        assert_eq!(s.forward(UPLINK, &frame(A, HOST)), Forward::Port(1));
        assert_eq!(s.learned_port(&HOST), Some(UPLINK));
        assert_eq!(s.forward(1, &frame(HOST, A)), Forward::Port(UPLINK));
        assert_eq!(s.forward(2, &frame(HOST, B)), Forward::Port(UPLINK));
        // Multicast is flooded too.
        let mcast = [0x01, 0x00, 0x5e, 0, 0, 1];
        assert_eq!(s.forward(2, &frame(mcast, B)), Forward::Flood);
        // A frame to where it came from goes nowhere.
        assert_eq!(
            s.forward(UPLINK, &frame(HOST, OTHER)),
            Forward::Drop(Drop::Hairpin)
        );
    }

    #[test]
    fn malformed_frames_are_dropped_and_counted() {
        let mut s = switch();
        assert_eq!(s.forward(1, &[0; 13]), Forward::Drop(Drop::Runt));
        assert_eq!(s.forward(1, &[]), Forward::Drop(Drop::Runt));
        let mut big = [0u8; MAX_FRAME + 1];
        big[6..12].copy_from_slice(&A);
        assert_eq!(s.forward(1, &big), Forward::Drop(Drop::Oversized));
        assert_eq!(
            s.forward(1, &big[..MAX_FRAME]),
            Forward::Flood,
            "a maximum frame to 00:00:00:00:00:00 (unknown) is fine"
        );
        assert_eq!(
            s.forward(UPLINK, &frame(A, BROADCAST)),
            Forward::Drop(Drop::BadSource)
        );
        assert_eq!(
            s.forward(UPLINK, &frame(A, [0; 6])),
            Forward::Drop(Drop::BadSource)
        );
        let st = s.stats(1);
        assert_eq!(
            (st.dropped(Drop::Runt), st.dropped(Drop::Oversized)),
            (2, 1)
        );
        assert_eq!(st.received, 1);
        assert_eq!(s.stats(UPLINK).dropped(Drop::BadSource), 2);
        s.count_full(2);
        s.count_sent(2);
        assert_eq!(s.stats(2).dropped(Drop::Full), 1);
        assert_eq!(s.stats(2).sent, 1);
        assert_eq!(s.forward(9, &frame(A, B)), Forward::Drop(Drop::Spoofed));
    }

    #[test]
    fn spoofed_sources_are_dropped_and_steal_nothing() {
        let mut s = switch();
        s.forward(UPLINK, &frame(A, HOST));
        // Client B claims A's and HOST's addresses: dropped, and A's
        // traffic still goes to A, HOST's to the uplink.
        assert_eq!(
            s.forward(2, &frame(BROADCAST, A)),
            Forward::Drop(Drop::Spoofed)
        );
        assert_eq!(s.forward(2, &frame(A, HOST)), Forward::Drop(Drop::Spoofed));
        // Nor can the uplink claim a client's address.
        assert_eq!(
            s.forward(UPLINK, &frame(B, A)),
            Forward::Drop(Drop::Spoofed)
        );
        assert_eq!(s.forward(UPLINK, &frame(A, HOST)), Forward::Port(1));
        assert_eq!(s.forward(1, &frame(HOST, A)), Forward::Port(UPLINK));
        assert_eq!(s.stats(2).dropped(Drop::Spoofed), 2);
        assert_eq!(s.stats(UPLINK).dropped(Drop::Spoofed), 1);
        // Fixing an address twice, or a group one, is refused.
        assert!(!s.fix(2, A));
        assert!(!s.fix(2, BROADCAST));
    }

    #[test]
    fn one_port_cannot_flush_the_table() {
        let mut s = Switch::new(3);
        assert!(s.fix(1, A));
        // Port 2 is learned, not fixed: it floods the table with sources.
        s.forward(UPLINK, &frame(A, HOST));
        for i in 0..10_000u32 {
            let b = i.to_be_bytes();
            let src = [0x02, 0, b[0], b[1], b[2], b[3]];
            s.forward(2, &frame(BROADCAST, src));
        }
        let on_2 = s.table.iter().flatten().filter(|e| e.port == 2).count();
        assert_eq!(on_2, LEARNED_PER_PORT);
        assert_eq!(
            s.learned_port(&HOST),
            Some(UPLINK),
            "the uplink's host stays"
        );
        assert_eq!(s.forward(1, &frame(HOST, A)), Forward::Port(UPLINK));
    }

    #[test]
    fn a_full_table_replaces_the_oldest() {
        let mut s = Switch::new(MAX_PORTS);
        for i in 0..(TABLE + 5) as u8 {
            let port = usize::from(i) % MAX_PORTS;
            s.forward(port, &frame(BROADCAST, [0x02, 0, 0, 0, 1, i]));
        }
        assert_eq!(s.table.iter().flatten().count(), TABLE);
        assert_eq!(s.learned_port(&[0x02, 0, 0, 0, 1, 0]), None, "oldest gone");
        assert_eq!(
            s.learned_port(&[0x02, 0, 0, 0, 1, TABLE as u8 + 4]),
            Some((TABLE + 4) % MAX_PORTS)
        );
        // A host that moves is learned on its new port.
        s.forward(3, &frame(BROADCAST, [0x02, 0, 0, 0, 1, 10]));
        assert_eq!(s.learned_port(&[0x02, 0, 0, 0, 1, 10]), Some(3));
    }

    #[test]
    fn random_frames_never_reach_a_fixed_port_they_are_not_for() {
        let mut s = switch();
        let mut rng = crate::rng::Xorshift::new(0x5eed);
        for _ in 0..50_000 {
            let from = (rng.next_u64() % 3) as usize;
            let len = (rng.next_u64() % 80) as usize;
            let mut f = [0u8; 80];
            for b in f.iter_mut() {
                *b = rng.next_u64() as u8;
            }
            // Often a real address in either field.
            let known = [A, B, HOST, BROADCAST];
            if rng.next_u64().is_multiple_of(2) {
                f[0..6].copy_from_slice(&known[(rng.next_u64() % 4) as usize]);
            }
            if rng.next_u64().is_multiple_of(2) {
                f[6..12].copy_from_slice(&known[(rng.next_u64() % 4) as usize]);
            }
            match s.forward(from, &f[..len]) {
                Forward::Port(to) => {
                    assert_ne!(to, from);
                    let dst: Mac = f[0..6].try_into().unwrap();
                    if to != UPLINK {
                        assert_eq!(Some(dst), s.fixed[to], "unicast only to its owner");
                    }
                }
                Forward::Flood => {
                    let dst: Mac = f[0..6].try_into().unwrap();
                    assert!(dst != A && dst != B, "a client's frames are never flooded");
                }
                Forward::Drop(_) => {}
            }
            if from != UPLINK && len >= ETH_HEADER {
                let src: Mac = f[6..12].try_into().unwrap();
                assert!(s.learned_port(&src) != Some(from), "clients learn nothing");
            }
        }
    }

    #[test]
    fn macs_from_text() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("52:54:00:12:34:567"), None);
        assert_eq!(parse_mac("52:54:00:12:34:zz"), None);
        assert_eq!(
            MacText::new(&[0x52, 0x54, 0, 0x12, 0x34, 0xab]).as_str(),
            "52:54:00:12:34:ab"
        );
    }
}
