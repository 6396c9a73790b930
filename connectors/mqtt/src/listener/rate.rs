//! CONNECTs per second on a worker: a token bucket, so a reconnect storm after an outage is
//! spread out instead of answered all at once.

use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug)]
pub struct ConnectRate {
    per_second: f64,
    state: Mutex<(f64, Instant)>,
}

impl ConnectRate {
    pub fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        Self {
            per_second,
            state: Mutex::new((per_second, Instant::now())),
        }
    }

    /// Takes a token if one is left.
    pub fn try_take(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, refilled) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*refilled).as_secs_f64() * self.per_second)
            .min(self.per_second);
        *refilled = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_of_one_second_then_refuses() {
        let rate = ConnectRate::new(5);
        assert_eq!((0..10).filter(|_| rate.try_take()).count(), 5);
    }
}
