//! Offset writes: the acknowledged offsets stored in the offset topic beside the pipeline (a
//! slow offset topic never stops records from settling), then handed to the task's `commit`.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use medconnect_api::{SourceOffset, SourcePartition};

use crate::task::RunnerSettings;

use super::StoredOffsets;
use super::pipeline::Pipeline;

/// Waits for the offset write under way (never ready when there is none).
pub(super) fn offset_write(
    committing: &mut Option<tokio::task::JoinHandle<OffsetWrite>>,
) -> impl Future<Output = Result<OffsetWrite, tokio::task::JoinError>> + '_ {
    std::future::poll_fn(move |cx| match committing {
        Some(write) => Pin::new(write).poll(cx),
        None => Poll::Pending,
    })
}

impl Pipeline {
    /// Starts storing the acknowledged offsets, unless a write is under way already.
    pub(super) fn start_offset_write(&mut self) {
        if self.committing.is_some() || self.pending_offsets.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.pending_offsets);
        let settled = std::mem::take(&mut self.uncommitted);
        let offsets = self.offsets.clone();
        let connector = self.connector.clone();
        self.committing = Some(tokio::spawn(async move {
            let write: Vec<_> = batch
                .iter()
                .map(|(p, o)| (p.clone(), Some(o.clone())))
                .collect();
            let result = offsets.write(&connector, write).await;
            OffsetWrite {
                batch,
                settled,
                result,
            }
        }));
    }

    /// Hands what was stored to the task's next `commit`; a failed write is tried again
    /// with the next one (positions settled since then win).
    pub(super) fn finish_offset_write(
        &mut self,
        written: Result<OffsetWrite, tokio::task::JoinError>,
        stored: &StoredOffsets,
    ) {
        match written {
            Ok(OffsetWrite {
                batch,
                result: Ok(()),
                ..
            }) => {
                stored.add(batch);
                self.metrics.committed();
            }
            Ok(OffsetWrite {
                batch,
                settled,
                result: Err(error),
            }) => {
                tracing::warn!(connector = %self.connector, %error, "cannot store offsets; will retry");
                for (partition, offset) in batch {
                    if !self.pending_offsets.iter().any(|(p, _)| *p == partition) {
                        self.pending_offsets.push((partition, offset));
                    }
                }
                self.uncommitted += settled;
            }
            // Its positions are settled again by later records, or polled again after a restart.
            Err(error) => {
                tracing::error!(connector = %self.connector, %error, "offset write ended abnormally")
            }
        }
        self.metrics.set_commit_lag(self.uncommitted);
    }

    /// Stores every acknowledged offset before the task stops (bounded by the shutdown
    /// timeout): the write under way, then what was settled since.
    pub(super) async fn store_offsets_now(
        &mut self,
        stored: &StoredOffsets,
        settings: &RunnerSettings,
    ) {
        let deadline = tokio::time::Instant::now() + settings.shutdown_timeout;
        for _ in 0..2 {
            if self.committing.is_none() {
                self.start_offset_write();
            }
            let Some(write) = self.committing.take() else {
                return;
            };
            match tokio::time::timeout_at(deadline, write).await {
                Ok(written) => self.finish_offset_write(written, stored),
                Err(_) => {
                    tracing::warn!(connector = %self.connector, "offsets not stored before the shutdown timeout; their records will be sent again");
                    return;
                }
            }
        }
    }
}

/// The result of one offset write, with what it wrote.
pub(super) struct OffsetWrite {
    pub(super) batch: Vec<(SourcePartition, SourceOffset)>,
    /// Records settled into this batch, for the commit-lag metric.
    pub(super) settled: i64,
    pub(super) result: Result<(), crate::store::StoreError>,
}
