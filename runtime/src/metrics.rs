//! The worker's one metrics registry, served at `/metrics` in Prometheus' text format.

use std::sync::{Arc, OnceLock};

use medconnect_api::limits::ByteBudget;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

const TASK_LABELS: &[&str] = &["connector", "task"];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Records a task took in: polled from its source, or consumed from Kafka for a sink.
    pub records_in: IntCounterVec,
    /// Records a task delivered: acknowledged by Kafka, or flushed by a sink.
    pub records_out: IntCounterVec,
    /// Records dropped on purpose by a transform.
    pub records_filtered: IntCounterVec,
    /// Failures, by stage (TRANSFORMATION, TASK_PUT, KAFKA_PRODUCE, ...).
    pub errors: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    /// Records delivered whose offsets are not committed yet.
    pub offset_commit_lag: IntGaugeVec,
    /// Records handed to Kafka and not yet acknowledged.
    pub in_flight: IntGaugeVec,
    pub offset_commits: IntCounterVec,
    /// The worker's budget for bytes senders make listeners hold, read at each scrape.
    listener_budget: Arc<OnceLock<Arc<ByteBudget>>>,
    /// `used`, `peak` and `capacity` of that budget.
    listener_budget_bytes: IntGaugeVec,
    /// Takings that budget refused (a sender turned away or made to wait).
    listener_budget_refusals: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let counter = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("metric {name} is well-formed: {e}"));
    // Names are unique by construction; a duplicate would only fail to be exported.
    let _ = registry.register(Box::new(counter.clone()));
    counter
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGaugeVec {
    let gauge = IntGaugeVec::new(Opts::new(name, help), TASK_LABELS)
        .unwrap_or_else(|e| unreachable!("metric {name} is well-formed: {e}"));
    let _ = registry.register(Box::new(gauge.clone()));
    gauge
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new_custom(Some("medconnect".into()), None)
            .unwrap_or_else(|e| unreachable!("the metric prefix is valid: {e}"));
        Self {
            records_in: counter(
                &registry,
                "records_in_total",
                "Records taken in by a task.",
                TASK_LABELS,
            ),
            records_out: counter(
                &registry,
                "records_out_total",
                "Records delivered by a task.",
                TASK_LABELS,
            ),
            records_filtered: counter(
                &registry,
                "records_filtered_total",
                "Records dropped by a transform.",
                TASK_LABELS,
            ),
            errors: counter(
                &registry,
                "errors_total",
                "Record and task failures by stage.",
                &["connector", "task", "stage"],
            ),
            dead_lettered: counter(
                &registry,
                "dlq_records_total",
                "Records written to a dead-letter topic.",
                TASK_LABELS,
            ),
            offset_commit_lag: gauge(
                &registry,
                "offset_commit_lag_records",
                "Delivered records whose offsets are not committed yet.",
            ),
            in_flight: gauge(
                &registry,
                "records_in_flight",
                "Records sent to Kafka and not yet acknowledged.",
            ),
            offset_commits: counter(
                &registry,
                "offset_commits_total",
                "Offset commits.",
                TASK_LABELS,
            ),
            listener_budget: Arc::default(),
            listener_budget_bytes: {
                let gauge = IntGaugeVec::new(
                    Opts::new(
                        "listener_budget_bytes",
                        "The worker's budget for bytes senders make listener sources hold (MLLP, MQTT): used, peak and capacity.",
                    ),
                    &["measure"],
                )
                .unwrap_or_else(|e| unreachable!("metric listener_budget_bytes is well-formed: {e}"));
                let _ = registry.register(Box::new(gauge.clone()));
                gauge
            },
            listener_budget_refusals: {
                let gauge = IntGauge::new(
                    "listener_budget_refusals",
                    "Takings the worker's listener budget refused since start (a sender turned away or made to wait).",
                )
                .unwrap_or_else(|e| unreachable!("metric listener_budget_refusals is well-formed: {e}"));
                let _ = registry.register(Box::new(gauge.clone()));
                gauge
            },
            registry,
        }
    }
}

