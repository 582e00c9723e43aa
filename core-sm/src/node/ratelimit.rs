//! Token-bucket rate limiting driven by the time argument, with a bounded
//! number of tracked keys.
//!
//! Invariant: the map never holds more than its capacity. A key whose bucket
//! has refilled completely is indistinguishable from an unknown key, so such
//! keys are forgotten first; if every tracked key is still draining, a new key
//! is refused (`rateLimited`) rather than growing the map.

use std::collections::HashMap;
use std::hash::Hash;

use crate::time::Time;

/// Tokens are counted in millionths so integer refill stays exact: a rate of
/// `r` tokens per second adds `r` units per microsecond.
const UNITS_PER_TOKEN: u64 = 1_000_000;

/// Burst size and refill rate of one kind of bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateConfig {
    /// Tokens a fresh bucket holds: the burst allowed after a quiet period.
    pub burst: u32,
    /// Tokens added per second.
    pub per_sec: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    units: u64,
    updated: Time,
}

/// A set of token buckets, one per key.
#[derive(Debug)]
pub struct RateLimiter<K> {
    config: RateConfig,
    capacity: usize,
    buckets: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Copy> RateLimiter<K> {
    /// A limiter with `config` that tracks at most `capacity` keys.
    pub fn new(config: RateConfig, capacity: usize) -> Self {
        RateLimiter {
            config,
            capacity,
            buckets: HashMap::new(),
        }
    }

    /// Checks whether `key` has a token at `now`, without taking it.
    /// `Err(retry_after_ms)` says when one will be available.
    pub fn check(&mut self, now: Time, key: K) -> Result<(), u64> {
        self.check_many(now, key, 1)
    }

    /// Checks whether `key` has `n` tokens at `now` (`n` counts at most the
    /// burst, so a large request can pass at all), without taking them.
    fn check_many(&mut self, now: Time, key: K, n: u32) -> Result<(), u64> {
        let need = self.units_for(n);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.capacity {
            self.forget_full(now);
            if self.buckets.len() >= self.capacity {
                // Every tracked key is busy: refuse rather than grow.
                return Err(1_000);
            }
        }
        let units = self.units_at(now, &key);
        if units >= need {
            return Ok(());
        }
        Err(self.retry_after_ms(units, need))
    }

    /// Takes one token from `key`'s bucket. Call only after [`Self::check`]
    /// said yes at the same `now`.
    pub fn take(&mut self, now: Time, key: K) {
        self.take_many(now, key, 1);
    }

    fn take_many(&mut self, now: Time, key: K, n: u32) {
        let need = self.units_for(n);
        let units = self.units_at(now, &key);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.capacity {
            self.forget_full(now);
        }
        // A clock that steps backwards must not earn a refill twice.
        let updated = self.buckets.get(&key).map_or(now, |b| b.updated.max(now));
        if self.buckets.contains_key(&key) || self.buckets.len() < self.capacity {
            self.buckets.insert(
                key,
                Bucket {
                    units: units.saturating_sub(need),
                    updated,
                },
            );
        }
    }

    /// Checks and takes in one step.
    pub fn acquire(&mut self, now: Time, key: K) -> Result<(), u64> {
        self.acquire_many(now, key, 1)
    }

    /// Checks and takes `n` tokens in one step; `n` counts at most the
    /// burst.
    pub fn acquire_many(&mut self, now: Time, key: K, n: u32) -> Result<(), u64> {
        let need = self.units_for(n);
        let (per_sec, full) = (self.config.per_sec, self.full_units());
        // A tracked key (the common case): one lookup, updated in place.
        if let Some(b) = self.buckets.get_mut(&key) {
            let units = b.refilled(now, per_sec, full);
            if units < need {
                return Err(self.retry_after_ms(units, need));
            }
            b.units = units - need;
            // A clock that steps backwards must not earn a refill twice.
            b.updated = b.updated.max(now);
            return Ok(());
        }
        self.check_many(now, key, n)?;
        self.take_many(now, key, n);
        Ok(())
    }

    /// The units `n` tokens are, `n` at least 1 and at most the burst.
    fn units_for(&self, n: u32) -> u64 {
        u64::from(n.clamp(1, self.config.burst.max(1))) * UNITS_PER_TOKEN
    }

    /// Number of keys tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True if no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn full_units(&self) -> u64 {
        u64::from(self.config.burst) * UNITS_PER_TOKEN
    }

