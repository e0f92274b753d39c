//! The VMM's side of the guest's `modem` port: the VMM relays what the
//! guest writes to the native modem's port session, and keeps
//! the port's host end open only while the modem is there, so a modem
//! that dies or restarts shows the guest a port reset (the host end
//! closes, then opens again) rather than silence or a stale session.
//!
//! The modem is checked with a `STATUS` request at most every `period`
//! host ticks (and whenever the guest writes): a failed call means it is
//! gone; a different instance number means it restarted. After a close,
//! the port reopens at the next check that finds the modem, so the guest
//! always has at least one period to see the end-of-file.

use crate::modem::{self, ExchangeError, Reply, Request, SessionId};

/// A change of the modem's presence the VMM shows the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A call failed: the modem is gone (crashed, restarting); the port
    /// closes.
    Gone,
    /// The modem answers as another instance; the port closes.
    Restarted,
    /// The modem answers again; the port opens.
    Back,
}

#[derive(Clone, Debug)]
pub struct ModemLink {
    /// The instance the open port is connected to (None: not yet known).
    instance: Option<u64>,
    open: bool,
    next_check: u64,
    period: u64,
}

impl ModemLink {
    /// A link whose port starts open (the modem is assumed up until a
    /// check says otherwise), checked every `period` ticks.
    pub fn new(period: u64) -> Self {
        Self {
            instance: None,
            open: true,
            next_check: 0,
            period,
        }
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Hands `written` to the modem and puts its answer in `answer`;
    /// returns the answer's length and any change to show the guest. A
    /// closed port drops what the guest wrote.
    pub fn relay<E>(
        &mut self,
        call: &mut impl FnMut([u64; 6]) -> Result<[u64; 6], E>,
        written: &[u8],
        answer: &mut [u8],
    ) -> (usize, Option<Event>) {
        if !self.open || written.is_empty() {
            return (0, None);
        }
        // The bytes must go to the instance the port is connected to.
        if let Some(event) = self.check(call) {
            return (0, Some(event));
        }
        match modem::exchange(call, SessionId::Port, written, answer) {
            Ok(len) => (len, None),
            Err(ExchangeError::Call(_)) => (0, self.close(Event::Gone)),
            // A refusal or a malformed reply loses this write but says
            // nothing about the modem's presence.
            Err(_) => (0, None),
        }
    }

    /// The periodic check, if one is due at host time `now`.
    pub fn poll<E>(
        &mut self,
        call: &mut impl FnMut([u64; 6]) -> Result<[u64; 6], E>,
        now: u64,
    ) -> Option<Event> {
        if now < self.next_check {
            return None;
        }
        self.next_check = now.saturating_add(self.period);
        self.check(call)
    }

    fn check<E>(
        &mut self,
        call: &mut impl FnMut([u64; 6]) -> Result<[u64; 6], E>,
    ) -> Option<Event> {
        let session = SessionId::Port;
        let instance = match modem::request(call, Request::Status { session }) {
            Ok(Reply::Status { stats, .. }) => Some(stats.instance),
            Err(ExchangeError::Call(_)) => None,
            // Answers, but not as expected: present, instance unknown.
            _ => return None,
        };
        match (instance, self.open) {
            (None, true) => self.close(Event::Gone),
            (None, false) => None,
            (Some(now), true) => match self.instance.replace(now) {
                Some(before) if before != now => self.close(Event::Restarted),
                _ => None,
            },
            (Some(now), false) => {
                self.instance = Some(now);
                self.open = true;
                Some(Event::Back)
            }
        }
    }

    fn close(&mut self, why: Event) -> Option<Event> {
        self.open = false;
        self.instance = None;
        Some(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modem::{Modem, Telemetry};
    use crate::modem_at::Events;

    struct NoEvents;

    impl Events for NoEvents {
        fn sms_sent(&mut self, _: &[u8], _: &[u8], _: u8) {}
    }

    /// A modem that can be killed and restarted as a new instance.
    struct Native {
        modem: Option<Modem>,
        instance: u64,
        calls: u32,
    }

    impl Native {
        fn up() -> Self {
            Self {
                modem: Some(Modem::new()),
                instance: 1,
                calls: 0,
            }
        }

        fn call(&mut self, words: [u64; 6]) -> Result<[u64; 6], ()> {
            self.calls += 1;
            let telemetry = Telemetry {
                instance: self.instance,
                ..Telemetry::default()
            };
            let modem = self.modem.as_mut().ok_or(())?;
            Ok(modem.handle(words, telemetry, &mut NoEvents))
        }

        fn restart(&mut self) {
            self.modem = Some(Modem::new());
            self.instance += 1;
        }
    }

    fn relay(link: &mut ModemLink, native: &mut Native, written: &[u8]) -> (String, Option<Event>) {
        let mut answer = [0u8; 256];
        let (len, event) = link.relay(&mut |w| native.call(w), written, &mut answer);
        (String::from_utf8_lossy(&answer[..len]).into_owned(), event)
    }

    #[test]
    fn relays_while_the_modem_is_there() {
        let (mut link, mut native) = (ModemLink::new(10), Native::up());
        assert_eq!(
            relay(&mut link, &mut native, b"AT\r"),
            ("OK\r\n".into(), None)
        );
        assert_eq!(link.poll(&mut |w| native.call(w), 5), None);
        assert!(link.is_open());
    }

    #[test]
    fn a_dead_modem_closes_the_port_until_it_is_back() {
        let (mut link, mut native) = (ModemLink::new(10), Native::up());
        relay(&mut link, &mut native, b"AT\r");
        native.modem = None;
        assert_eq!(
            relay(&mut link, &mut native, b"AT\r"),
            (String::new(), Some(Event::Gone))
        );
        assert!(!link.is_open());
        // Closed: the guest's bytes are dropped without calling anyone.
        let calls = native.calls;
        assert_eq!(
            relay(&mut link, &mut native, b"AT\r"),
            (String::new(), None)
        );
        assert_eq!(native.calls, calls);
        assert_eq!(link.poll(&mut |w| native.call(w), 0), None);
        native.restart();
        // Not due yet, then due.
        assert_eq!(link.poll(&mut |w| native.call(w), 9), None);
        assert_eq!(link.poll(&mut |w| native.call(w), 10), Some(Event::Back));
        assert_eq!(
            relay(&mut link, &mut native, b"AT\r"),
            ("OK\r\n".into(), None)
        );
    }

    #[test]
    fn a_restart_between_checks_is_a_reset() {
        let (mut link, mut native) = (ModemLink::new(10), Native::up());
        assert_eq!(link.poll(&mut |w| native.call(w), 0), None);
        native.restart();
        assert_eq!(
            link.poll(&mut |w| native.call(w), 10),
            Some(Event::Restarted)
        );
        assert!(!link.is_open());
        assert_eq!(link.poll(&mut |w| native.call(w), 20), Some(Event::Back));
        assert!(link.is_open());
        // A write finds a restart before its bytes reach the new instance.
        native.restart();
        assert_eq!(
            relay(&mut link, &mut native, b"AT\r"),
            (String::new(), Some(Event::Restarted))
        );
    }
}
