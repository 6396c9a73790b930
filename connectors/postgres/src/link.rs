//! The task's connection, kept from one batch to the next. Taken from the pool for each
//! batch, it was pinged by sqlx twice per batch (when it went back to the pool and when it
//! left it again): two round trips per batch. Kept, it is pinged only when it has been idle
//! for a while, which is what the pool's check is for (a server restarted meanwhile); after
//! a failed batch it is closed, as its state is then unknown, and the next comes from the
//! pool.

use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, PgPool, Postgres};

use crate::error::WriteError;

/// A connection used this recently is used without a ping.
const FRESH: Duration = Duration::from_secs(1);

pub struct Link {
    pool: PgPool,
    held: Option<PoolConnection<Postgres>>,
    used: Instant,
}

impl Link {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            held: None,
            used: Instant::now(),
        }
    }

    /// The connection: the one held, checked first if idle for a while, or one from the pool.
    pub async fn get(&mut self) -> Result<&mut PgConnection, WriteError> {
        if self.used.elapsed() >= FRESH
            && let Some(held) = self.held.as_mut()
            && held.ping().await.is_err()
        {
            self.discard();
        }
        let held = match self.held.take() {
            Some(held) => held,
            None => self.pool.acquire().await.map_err(WriteError::Connection)?,
        };
        self.used = Instant::now();
        Ok(&mut **self.held.insert(held))
    }

    /// Closes the connection held, whose state is unknown (a failed batch, a COPY sqlx left
    /// half read); the next [`Link::get`] takes another from the pool.
    pub fn discard(&mut self) {
        if let Some(mut held) = self.held.take() {
            held.close_on_drop();
        }
    }

    pub async fn close(mut self) {
        if let Some(held) = self.held.take() {
            let _ = held.close().await;
        }
        self.pool.close().await;
    }
}
