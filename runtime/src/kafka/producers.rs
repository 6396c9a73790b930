//! Producers shared among source tasks whose client settings are the same.
//!
//! librdkafka gives every producer its own threads (its main thread, one per broker; ours
//! had a delivery polling thread too), which wake on their timers whether records flow or
//! not: a worker with a producer per task spent ~90 % of its CPU in them with 100 idle tasks.
//! Sharing keeps every guarantee a task relies on: each send has its own delivery
//! future, which the task awaits before it settles the record (a task never flushes the
//! producer as a whole); per-partition order holds within one producer; a full queue makes a
//! task wait for room, as before. Tasks with `producer.override.*` settings of their own get
//! a producer of their own. What is shared: one fatal error (e.g. of idempotence) fails every
//! task on that producer, which restart with a new one once the last has let go of it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use super::{KafkaSettings, KafkaSetupError, Producer};

#[derive(Default)]
pub struct ProducerPool {
    /// By the producer's complete client settings; dropped when no task holds it any more.
    producers: Mutex<HashMap<BTreeMap<String, String>, Weak<Producer>>>,
}

impl ProducerPool {
    /// The producer for `overrides` on top of `settings`: the one a task with the same
    /// settings holds, or a new one.
    pub fn get(
        &self,
        settings: &KafkaSettings,
        overrides: &BTreeMap<String, String>,
    ) -> Result<Arc<Producer>, KafkaSetupError> {
        let config = settings.producer_config(overrides);
        let key: BTreeMap<String, String> = config
            .config_map()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut producers = self
            .producers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        producers.retain(|_, producer| producer.strong_count() > 0);
        if let Some(producer) = producers.get(&key).and_then(Weak::upgrade) {
            return Ok(producer);
        }
        let producer = Arc::new(
            config
                .create::<Producer>()
                .map_err(|e| KafkaSetupError::client("producer", e))?,
        );
        producers.insert(key, Arc::downgrade(&producer));
        Ok(producer)
    }

    /// How many producers tasks hold now.
    #[cfg(test)]
    fn live(&self) -> usize {
        self.producers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|p| p.strong_count() > 0)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // In a runtime: a producer's deliveries are served by a task.
    #[tokio::test]
    async fn same_settings_share_a_producer_until_the_last_lets_go() -> Result<(), KafkaSetupError>
    {
        let pool = ProducerPool::default();
        let settings = KafkaSettings::new("127.0.0.1:1");
        let none = BTreeMap::new();
        let own = BTreeMap::from([("linger.ms".to_string(), "50".to_string())]);
        let a = pool.get(&settings, &none)?;
        let b = pool.get(&settings, &none)?;
        assert!(Arc::ptr_eq(&a, &b));
        let c = pool.get(&settings, &own)?;
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(pool.live(), 2);
        drop((a, b));
        assert_eq!(pool.live(), 1);
        let d = pool.get(&settings, &none)?;
        assert_eq!(pool.live(), 2);
        drop((c, d));
        assert_eq!(pool.live(), 0);
        Ok(())
    }
}
