//! The worker's one metrics registry, served at `/metrics` in Prometheus' text format.

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
            registry,
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
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
