//! Summaries of timing samples.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub count: usize,
    /// The middle sample; for an even count, the mean of the two middle
    /// ones, rounded down.
    pub median: u64,
    pub min: u64,
}

impl Summary {
    /// Sorts `samples`; `None` when there are none.
    pub fn of(samples: &mut [u64]) -> Option<Summary> {
        samples.sort_unstable();
        let count = samples.len();
        let min = *samples.first()?;
        let upper = *samples.get(count / 2)?;
        let median = if count.is_multiple_of(2) {
            let lower = *samples.get(count / 2 - 1)?;
            // Sorted, so `upper - lower` cannot underflow, and this cannot overflow.
            lower + (upper - lower) / 2
        } else {
            upper
        };
        Some(Summary { count, median, min })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_min() {
        assert_eq!(Summary::of(&mut []), None);
        let s = Summary::of(&mut [7]).unwrap();
        assert_eq!((s.count, s.median, s.min), (1, 7, 7));
        let s = Summary::of(&mut [9, 1, 5]).unwrap();
        assert_eq!((s.count, s.median, s.min), (3, 5, 1));
        let s = Summary::of(&mut [10, 4, 1, 7]).unwrap();
        assert_eq!((s.median, s.min), (5, 1), "mean of 4 and 7, rounded down");
        let s = Summary::of(&mut [u64::MAX, u64::MAX - 2]).unwrap();
        assert_eq!(s.median, u64::MAX - 1, "no overflow");
    }

    #[test]
    fn median_matches_a_slow_definition_on_random_samples() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in 1..300usize {
            let mut samples: Vec<u64> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % 1000
                })
                .collect();
            let s = Summary::of(&mut samples.clone()).unwrap();
            // The median: at least half the samples are <= it and at least
            // half are >= it.
            let le = samples.iter().filter(|&&v| v <= s.median).count();
            let ge = samples.iter().filter(|&&v| v >= s.median).count();
            assert!(2 * le >= len && 2 * ge >= len, "{len}: {}", s.median);
            samples.sort_unstable();
            assert_eq!(s.min, samples[0]);
            assert_eq!(s.count, len);
        }
    }
}
