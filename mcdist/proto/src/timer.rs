//! One table of deadlines per state machine (quinn-proto's `TimerTable` is the model).
//!
//! Rule owned here: a state machine arms, re-arms and stops its timers in one place, and
//! `poll_timeout` is the earliest armed deadline, or `None` when nothing is armed. Nothing
//! merges deadlines by hand. The table reads no clock: deadlines are `Instant`s the caller
//! computed from the `now` it was given.

use std::marker::PhantomData;
use std::time::Instant;

/// A set of named timers: an enum with one variant per timer.
pub trait TimerKind: Copy + Eq + std::fmt::Debug + 'static {
    /// Every timer, each once, in the order [`TimerKind::index`] numbers them.
    const ALL: &'static [Self];
    /// This timer's slot: its position in [`TimerKind::ALL`].
    fn index(self) -> usize;
}

/// Deadlines of the timers `T`, at most one per timer.
#[derive(Debug, Clone)]
pub struct TimerTable<T: TimerKind> {
    deadlines: Vec<Option<Instant>>,
    kind: PhantomData<T>,
}

impl<T: TimerKind> Default for TimerTable<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: TimerKind> TimerTable<T> {
    /// A table with nothing armed.
    pub fn new() -> Self {
        Self {
            deadlines: vec![None; T::ALL.len()],
            kind: PhantomData,
        }
    }

    /// Arm `timer` to fire at `at`, replacing any earlier deadline.
    pub fn set(&mut self, timer: T, at: Instant) {
        self.deadlines[timer.index()] = Some(at);
    }

    /// Arm `timer` at `at` unless it is already armed earlier.
    pub fn set_earliest(&mut self, timer: T, at: Instant) {
        let slot = &mut self.deadlines[timer.index()];
        *slot = Some(slot.map_or(at, |old| old.min(at)));
    }

    /// Disarm `timer`.
    pub fn stop(&mut self, timer: T) {
        self.deadlines[timer.index()] = None;
    }

    /// Disarm every timer.
    pub fn stop_all(&mut self) {
        self.deadlines.iter_mut().for_each(|d| *d = None);
    }

    /// `timer`'s deadline, if armed.
    pub fn get(&self, timer: T) -> Option<Instant> {
        self.deadlines[timer.index()]
    }

    /// Whether `timer` is armed and due at `now`.
    pub fn is_expired(&self, timer: T, now: Instant) -> bool {
        self.get(timer).is_some_and(|at| at <= now)
    }

    /// The earliest armed deadline; `None` when nothing is armed.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }

    /// Disarm and return one timer that is due at `now` (earliest slot first), so a caller
    /// handles every expired timer with `while let Some(t) = table.pop_expired(now)`.
    pub fn pop_expired(&mut self, now: Instant) -> Option<T> {
        let timer = T::ALL.iter().copied().find(|t| self.is_expired(*t, now))?;
        self.stop(timer);
        Some(timer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum T {
        A,
        B,
    }

    impl TimerKind for T {
        const ALL: &'static [Self] = &[T::A, T::B];
        fn index(self) -> usize {
            self as usize
        }
    }

    #[test]
    fn next_timeout_is_the_earliest_armed_and_none_when_idle() {
        let t0 = Instant::now();
        let mut table = TimerTable::<T>::new();
        assert_eq!(table.next_timeout(), None);
        table.set(T::A, t0 + Duration::from_millis(5));
        table.set(T::B, t0 + Duration::from_millis(2));
        assert_eq!(table.next_timeout(), Some(t0 + Duration::from_millis(2)));
        table.set_earliest(T::A, t0 + Duration::from_millis(9));
        assert_eq!(table.get(T::A), Some(t0 + Duration::from_millis(5)));
        table.stop(T::B);
        assert_eq!(table.next_timeout(), Some(t0 + Duration::from_millis(5)));
        table.stop_all();
        assert_eq!(table.next_timeout(), None);
    }

    #[test]
    fn pop_expired_disarms_each_due_timer_once() {
        let t0 = Instant::now();
        let mut table = TimerTable::<T>::new();
        table.set(T::A, t0);
        table.set(T::B, t0 + Duration::from_secs(1));
        assert_eq!(table.pop_expired(t0), Some(T::A));
        assert_eq!(table.pop_expired(t0), None);
        assert!(!table.is_expired(T::B, t0));
        assert_eq!(table.pop_expired(t0 + Duration::from_secs(1)), Some(T::B));
        assert_eq!(table.next_timeout(), None);
    }
}