    fn units_at(&self, now: Time, key: &K) -> u64 {
        let full = self.full_units();
        self.buckets
            .get(key)
            .map_or(full, |b| b.refilled(now, self.config.per_sec, full))
    }

    fn retry_after_ms(&self, units: u64, need: u64) -> u64 {
        let missing = need.saturating_sub(units);
        match u64::from(self.config.per_sec) {
            0 => u64::MAX,
            rate => (missing.div_ceil(rate)).div_ceil(1_000).max(1),
        }
    }

    fn forget_full(&mut self, now: Time) {
        let full = self.full_units();
        let per_sec = self.config.per_sec;
        self.buckets
            .retain(|_, b| b.refilled(now, per_sec, full) < full);
    }
}

impl Bucket {
    /// The units this bucket holds at `now`: what it had, plus the refill
    /// since it was last updated, up to `full`.
    fn refilled(&self, now: Time, per_sec: u32, full: u64) -> u64 {
        let elapsed_us =
            u64::try_from(now.saturating_since(self.updated).as_micros()).unwrap_or(u64::MAX);
        let refill = elapsed_us.saturating_mul(u64::from(per_sec));
        self.units.saturating_add(refill).min(full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(burst: u32, per_sec: u32, capacity: usize) -> RateLimiter<u8> {
        RateLimiter::new(RateConfig { burst, per_sec }, capacity)
    }

    #[test]
    fn burst_then_refusal_then_refill() {
        let mut l = limiter(3, 1, 10);
        let t0 = Time::from_millis(1_000);
        for _ in 0..3 {
            l.acquire(t0, 1).unwrap();
        }
        let retry = l.acquire(t0, 1).unwrap_err();
        assert_eq!(retry, 1_000);
        // Half a second later still nothing; a full second later one token.
        assert_eq!(l.acquire(Time::from_millis(1_500), 1).unwrap_err(), 500);
        l.acquire(Time::from_millis(2_000), 1).unwrap();
        assert!(l.acquire(Time::from_millis(2_000), 1).is_err());
    }

    #[test]
    fn keys_are_independent() {
        let mut l = limiter(1, 1, 10);
        l.acquire(Time::ZERO, 1).unwrap();
        l.acquire(Time::ZERO, 2).unwrap();
        assert!(l.acquire(Time::ZERO, 1).is_err());
    }

    #[test]
    fn map_stays_bounded_and_forgets_refilled_keys() {
        let mut l = limiter(1, 1, 2);
        l.acquire(Time::ZERO, 1).unwrap();
        l.acquire(Time::ZERO, 2).unwrap();
        // Both tracked keys are draining: a third key is refused.
        assert!(l.acquire(Time::ZERO, 3).is_err());
        assert_eq!(l.len(), 2);
        // Once they have refilled, they are forgotten and key 3 fits.
        l.acquire(Time::from_millis(1_000), 3).unwrap();
        assert!(l.len() <= 2);
    }

    #[test]
    fn check_does_not_consume() {
        let mut l = limiter(1, 1, 10);
        l.check(Time::ZERO, 1).unwrap();
        l.check(Time::ZERO, 1).unwrap();
        l.take(Time::ZERO, 1);
        assert!(l.check(Time::ZERO, 1).is_err());
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let mut l = limiter(1, 1, 10);
        l.acquire(Time::from_millis(5_000), 1).unwrap();
        assert!(l.acquire(Time::from_millis(1_000), 1).is_err());
    }
}
