//! virtio network device: one receive and one transmit queue, a MAC
//! address, no offloads. Every packet carries the 12-byte `virtio_net_hdr`
//! of VERSION_1 (`num_buffers` included) in front of the Ethernet frame.
//!
//! Frames for the guest come from the host ([`Net::receive`]) or from the
//! peer's [`NetBackend::poll`] after each transmit round; they wait in a
//! bounded backlog until the driver posts receive buffers, and are dropped
//! when it is full.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use super::queue::QueueError;
use super::{read_config_image, DeviceIo, VirtioDevice, DEVICE_TYPE_NET};

pub const NET_F_MAC: u64 = 1 << 5;
pub const NET_HDR_LEN: usize = 12;
const NUM_BUFFERS: usize = 10;
/// Largest frame either way; bigger ones are dropped.
pub const MAX_FRAME: usize = 65536;
/// Frames waiting for receive buffers.
pub const RX_BACKLOG: usize = 256;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
/// mac, status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;

/// The other end of the wire.
pub trait NetBackend {
    /// A frame the guest sent (header stripped). The peer need not pass
    /// it on before [`flush`](Self::flush).
    fn send(&mut self, frame: &[u8]);
    /// The end of a round of [`send`](Self::send)s: a peer that batches
    /// passes them on (one notification for the round, not one per
    /// frame).
    fn flush(&mut self) {}
    /// A frame for the guest, if the peer has one ready.
    fn poll(&mut self) -> Option<Vec<u8>> {
        None
    }
    /// Whether [`poll`](Self::poll) has a frame now (a peer whose frames
    /// arrive by themselves, not only in answer to the guest's).
    fn ready(&self) -> bool {
        false
    }
    /// Whether [`send`](Self::send) can take a frame now. A peer that says
    /// no keeps the guest's frames in its transmit queue (flow control,
    /// not loss) and must have its owner run the device again when it
    /// has room ([`Net::tx_waiting`]).
    fn can_send(&mut self) -> bool {
        true
    }
}

impl<B: NetBackend + ?Sized> NetBackend for alloc::boxed::Box<B> {
    fn send(&mut self, frame: &[u8]) {
        (**self).send(frame)
    }
    fn flush(&mut self) {
        (**self).flush()
    }
    fn poll(&mut self) -> Option<Vec<u8>> {
        (**self).poll()
    }
    fn ready(&self) -> bool {
        (**self).ready()
    }
    fn can_send(&mut self) -> bool {
        (**self).can_send()
    }
}

pub struct Net<B> {
    mac: [u8; 6],
    backend: B,
    backlog: VecDeque<Vec<u8>>,
    rx_dropped: u64,
    tx_dropped: u64,
    /// The guest's frames wait in its transmit queue for the peer.
    tx_waiting: bool,
}

impl<B: NetBackend> Net<B> {
    pub fn new(mac: [u8; 6], backend: B) -> Self {
        Self {
            mac,
            backend,
            backlog: VecDeque::new(),
            rx_dropped: 0,
            tx_dropped: 0,
            tx_waiting: false,
        }
    }

    /// Queue a frame for the guest; `false` if it was dropped (backlog full
    /// or frame too big). Call through `VirtioPci::update` so it is
    /// delivered at once if buffers are there.
    pub fn receive(&mut self, frame: &[u8]) -> bool {
        if self.backlog.len() >= RX_BACKLOG || frame.len() > MAX_FRAME {
            self.rx_dropped += 1;
            return false;
        }
        self.backlog.push_back(frame.to_vec());
        true
    }

    /// Moves the peer's frames into the backlog while it has room (the
    /// rest wait at the peer); true if any came. Call through
    /// `VirtioPci::update`.
    pub fn pull(&mut self) -> bool {
        let mut any = false;
        while self.backlog.len() < RX_BACKLOG {
            let Some(frame) = self.backend.poll() else {
                break;
            };
            any |= self.receive(&frame);
        }
        any
    }

    /// Whether there is room for the peer's frames and it has some.
    pub fn wants_pull(&self) -> bool {
        self.backlog.len() < RX_BACKLOG && self.backend.ready()
    }

    /// Whether the guest's frames wait for the peer to have room: run the
    /// device (`VirtioPci::update`) when it may have some.
    pub fn tx_waiting(&self) -> bool {
        self.tx_waiting
    }

