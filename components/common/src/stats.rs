//! Summaries of benchmark samples.

/// Median (the lower one for an even count) and minimum; sorts `samples`.
pub fn median_min(samples: &mut [u32]) -> Option<(u32, u32)> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    Some((samples[(samples.len() - 1) / 2], samples[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_min() {
        assert_eq!(median_min(&mut []), None);
        assert_eq!(median_min(&mut [5]), Some((5, 5)));
        assert_eq!(median_min(&mut [9, 1, 5]), Some((5, 1)));
        assert_eq!(median_min(&mut [4, 3, 2, 1]), Some((2, 1)));
    }
}