impl Metrics {
    /// Exports `budget` at every scrape (the herder's, set once).
    pub fn watch_listener_budget(&self, budget: Arc<ByteBudget>) {
        let _ = self.listener_budget.set(budget);
    }

    pub fn render(&self) -> String {
        if let Some(budget) = self.listener_budget.get() {
            let as_gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            for (measure, value) in [
                ("used", budget.used()),
                ("peak", budget.peak()),
                ("capacity", budget.capacity()),
            ] {
                self.listener_budget_bytes
                    .with_label_values(&[measure])
                    .set(as_gauge(value));
            }
            self.listener_budget_refusals
                .set(i64::try_from(budget.refused()).unwrap_or(i64::MAX));
        }
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }

    /// Forgets a task's series once it stopped, so `/metrics` does not grow without bound.
    pub fn remove_task(&self, connector: &str, task: &str) {
        for vec in [
            &self.records_in,
            &self.records_out,
            &self.records_filtered,
            &self.dead_lettered,
            &self.offset_commits,
        ] {
            let _ = vec.remove_label_values(&[connector, task]);
        }
        for vec in [&self.offset_commit_lag, &self.in_flight] {
            let _ = vec.remove_label_values(&[connector, task]);
        }
    }
}

/// One task's series, resolved once: updating them on the hot path is an atomic operation,
/// not a label lookup.
#[derive(Clone)]
pub struct TaskMetrics {
    metrics: Metrics,
    connector: String,
    task: String,
    records_in: IntCounter,
    records_out: IntCounter,
    records_filtered: IntCounter,
    dead_lettered: IntCounter,
    offset_commits: IntCounter,
    offset_commit_lag: IntGauge,
    in_flight: IntGauge,
}

impl TaskMetrics {
    pub fn new(metrics: &Metrics, connector: &str, task: u32) -> Self {
        let task = task.to_string();
        let labels = [connector, task.as_str()];
        Self {
            records_in: metrics.records_in.with_label_values(&labels),
            records_out: metrics.records_out.with_label_values(&labels),
            records_filtered: metrics.records_filtered.with_label_values(&labels),
            dead_lettered: metrics.dead_lettered.with_label_values(&labels),
            offset_commits: metrics.offset_commits.with_label_values(&labels),
            offset_commit_lag: metrics.offset_commit_lag.with_label_values(&labels),
            in_flight: metrics.in_flight.with_label_values(&labels),
            metrics: metrics.clone(),
            connector: connector.to_string(),
            task,
        }
    }

    pub fn records_in(&self, n: u64) {
        self.records_in.inc_by(n);
    }

    pub fn records_out(&self, n: u64) {
        self.records_out.inc_by(n);
    }

    pub fn filtered(&self) {
        self.records_filtered.inc();
    }

    pub fn error(&self, stage: &str) {
        self.metrics
            .errors
            .with_label_values(&[&self.connector, &self.task, stage])
            .inc();
    }

    pub fn dead_lettered(&self) {
        self.dead_lettered.inc();
    }

    pub fn set_commit_lag(&self, records: i64) {
        self.offset_commit_lag.set(records);
    }

    pub fn set_in_flight(&self, records: i64) {
        self.in_flight.set(records);
    }

    pub fn committed(&self) {
        self.offset_commits.inc();
    }

    pub fn remove(&self) {
        self.metrics.remove_task(&self.connector, &self.task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medconnect_api::limits::Reservation;

    #[test]
    fn the_listener_budget_is_read_at_each_scrape() {
        let metrics = Metrics::default();
        let budget = ByteBudget::new(1000);
        metrics.watch_listener_budget(budget.clone());
        let mut held = Reservation::new(budget.within(800));
        assert!(held.grow(600));
        assert!(!held.grow(300));
        let text = metrics.render();
        for line in [
            "medconnect_listener_budget_bytes{measure=\"used\"} 600",
            "medconnect_listener_budget_bytes{measure=\"peak\"} 600",
            "medconnect_listener_budget_bytes{measure=\"capacity\"} 1000",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        drop(held);
        assert!(
            metrics
                .render()
                .contains("medconnect_listener_budget_bytes{measure=\"used\"} 0")
        );
    }
}
