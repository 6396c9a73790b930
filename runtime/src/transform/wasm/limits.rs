//! What one guest may use: linear memory (a resource limiter that traps on a refused grow)
//! and wall-clock time per call (epoch interruption driven by one ticker thread).
//!
//! Epochs rather than fuel: an epoch check is a load and compare at function entries and loop
//! back-edges, while fuel counts every basic block; on record-sized work fuel costs far more,
//! and what an operator wants to bound is time, not instructions.

use std::sync::Once;
use std::time::Duration;

use wasmtime::{Engine, ResourceLimiter};

/// How often the ticker advances the engines' epoch: the granularity of `timeout.ms`.
pub const TICK: Duration = Duration::from_millis(5);

pub const DEFAULT_MEMORY_BYTES: u64 = 32 * 1024 * 1024;
pub const MIN_MEMORY_BYTES: u64 = 64 * 1024;
/// Every pooled memory slot is sized for this, so no setting may exceed it.
pub const MAX_MEMORY_BYTES: u64 = 1024 * 1024 * 1024;
pub const DEFAULT_TIMEOUT_MS: u64 = 250;
/// A table larger than this is a bug or an attack, never a transform.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Per-transform limits from `memory.max.bytes` and `timeout.ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// `None`: calls are not interrupted (`timeout.ms=0`, for trusted guests and benchmarks).
    pub timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: DEFAULT_MEMORY_BYTES,
            timeout: Some(Duration::from_millis(DEFAULT_TIMEOUT_MS)),
        }
    }
}

impl Limits {
    /// Epoch ticks to allow for one call. One tick more than the timeout spans, because the
    /// current tick may be almost over when the call starts.
    pub fn deadline_ticks(&self) -> Option<u64> {
        self.timeout.map(|t| {
            (t.as_micros() as u64)
                .div_ceil(TICK.as_micros() as u64)
                .max(1)
                + 1
        })
    }
}

/// The store's resource limiter. It remembers a refused grow so that the resulting trap is
/// reported as "memory limit", not as an anonymous trap.
#[derive(Debug)]
pub struct GuestLimiter {
    max_memory: usize,
    pub exceeded: bool,
}

impl GuestLimiter {
    pub fn new(limits: &Limits) -> Self {
        Self {
            max_memory: usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX),
            exceeded: false,
        }
    }
}

impl ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.exceeded = true;
            // An error, not `Ok(false)`: `memory.grow` returning -1 lets a careless guest go
            // on with a null pointer; a trap stops it at the cause.
            return Err(wasmtime::Error::msg("memory limit exceeded"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Starts the thread that advances `engine`'s epoch every [`TICK`]; once per process.
pub fn start_ticker(engine: &Engine) {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let engine = engine.clone();
        let spawned = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                }
            });
        if let Err(error) = spawned {
            // Without a ticker a deadline never fires; a looping guest would hang its task.
            // Refusing here would be worse for every well-behaved transform, so say it loudly.
            tracing::error!(%error, "cannot start the WASM epoch ticker: transform time limits are not enforced");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_and_never_reach_zero() {
        let at = |ms| Limits {
            timeout: Some(Duration::from_millis(ms)),
            ..Limits::default()
        };
        assert_eq!(at(1).deadline_ticks(), Some(2));
        assert_eq!(at(5).deadline_ticks(), Some(2));
        assert_eq!(at(6).deadline_ticks(), Some(3));
        assert_eq!(
            Limits {
                timeout: None,
                ..Limits::default()
            }
            .deadline_ticks(),
            None
        );
    }

    #[test]
    fn the_limiter_refuses_growth_past_the_limit_and_remembers_it() {
        let mut limiter = GuestLimiter::new(&Limits {
            memory_bytes: 128 * 1024,
            ..Limits::default()
        });
        assert!(
            limiter
                .memory_growing(0, 128 * 1024, None)
                .is_ok_and(|ok| ok)
        );
        assert!(!limiter.exceeded);
        assert!(
            limiter
                .memory_growing(128 * 1024, 192 * 1024, None)
                .is_err()
        );
        assert!(limiter.exceeded);
    }
}
