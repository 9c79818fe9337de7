//! The one retry policy: capped exponential backoff, with "equal jitter" (half fixed, half
//! random) where many clients might otherwise retry in step. Every retry loop in rewind takes
//! its waits from a [`Backoff`]; what each loop retries, and how often at most, stays with it.

use std::time::Duration;

use rand::Rng as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The wait before the first retry.
    pub first: Duration,
    /// No wait is longer.
    pub max: Duration,
    /// Spread each wait over its upper half at random.
    pub jitter: bool,
}

impl Backoff {
    /// The same wait before every retry.
    pub const fn fixed(wait: Duration) -> Self {
        Self {
            first: wait,
            max: wait,
            jitter: false,
        }
    }

    /// The wait before retry number `retry` (0 is the first): `first` doubled per retry, at
    /// most `max`.
    pub fn delay(&self, retry: u32) -> Duration {
        let wait = self
            .first
            .saturating_mul(1u32 << retry.min(16))
            .min(self.max);
        if !self.jitter {
            return wait;
        }
        let half = wait / 2;
        half + Duration::from_millis(rand::rng().random_range(0..=half.as_millis() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_jitter_stays_in_the_upper_half() {
        let plain = Backoff {
            first: Duration::from_millis(200),
            max: Duration::from_secs(10),
            jitter: false,
        };
        assert_eq!(plain.delay(0), Duration::from_millis(200));
        assert_eq!(plain.delay(3), Duration::from_millis(1600));
        assert_eq!(plain.delay(1000), Duration::from_secs(10));
        let jittered = Backoff {
            jitter: true,
            ..plain
        };
        for retry in [0, 3, 10, 1000] {
            let delay = jittered.delay(retry);
            let cap = plain.delay(retry);
            assert!(delay >= cap / 2 && delay <= cap, "{retry}: {delay:?}");
        }
        assert_eq!(
            Backoff::fixed(Duration::from_millis(500)).delay(7),
            Duration::from_millis(500)
        );
    }
}
