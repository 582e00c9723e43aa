//! The background sweep: bounded steps that drop expired messages from
//! queues nobody reads or writes any more, delete commit fences idle
//! longer than the fence TTL, and count what the queues hold on the way
//! (the shell reports the totals of each round).
//!
//! Invariants it keeps: each step does bounded work (at most
//! [`limits::SWEEP_RECORDS_PER_STEP`] records per walk and
//! [`limits::TTL_EXPIRY_PER_REQUEST_MAX`] expired messages), writes what it
//! changes in one batch that only frees space (or stamps an old fence), so a
//! full disk does not stop it, and picks up where the last step stopped.
//! Requests never wait for it, and a failed machine does not sweep.

use crate::error::ServiceError;
use crate::limits;
use crate::store::{Batch, Store};
use crate::time::Time;

use super::layout::{self, Fence, QueueMeta};
use super::queues::BlobDrops;
use super::{NodeService, Swept, corrupt, stamp_ms, store_failure};

impl<S: Store> NodeService<S> {
    /// One bounded step of the background sweep, which the shell runs on
    /// a timer (`sweep_interval_ms`): it walks the queues' counters, at
    /// most [`limits::SWEEP_RECORDS_PER_STEP`] a step, and drops their
    /// messages older than the message TTL (at most
    /// [`limits::TTL_EXPIRY_PER_REQUEST_MAX`] a step), so a queue nobody
    /// reads or writes any more does not keep expired messages on disk;
    /// and it walks the commit fences as far, deleting those whose last
    /// Commit is older than the fence TTL. Each walk carries on where the
    /// last step stopped and starts over at its end. What it changes goes
    /// in one batch (a sync is asked for as after a request). The queue
    /// walk runs without a TTL too, to count the messages and bytes the
    /// queues hold ([`Swept::queued_bytes`]); the fence walk needs its
    /// TTL. Requests never wait for a
    /// sweep, and a failed read or write ends the step (a write refused for
    /// a full disk leaves its work to the next round; any other failed
    /// write fails the machine as any write does).
    pub fn handle_sweep(&mut self, now: Time) -> Swept {
        let mut swept = Swept::default();
        if self.gate.failure().is_some() {
            return swept;
        }
        // It only frees space (or stamps an old fence): a store may let it
        // into its reserve.
        let mut batch = Batch::upkeep();
        let mut drops = BlobDrops::default();
        let walked = self
            .sweep_queues(now, &mut batch, &mut drops, &mut swept)
            .and_then(|queues_done| {
                let fences_done = self.sweep_fences(now, &mut batch, &mut swept)?;
                Ok(queues_done && fences_done)
            });
        swept.round_done = walked.unwrap_or(false);
        if !batch.is_empty() && self.finish_drops(drops, &mut batch).is_ok() {
            // A failed write fails the machine; nothing else to do here.
            let _ = self.write(batch);
            self.gate.request_sync();
        }
        swept
    }

    /// The queue walk of [`Self::handle_sweep`]; whether it reached the end.
    fn sweep_queues(
        &mut self,
        now: Time,
        batch: &mut Batch,
        drops: &mut BlobDrops,
        swept: &mut Swept,
    ) -> Result<bool, ServiceError> {
        let records = self
            .store
            .scan(
                &layout::queue_meta_prefix(),
                self.sweep_queues_after.as_deref(),
                limits::SWEEP_RECORDS_PER_STEP,
            )
            .map_err(store_failure)?;
        let done = records.len() < limits::SWEEP_RECORDS_PER_STEP;
        for (key, value) in records {
            if swept.expired >= limits::TTL_EXPIRY_PER_REQUEST_MAX {
                // The budget is spent: this queue comes first next step.
                return Ok(false);
            }
            let queue = layout::queue_of_meta_key(&key).map_err(corrupt)?;
            let mut meta = QueueMeta::decode(&value).map_err(corrupt)?;
            let head = meta.head;
            if self.config.message_ttl.is_some() {
                self.expire(now, &queue, &mut meta, batch, drops)?;
            }
            let dropped = meta.head - head;
            swept.queues += 1;
            swept.expired += dropped;
            swept.queued_messages += meta.depth();
            swept.queued_bytes += meta.bytes;
            if dropped >= limits::TTL_EXPIRY_PER_REQUEST_MAX {
                // It may hold more; it comes first next step.
                return Ok(false);
            }
            self.sweep_queues_after = Some(key);
        }
        if done {
            self.sweep_queues_after = None;
        }
        Ok(done)
    }

    /// The fence walk of [`Self::handle_sweep`]; whether it reached the
    /// end. A fence written before format 3 carries no time: it gets the
    /// sweep's, and its idle time counts from there.
    fn sweep_fences(
        &mut self,
        now: Time,
        batch: &mut Batch,
        swept: &mut Swept,
    ) -> Result<bool, ServiceError> {
        let Some(ttl) = self.config.fence_ttl else {
            self.sweep_fences_after = None;
            return Ok(true);
        };
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let now_ms = stamp_ms(now);
        let records = self
            .store
            .scan(
                &layout::fence_prefix(),
                self.sweep_fences_after.as_deref(),
                limits::SWEEP_RECORDS_PER_STEP,
            )
            .map_err(store_failure)?;
        let done = records.len() < limits::SWEEP_RECORDS_PER_STEP;
        for (key, value) in records {
            let mut fence = Fence::decode(&value).map_err(corrupt)?;
            swept.fences += 1;
            match fence.touched_ms {
                Some(t) if now_ms.saturating_sub(t) > ttl_ms => {
                    batch.delete(key.clone());
                    swept.fences_deleted += 1;
                }
                Some(_) => {}
                None => {
                    fence.touched_ms = Some(now_ms);
                    batch.put(key.clone(), fence.encode());
                }
            }
            self.sweep_fences_after = Some(key);
        }
        if done {
            self.sweep_fences_after = None;
        }
        Ok(done)
    }
}