    /// The MAC address the guest reads from the configuration space.
    pub fn set_mac(&mut self, mac: [u8; 6]) {
        self.mac = mac;
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Frames dropped towards the guest (backlog full, buffer too small)
    /// and from it (malformed).
    pub fn dropped(&self) -> (u64, u64) {
        (self.rx_dropped, self.tx_dropped)
    }

    fn transmit(&mut self, io: &mut DeviceIo<'_>) -> Result<(), QueueError> {
        let sent = self.send_queued(io);
        // Also when the queue broke: what was sent before goes on.
        self.backend.flush();
        sent?;
        // Bounded by the backlog: a peer that always has more cannot keep
        // the device here, and what does not fit waits at the peer.
        self.pull();
        Ok(())
    }

    /// Hands the peer the guest's frames while it has room.
    fn send_queued(&mut self, io: &mut DeviceIo<'_>) -> Result<(), QueueError> {
        let mem = io.mem();
        loop {
            self.tx_waiting = !self.backend.can_send();
            if self.tx_waiting {
                break;
            }
            let Some(chain) = io.pop(TX_QUEUE)? else {
                break;
            };
            let len = chain.readable_len();
            if (NET_HDR_LEN as u64..=(NET_HDR_LEN + MAX_FRAME) as u64).contains(&len) {
                let mut packet = vec![0u8; len as usize];
                chain.reader().read(mem, &mut packet)?;
                self.backend.send(&packet[NET_HDR_LEN..]);
            } else {
                self.tx_dropped += 1;
            }
            io.push(TX_QUEUE, &chain, 0)?;
        }
        Ok(())
    }

    fn deliver(&mut self, io: &mut DeviceIo<'_>) -> Result<(), QueueError> {
        let mem = io.mem();
        while !self.backlog.is_empty() {
            let Some(chain) = io.pop(RX_QUEUE)? else {
                break;
            };
            let Some(frame) = self.backlog.pop_front() else {
                break;
            };
            let len = NET_HDR_LEN + frame.len();
            if chain.writable_len() < len as u64 {
                // Returned empty: the driver counts a length error and
                // reposts the buffer.
                self.rx_dropped += 1;
                io.push(RX_QUEUE, &chain, 0)?;
                continue;
            }
            let mut header = [0u8; NET_HDR_LEN];
            header[NUM_BUFFERS..].copy_from_slice(&1u16.to_le_bytes());
            let mut writer = chain.writer(u64::MAX);
            writer.write(mem, &header)?;
            writer.write(mem, &frame)?;
            io.push(RX_QUEUE, &chain, len as u32)?;
        }
        Ok(())
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_NET
    }

    fn queue_count(&self) -> u16 {
        2
    }

    fn features(&self) -> u64 {
        NET_F_MAC
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut image = [0u8; CONFIG_LEN];
        image[..6].copy_from_slice(&self.mac);
        read_config_image(&image, offset, data);
    }

    fn reset(&mut self) {}

    fn process(&mut self, io: &mut DeviceIo<'_>) -> Result<(), QueueError> {
        self.transmit(io)?;
        self.deliver(io)
    }
}

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_LEN: usize = 28;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const IP_PROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const IP_FRAGMENT_MASK: u16 = 0x3fff;
const REPLY_TTL: u8 = 64;
const MAX_REPLIES: usize = 16;

/// A host on the wire at one fixed MAC and IPv4 address that answers ARP
/// requests for its address and ICMP echo requests to it, so that
/// `ping 10.0.2.2` from a busybox guest works. Everything else is ignored.
pub struct EchoPeer {
    mac: [u8; 6],
    ip: [u8; 4],
    replies: VecDeque<Vec<u8>>,
    answered: u64,
}

pub const ECHO_PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x35, 0x02];
pub const ECHO_PEER_IP: [u8; 4] = [10, 0, 2, 2];

