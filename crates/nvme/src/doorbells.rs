//! Doorbells: the MMIO doorbell page, the shadow doorbell buffer and event indexes of
//! Doorbell Buffer Config, validation of the values a driver writes, and the sleep handshake
//! of the worker.

use std::sync::atomic::{fence, Ordering};

use devlend_memory::BusAddr;

use crate::controller::{event, Controller};
use crate::regs::DOORBELL_STRIDE;

impl Controller {
    pub(crate) fn read_shadow(&self, slot: usize) -> Option<u32> {
        let db = self.dbbuf.as_ref()?;
        let off = slot as u64 * DOORBELL_STRIDE;
        match &db.shadow_span {
            Some(span) => span.load_u32(off).ok(),
            None => {
                let mut b = [0u8; 4];
                let addr = db.shadow.checked_add(off)?;
                self.dma.dma_read(BusAddr(addr), &mut b).ok()?;
                Some(u32::from_le_bytes(b))
            }
        }
    }

    pub(crate) fn write_event_index(&self, slot: usize, value: u32) {
        let Some(db) = self.dbbuf.as_ref() else {
            return;
        };
        let off = slot as u64 * DOORBELL_STRIDE;
        match &db.event_span {
            Some(span) => {
                let _ = span.store_u32(off, value);
            }
            None => {
                if let Some(addr) = db.event_index.checked_add(off) {
                    let _ = self.dma.dma_write(BusAddr(addr), &value.to_le_bytes());
                }
            }
        }
    }

    /// Moves I/O queue pair slot `qid` from MMIO doorbells to the shadow buffer, seeding its
    /// shadow and event index slots with the values the controller last accepted.
    pub(crate) fn switch_to_shadow(&mut self, qid: usize) {
        if qid == 0 || self.dbbuf.is_none() {
            return;
        }
        if self
            .sqs
            .get(qid)
            .and_then(Option::as_ref)
            .is_some_and(|q| !q.shadow)
        {
            let _ = self.refresh_sq_tail(qid);
            if let Some(tail) = self.sqs.get(qid).and_then(Option::as_ref).map(|q| q.tail) {
                self.write_shadow(2 * qid, tail);
                self.write_event_index(2 * qid, tail);
            }
            if let Some(q) = self.sqs.get_mut(qid).and_then(Option::as_mut) {
                q.shadow = true;
            }
        }
        if self
            .cqs
            .get(qid)
            .and_then(Option::as_ref)
            .is_some_and(|q| !q.shadow)
        {
            self.refresh_cq_head(qid);
            if let Some((head, entries)) = self
                .cqs
                .get(qid)
                .and_then(Option::as_ref)
                .map(|q| (q.head, q.entries))
            {
                self.write_shadow(2 * qid + 1, head);
                // Just behind the head: head updates need no MMIO ring until the queue fills.
                self.write_event_index(2 * qid + 1, (head + entries - 1) % entries);
            }
            if let Some(q) = self.cqs.get_mut(qid).and_then(Option::as_mut) {
                q.shadow = true;
            }
        }
    }

    pub(crate) fn write_shadow(&self, slot: usize, value: u32) {
        let Some(db) = self.dbbuf.as_ref() else {
            return;
        };
        if let Some(addr) = db.shadow.checked_add(slot as u64 * DOORBELL_STRIDE) {
            let _ = self.dma.dma_write(BusAddr(addr), &value.to_le_bytes());
        }
    }

    pub(crate) fn sq_doorbell(&self, qid: usize, shadow: bool) -> Option<u32> {
        if shadow {
            self.read_shadow(2 * qid)
        } else {
            Some(self.doorbell(2 * qid))
        }
    }

    pub(crate) fn cq_doorbell(&self, qid: usize, shadow: bool) -> Option<u32> {
        if shadow {
            self.read_shadow(2 * qid + 1)
        } else {
            Some(self.doorbell(2 * qid + 1))
        }
    }

