//! Restart back-off: when a failed component comes back, if at all.

use crate::manifest::RestartPolicy;

/// The longest back-off, however often a component failed.
pub const MAX_BACKOFF_MS: u64 = 60 * 60 * 1000;

/// What to do after a component failed with `restarts_done` restarts behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Restart number `number` (1-based) after `delay_ms`.
    Restart { number: u32, delay_ms: u64 },
    /// It had all its restarts.
    GiveUp,
}

pub fn decide(policy: &RestartPolicy, restarts_done: u32) -> Decision {
    if restarts_done >= policy.max_restarts {
        return Decision::GiveUp;
    }
    let delay_ms = if policy.doubling {
        let factor = 1u64.checked_shl(restarts_done).unwrap_or(u64::MAX);
        policy.backoff_ms.saturating_mul(factor)
    } else {
        policy.backoff_ms
    };
    Decision::Restart {
        number: restarts_done + 1,
        delay_ms: delay_ms.min(MAX_BACKOFF_MS),
    }
}

/// TSC ticks in `ms` milliseconds at `tsc_hz`.
pub fn ms_to_ticks(tsc_hz: u64, ms: u64) -> u64 {
    (tsc_hz / 1000).saturating_mul(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_restarts: u32, backoff_ms: u64, doubling: bool) -> RestartPolicy {
        RestartPolicy {
            max_restarts,
            backoff_ms,
            doubling,
        }
    }

    #[test]
    fn doubles_until_the_limit() {
        let p = policy(4, 10, true);
        let delays: Vec<Decision> = (0..5).map(|done| decide(&p, done)).collect();
        assert_eq!(
            delays,
            [
                Decision::Restart {
                    number: 1,
                    delay_ms: 10
                },
                Decision::Restart {
                    number: 2,
                    delay_ms: 20
                },
                Decision::Restart {
                    number: 3,
                    delay_ms: 40
                },
                Decision::Restart {
                    number: 4,
                    delay_ms: 80
                },
                Decision::GiveUp,
            ]
        );
    }

    #[test]
    fn fixed_back_off_and_no_restarts() {
        assert_eq!(
            decide(&policy(9, 25, false), 7),
            Decision::Restart {
                number: 8,
                delay_ms: 25
            }
        );
        assert_eq!(decide(&policy(0, 25, true), 0), Decision::GiveUp);
    }

    #[test]
    fn long_doubling_saturates() {
        let p = policy(1000, 1000, true);
        assert_eq!(
            decide(&p, 999),
            Decision::Restart {
                number: 1000,
                delay_ms: MAX_BACKOFF_MS
            }
        );
        assert_eq!(
            decide(&p, 40),
            Decision::Restart {
                number: 41,
                delay_ms: MAX_BACKOFF_MS
            }
        );
    }

    #[test]
    fn ticks() {
        assert_eq!(ms_to_ticks(2_000_000_000, 10), 20_000_000);
        assert_eq!(ms_to_ticks(u64::MAX, u64::MAX), u64::MAX);
    }
}