impl EchoPeer {
    pub fn new(mac: [u8; 6], ip: [u8; 4]) -> Self {
        Self {
            mac,
            ip,
            replies: VecDeque::new(),
            answered: 0,
        }
    }

    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.answered
    }

    fn reply_to(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
        match ethertype {
            ETHERTYPE_ARP => self.arp_reply(frame),
            ETHERTYPE_IPV4 => self.echo_reply(frame),
            _ => None,
        }
    }

    fn arp_reply(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let arp = frame.get(ETH_HLEN..ETH_HLEN + ARP_LEN)?;
        // Ethernet/IPv4, 6-byte and 4-byte addresses, a request for us.
        let request = arp[0..6] == [0, 1, 8, 0, 6, 4]
            && u16::from_be_bytes([arp[6], arp[7]]) == ARP_REQUEST
            && arp[24..28] == self.ip;
        if !request {
            return None;
        }
        let (sender_mac, sender_ip) = (&arp[8..14], &arp[14..18]);
        let mut reply = Vec::with_capacity(ETH_HLEN + ARP_LEN);
        reply.extend_from_slice(sender_mac);
        reply.extend_from_slice(&self.mac);
        reply.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        reply.extend_from_slice(&arp[0..6]);
        reply.extend_from_slice(&ARP_REPLY.to_be_bytes());
        reply.extend_from_slice(&self.mac);
        reply.extend_from_slice(&self.ip);
        reply.extend_from_slice(sender_mac);
        reply.extend_from_slice(sender_ip);
        Some(reply)
    }

    fn echo_reply(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let ip = frame.get(ETH_HLEN..)?;
        let version_ihl = *ip.first()?;
        let header_len = usize::from(version_ihl & 0xf) * 4;
        let total_len = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
        let whole = version_ihl >> 4 == 4
            && header_len >= 20
            && total_len >= header_len + 8
            && total_len <= ip.len()
            && u16::from_be_bytes([ip[6], ip[7]]) & IP_FRAGMENT_MASK == 0;
        if !whole
            || ip[9] != IP_PROTO_ICMP
            || ip[16..20] != self.ip
            || ip[header_len] != ICMP_ECHO_REQUEST
        {
            return None;
        }
        let mut reply = frame[..ETH_HLEN + total_len].to_vec();
        reply.copy_within(6..12, 0);
        reply[6..12].copy_from_slice(&self.mac);
        let ip = &mut reply[ETH_HLEN..];
        ip.copy_within(12..16, 16);
        ip[12..16].copy_from_slice(&self.ip);
        ip[8] = REPLY_TTL;
        ip[10..12].fill(0);
        let sum = checksum(&ip[..header_len]);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let icmp = &mut ip[header_len..];
        icmp[0] = ICMP_ECHO_REPLY;
        icmp[2..4].fill(0);
        let sum = checksum(icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        Some(reply)
    }
}

impl NetBackend for EchoPeer {
    fn send(&mut self, frame: &[u8]) {
        if self.replies.len() >= MAX_REPLIES {
            return;
        }
        if let Some(reply) = self.reply_to(frame) {
            self.replies.push_back(reply);
            self.answered += 1;
        }
    }