    /// Takes a new CQ head from its doorbell; an invalid value is ignored and reported.
    pub(crate) fn refresh_cq_head(&mut self, qid: usize) {
        let Some(shadow) = self.cqs.get(qid).and_then(Option::as_ref).map(|q| q.shadow) else {
            return;
        };
        let Some(head) = self.cq_doorbell(qid, shadow) else {
            return;
        };
        let mut invalid = false;
        if let Some(cq) = self.cqs.get_mut(qid).and_then(Option::as_mut) {
            if head != cq.head {
                if cq.head_is_valid(head) {
                    cq.head = head;
                } else {
                    invalid = true;
                }
            }
        }
        if invalid {
            // Ignore the value; stop reporting it once until the driver writes a new one.
            if !shadow {
                if let Some(cq) = self.cqs.get(qid).and_then(Option::as_ref) {
                    if let Some(d) = self.doorbells.get(2 * qid + 1) {
                        let _ =
                            d.compare_exchange(head, cq.head, Ordering::AcqRel, Ordering::Acquire);
                    }
                }
            }
            self.raise_event(
                event::TYPE_ERROR,
                event::INFO_INVALID_DOORBELL_VALUE,
                event::LOG_ERROR,
            );
        }
    }

    /// The SQ tail the driver published, if valid.
    pub(crate) fn refresh_sq_tail(&mut self, qid: usize) -> Option<()> {
        let (shadow, entries, tail) = self
            .sqs
            .get(qid)
            .and_then(Option::as_ref)
            .map(|q| (q.shadow, q.entries, q.tail))?;
        let new = self.sq_doorbell(qid, shadow)?;
        if new == tail {
            return Some(());
        }
        if new >= entries {
            if !shadow {
                if let Some(d) = self.doorbells.get(2 * qid) {
                    let _ = d.compare_exchange(new, tail, Ordering::AcqRel, Ordering::Acquire);
                }
            }
            self.raise_event(
                event::TYPE_ERROR,
                event::INFO_INVALID_DOORBELL_VALUE,
                event::LOG_ERROR,
            );
            return Some(());
        }
        if let Some(q) = self.sqs.get_mut(qid).and_then(Option::as_mut) {
            q.tail = new;
        }
        Some(())
    }

    /// Whether any doorbell shows work the worker has not taken (for the sleep decision).
    pub(crate) fn has_work(&self) -> bool {
        if !self.ready || self.fatal || self.shut_down {
            return false;
        }
        // A completion queue without a free slot (beyond those reserved for commands in
        // flight) whose head doorbell has not moved blocks its submission queues: nothing to
        // do there until the driver consumes entries or a command in flight posts (its pool
        // thread then wakes the worker).
        let blocked = |cqid: usize| {
            self.cqs
                .get(cqid)
                .and_then(Option::as_ref)
                .is_none_or(|cq| {
                    !cq.has_room() && self.cq_doorbell(cqid, cq.shadow) == Some(cq.head)
                })
        };
        for (qid, sq) in self.sqs.iter().enumerate() {
            let Some(sq) = sq else { continue };
            let pending = self
                .sq_doorbell(qid, sq.shadow)
                .is_some_and(|tail| tail < sq.entries && tail != sq.head);
            if pending && !blocked(usize::from(sq.cqid)) {
                return true;
            }
        }
        !self.aers.is_empty() && !self.events.is_empty() && !blocked(0)
    }

    /// Before the worker sleeps: publish event indexes so that the driver's next shadow
    /// update rings the MMIO doorbell (which wakes the worker), and report doorbell writes to
    /// queues that do not exist.
    pub(crate) fn prepare_sleep(&mut self) {
        if self.dbbuf.is_some() {
            for (qid, sq) in self.sqs.iter().enumerate() {
                if let Some(sq) = sq.as_ref().filter(|q| q.shadow) {
                    self.write_event_index(2 * qid, sq.head);
                }
            }
            // A completion queue head matters only when the queue is full (it blocks
            // submissions): only then ask for an MMIO ring on the next head update.
            for (qid, cq) in self.cqs.iter().enumerate() {
                if let Some(cq) = cq.as_ref().filter(|q| q.shadow && !q.has_room()) {
                    self.write_event_index(2 * qid + 1, cq.head);
                }
            }
        }
        if self.ready {
            let mut stray = false;
            for qid in 0..self.sqs.len() {
                if self.sqs.get(qid).is_some_and(Option::is_none) && self.doorbell(2 * qid) != 0 {
                    self.reset_doorbell(2 * qid);
                    stray = true;
                }
                if self.cqs.get(qid).is_some_and(Option::is_none) && self.doorbell(2 * qid + 1) != 0
                {
                    self.reset_doorbell(2 * qid + 1);
                    stray = true;
                }
            }
            if stray {
                self.raise_event(
                    event::TYPE_ERROR,
                    event::INFO_INVALID_DOORBELL_REGISTER,
                    event::LOG_ERROR,
                );
            }
        }
        fence(Ordering::SeqCst);
    }
}