    fn poll(&mut self) -> Option<Vec<u8>> {
        self.replies.pop_front()
    }
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|pair| {
            u32::from(u16::from_be_bytes([
                pair[0],
                pair.get(1).copied().unwrap_or(0),
            ]))
        })
        .fold(0u32, |acc, word| acc.wrapping_add(word));
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mock::{Driver, Machine};
    use crate::virtio::pci::VirtioPci;
    use crate::virtio::rng::SplitMix64;
    use crate::virtio::{VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1};
    use crate::Shared;

    const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | NET_F_MAC;
    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
    const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
    /// Linux's small receive buffers: header plus a maximum-size frame.
    const RX_BUF: u32 = (NET_HDR_LEN + 1514) as u32;

    #[derive(Default)]
    struct Wire {
        sent: Vec<Vec<u8>>,
        flushes: usize,
    }

    impl NetBackend for Wire {
        fn send(&mut self, frame: &[u8]) {
            self.sent.push(frame.to_vec());
        }
        fn flush(&mut self) {
            self.flushes += 1;
        }
    }

    #[test]
    fn one_flush_per_round_of_frames() {
        let m = Machine::new();
        let (device, mut driver) = up(&m, Wire::default());
        let before = device.borrow().device().backend().flushes;
        for frame in [b"first-frame-----", b"second-frame----"] {
            let header = driver.m.alloc_data(&[0; NET_HDR_LEN]);
            let data = driver.m.alloc_data(frame);
            driver.add(
                TX_QUEUE,
                &[
                    (header, NET_HDR_LEN as u32, false),
                    (data, frame.len() as u32, false),
                ],
            );
        }
        driver.kick(TX_QUEUE);
        let device = device.borrow();
        assert_eq!(device.device().backend().sent.len(), 2);
        assert_eq!(device.device().backend().flushes, before + 1);
    }

    fn up<B: NetBackend + 'static>(
        m: &Machine,
        backend: B,
    ) -> (Shared<VirtioPci<Net<B>>>, Driver<'_>) {
        let device = m.plug(Net::new(GUEST_MAC, backend));
        let mut driver = Driver::probe(m, DEVICE_TYPE_NET);
        driver.bring_up(FEATURES, 2);
        (device, driver)
    }

    fn post_rx(driver: &mut Driver, len: u32) -> u64 {
        let buf = driver.m.alloc(u64::from(len), 16);
        driver.add(RX_QUEUE, &[(buf, len, true)]);
        buf
    }

    fn transmit(driver: &mut Driver, frame: &[u8]) {
        let header = driver.m.alloc_data(&[0; NET_HDR_LEN]);
        let data = driver.m.alloc_data(frame);
        driver.add(
            TX_QUEUE,
            &[
                (header, NET_HDR_LEN as u32, false),
                (data, frame.len() as u32, false),
            ],
        );
        driver.kick(TX_QUEUE);
    }

    #[test]
    fn mac_in_config() {
        let m = Machine::new();
        let (_, driver) = up(&m, Wire::default());
        let mac: Vec<u8> = (0..6).map(|i| driver.config_read(i, 1) as u8).collect();
        assert_eq!(mac, GUEST_MAC);
        assert_eq!(driver.device_features() & NET_F_MAC, NET_F_MAC);
    }

    #[test]
    fn transmitted_frames_reach_the_peer_without_header() {
        let m = Machine::new();
        let (device, mut driver) = up(&m, Wire::default());
        transmit(&mut driver, b"0123456789abcdef-frame");
        assert_eq!(driver.used(TX_QUEUE), Some((0, 0)));
        assert_eq!(m.msi.count(2), 1, "tx queue is on vector 2");
        // Shorter than a header: dropped, buffer still returned.
        let short = m.alloc_data(&[0; 4]);
        driver.add(TX_QUEUE, &[(short, 4, false)]);
        driver.kick(TX_QUEUE);
        assert!(driver.used(TX_QUEUE).is_some());
        let device = device.borrow();
        assert_eq!(
            device.device().backend().sent,
            vec![b"0123456789abcdef-frame".to_vec()]
        );
        assert_eq!(device.device().dropped(), (0, 1));
    }

    #[test]
    fn received_frames_wait_for_buffers() {
        let m = Machine::new();
        let (device, mut driver) = up(&m, Wire::default());
        assert!(device
            .borrow_mut()
            .update(|net| net.receive(b"early frame")));
        assert_eq!(m.msi.count(1), 0);
        let buf = post_rx(&mut driver, RX_BUF);
        driver.kick(RX_QUEUE);
        assert_eq!(driver.used(RX_QUEUE), Some((0, (NET_HDR_LEN + 11) as u32)));
        assert_eq!(m.msi.count(1), 1);
        let mut expected = vec![0u8; NET_HDR_LEN];
        expected[NUM_BUFFERS] = 1;
        expected.extend_from_slice(b"early frame");
        assert_eq!(m.mem.bytes(buf, NET_HDR_LEN + 11), expected);

        // With a buffer already posted, delivery is immediate.
        post_rx(&mut driver, RX_BUF);
        driver.kick(RX_QUEUE);
        assert!(device.borrow_mut().update(|net| net.receive(b"late")));
        assert_eq!(driver.used(RX_QUEUE), Some((1, (NET_HDR_LEN + 4) as u32)));
        // A buffer too small for the frame comes back empty.
        post_rx(&mut driver, 20);
        driver.kick(RX_QUEUE);
        assert!(device.borrow_mut().update(|net| net.receive(&[0xaa; 100])));
        assert_eq!(driver.used(RX_QUEUE), Some((2, 0)));
        assert_eq!(device.borrow().device().dropped(), (1, 0));
    }

    /// A peer whose frames arrive by themselves; the test keeps a handle.
    #[derive(Clone, Default)]
    struct Inbox(alloc::rc::Rc<core::cell::RefCell<VecDeque<Vec<u8>>>>);

    impl NetBackend for Inbox {
        fn send(&mut self, _frame: &[u8]) {}
        fn poll(&mut self) -> Option<Vec<u8>> {
            self.0.borrow_mut().pop_front()
        }
        fn ready(&self) -> bool {
            !self.0.borrow().is_empty()
        }
    }

    #[test]
    fn frames_the_peer_has_are_pulled_while_the_backlog_has_room() {
        let m = Machine::new();
        let inbox = Inbox::default();
        for i in 0..RX_BACKLOG + 3 {
            inbox.0.borrow_mut().push_back(vec![i as u8; 60]);
        }
        let backend: alloc::boxed::Box<dyn NetBackend> = alloc::boxed::Box::new(inbox.clone());
        let (device, mut driver) = up(&m, backend);
        device.borrow_mut().update(|net| net.pull());
        assert_eq!(inbox.0.borrow().len(), 3, "the rest waits at the peer");
        assert!(!device.borrow().device().wants_pull());
        let buf = post_rx(&mut driver, RX_BUF);
        driver.kick(RX_QUEUE);
        assert_eq!(driver.used(RX_QUEUE), Some((0, (NET_HDR_LEN + 60) as u32)));
        assert_eq!(m.mem.bytes(buf + NET_HDR_LEN as u64, 2), [0, 0]);
        // Delivered: there is room again, and the next pull fills it.
        assert!(device.borrow().device().wants_pull());
        assert!(device.borrow_mut().update(|net| net.pull()));
        assert_eq!(inbox.0.borrow().len(), 2);
        assert_eq!(device.borrow().device().dropped(), (0, 0));
        device
            .borrow_mut()
            .update(|net| net.set_mac([2, 0, 0, 0, 0, 1]));
        let mac: Vec<u8> = (0..6).map(|i| driver.config_read(i, 1) as u8).collect();
        assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn the_backlog_is_bounded() {
        let m = Machine::new();
        let (device, _driver) = up(&m, Wire::default());
        let mut device = device.borrow_mut();
        let accepted = (0..RX_BACKLOG + 5)
            .filter(|_| device.update(|net| net.receive(&[1; 60])))
            .count();
        assert_eq!(accepted, RX_BACKLOG);
        assert!(!device.update(|net| net.receive(&vec![0; MAX_FRAME + 1])));
        assert_eq!(device.device().dropped(), (6, 0));
    }

    /// A peer with room for `room` frames at a time.
    struct Narrow {
        room: usize,
        sent: Vec<Vec<u8>>,
    }

    impl NetBackend for Narrow {
        fn send(&mut self, frame: &[u8]) {
            assert!(self.room > 0, "sent to a peer without room");
            self.room -= 1;
            self.sent.push(frame.to_vec());
        }
        fn can_send(&mut self) -> bool {
            self.room > 0
        }
    }

    #[test]
    fn frames_wait_in_the_transmit_queue_while_the_peer_has_no_room() {
        let m = Machine::new();
        let (device, mut driver) = up(
            &m,
            Narrow {
                room: 1,
                sent: Vec::new(),
            },
        );
        transmit(&mut driver, b"first-frame-----");
        transmit(&mut driver, b"second-frame----");
        assert!(driver.used(TX_QUEUE).is_some());
        assert_eq!(driver.used(TX_QUEUE), None, "the second waits, not dropped");
        assert!(device.borrow().device().tx_waiting());
        device.borrow_mut().update(|net| net.backend_mut().room = 4);
        assert!(driver.used(TX_QUEUE).is_some());
        let device = device.borrow();
        assert!(!device.device().tx_waiting());
        assert_eq!(device.device().backend().sent.len(), 2);
        assert_eq!(device.device().backend().sent[1], b"second-frame----");
        assert_eq!(device.device().dropped(), (0, 0));
    }

    fn arp_request(target: [u8; 4]) -> Vec<u8> {
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&GUEST_MAC);
        frame.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        frame.extend_from_slice(&GUEST_MAC);
        frame.extend_from_slice(&GUEST_IP);
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&target);
        frame
    }

    fn ping(target: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut frame = ECHO_PEER_MAC.to_vec();
        frame.extend_from_slice(&GUEST_MAC);
        frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = (20 + 8 + payload.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, IP_PROTO_ICMP, 0, 0];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&GUEST_IP);
        ip.extend_from_slice(&target);
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut icmp = vec![ICMP_ECHO_REQUEST, 0, 0, 0, 0x00, 0x07, 0x00, 0x01];
        icmp.extend_from_slice(payload);
        let sum = checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&icmp);
        frame
    }

    #[test]
    fn echo_peer_answers_arp_and_ping_through_the_device() {
        let m = Machine::new();
        let (device, mut driver) = up(&m, EchoPeer::new(ECHO_PEER_MAC, ECHO_PEER_IP));
        let bufs: Vec<u64> = (0..4).map(|_| post_rx(&mut driver, RX_BUF)).collect();
        driver.kick(RX_QUEUE);

        transmit(&mut driver, &arp_request(ECHO_PEER_IP));
        let (_, len) = driver.used(RX_QUEUE).expect("ARP reply");
        let reply = m
            .mem
            .bytes(bufs[0] + NET_HDR_LEN as u64, len as usize - NET_HDR_LEN);
        assert_eq!(reply[0..6], GUEST_MAC);
        assert_eq!(reply[6..12], ECHO_PEER_MAC);
        assert_eq!(reply[12..14], ETHERTYPE_ARP.to_be_bytes());
        assert_eq!(reply[20..22], ARP_REPLY.to_be_bytes());
        assert_eq!(reply[22..28], ECHO_PEER_MAC, "sender hardware address");
        assert_eq!(reply[28..32], ECHO_PEER_IP);
        assert_eq!(reply[32..38], GUEST_MAC);
        assert_eq!(reply[38..42], GUEST_IP);

        let request = ping(ECHO_PEER_IP, b"moat ping payload");
        transmit(&mut driver, &request);
        let (_, len) = driver.used(RX_QUEUE).expect("echo reply");
        let reply = m
            .mem
            .bytes(bufs[1] + NET_HDR_LEN as u64, len as usize - NET_HDR_LEN);
        assert_eq!(reply.len(), request.len());
        assert_eq!(reply[0..6], GUEST_MAC);
        assert_eq!(reply[6..12], ECHO_PEER_MAC);
        let ip = &reply[ETH_HLEN..];
        assert_eq!(ip[12..16], ECHO_PEER_IP);
        assert_eq!(ip[16..20], GUEST_IP);
        assert_eq!(checksum(&ip[..20]), 0, "IP header checksum verifies");
        assert_eq!(ip[20], ICMP_ECHO_REPLY);
        assert_eq!(checksum(&ip[20..]), 0, "ICMP checksum verifies");
        assert_eq!(
            ip[24..],
            request[ETH_HLEN + 24..],
            "identifier, sequence and payload echoed"
        );

        // Not for the peer, or not ARP/ICMP: silence.
        transmit(&mut driver, &arp_request([10, 0, 2, 3]));
        transmit(&mut driver, &ping([10, 0, 2, 3], b"x"));
        let mut ipv6 = ping(ECHO_PEER_IP, b"x");
        ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        transmit(&mut driver, &ipv6);
        assert_eq!(driver.used(RX_QUEUE), None);
        assert_eq!(device.borrow().device().backend().answered(), 2);
    }

    #[test]
    fn echo_peer_survives_garbage() {
        let mut peer = EchoPeer::new(ECHO_PEER_MAC, ECHO_PEER_IP);
        let mut prng = SplitMix64(0xec40);
        let templates = [arp_request(ECHO_PEER_IP), ping(ECHO_PEER_IP, &[9; 40])];
        for i in 0..5000 {
            let mut frame = templates[i % 2].clone();
            let r = prng.next_u64();
            frame.truncate((r % (frame.len() as u64 + 1)) as usize);
            for _ in 0..(r >> 8) % 4 {
                let r = prng.next_u64();
                if !frame.is_empty() {
                    let at = (r % frame.len() as u64) as usize;
                    frame[at] = (r >> 32) as u8;
                }
            }
            peer.send(&frame);
            while let Some(reply) = peer.poll() {
                assert!(reply.len() <= frame.len().max(ETH_HLEN + ARP_LEN));
            }
        }
        assert!(
            peer.answered() > 0,
            "some mutations still make valid requests"
        );
    }
}
