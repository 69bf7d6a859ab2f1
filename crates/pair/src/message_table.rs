//! The message table (seed 002): for each client request that changed state, the reply it got,
//! so a resend after any failure is answered from here and never executed twice.
//!
//! Entries come from commit and abort records (each names the request it answers) and from
//! checkpoint records (the whole table), so a backup fed by the checkpoint stream and a primary
//! recovered from the trail rebuild the same table. A request still executing is `Pending`:
//! a resend then waits for the first execution's reply.
//!
//! The table is bounded. A client's requests below its low mark are forgotten: the client said it
//! saw their replies (`acknowledge_below`), or the table evicted them to stay within its limit.
//! A resend of a forgotten request gets [`Lookup::Forgotten`], a clear error, never a second
//! execution. Low marks ride in checkpoint records with the entries.
//!
//! A client that is idle and has seen every reply it was sent (no entries kept, and its low mark
//! is its own acknowledgement, not an eviction) needs no low mark: a client never resends a
//! request below what it acknowledged. Such clients are dropped when a checkpoint is taken
//! ([`MessageTable::forget_idle_clients`]) and left out of checkpoint records, so the low marks
//! of every client that ever connected do not pile up in each checkpoint.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{ClientId, Reply, RequestKey, RequestSeq, TxId};

/// One answered request, as carried by checkpoint records and the checkpoint stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageEntry {
    pub request: RequestKey,
    pub reply: Reply,
}

/// How big the table may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageTableLimits {
    /// Answered entries kept in all; past it the oldest of the busiest client are forgotten.
    pub max_entries: usize,
    /// Answered entries kept per client.
    pub max_entries_per_client: usize,
}

impl Default for MessageTableLimits {
    fn default() -> Self {
        // About 40 bytes an entry in a checkpoint record: 1.3 MB at most, under the 2 MiB
        // record limit.
        MessageTableLimits {
            max_entries: 32_768,
            max_entries_per_client: 1_024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    Pending(TxId),
    Done(Reply),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ClientEntries {
    /// Requests below this are forgotten.
    low: u64,
    /// The client said it saw every reply below this (`acknowledge_below`).
    acked: u64,
    slots: BTreeMap<u64, Slot>,
    done: usize,
}

/// What the table knows of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Never seen: execute it.
    New,
    /// Executing in this transaction: wait for its reply.
    Pending(TxId),
    /// Answered: send this reply again.
    Done(Reply),
    /// Answered long ago and no longer kept: a clear error, not a second execution.
    Forgotten { low: RequestSeq },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageTable {
    limits: MessageTableLimits,
    clients: BTreeMap<ClientId, ClientEntries>,
    done: usize,
}

impl MessageTable {
    pub fn new(limits: MessageTableLimits) -> Self {
        MessageTable {
            limits,
            clients: BTreeMap::new(),
            done: 0,
        }
    }

    pub fn lookup(&self, request: RequestKey) -> Lookup {
        let Some(c) = self.clients.get(&request.client) else {
            return Lookup::New;
        };
        if request.seq.0 < c.low {
            return Lookup::Forgotten {
                low: RequestSeq(c.low),
            };
        }
        match c.slots.get(&request.seq.0) {
            None => Lookup::New,
            Some(Slot::Pending(tx)) => Lookup::Pending(*tx),
            Some(Slot::Done(reply)) => Lookup::Done(*reply),
        }
    }

    /// Marks `request` as executing in `tx`. Only a `New` request may start.
    pub fn start(&mut self, request: RequestKey, tx: TxId) -> Lookup {
        let found = self.lookup(request);
        if found == Lookup::New {
            self.clients
                .entry(request.client)
                .or_default()
                .slots
                .insert(request.seq.0, Slot::Pending(tx));
        }
        found
    }

    /// Drops a pending request that produced no reply to keep (its transaction was lost with
    /// the primary before its end was logged): a resend executes it as new.
    pub fn forget_pending(&mut self, request: RequestKey) {
        if let Some(c) = self.clients.get_mut(&request.client)
            && matches!(c.slots.get(&request.seq.0), Some(Slot::Pending(_)))
        {
            c.slots.remove(&request.seq.0);
        }
    }

    /// Records the reply of `request`. A reply for a forgotten request is ignored (its
    /// client has moved on).
    pub fn finish(&mut self, request: RequestKey, reply: Reply) {
        let c = self.clients.entry(request.client).or_default();
        if request.seq.0 < c.low {
            return;
        }
        let previous = c.slots.insert(request.seq.0, Slot::Done(reply));
        if !matches!(previous, Some(Slot::Done(_))) {
            c.done += 1;
            self.done += 1;
        }
        self.enforce_limits(request.client);
    }

    /// The client saw every reply below `seq`: forget them.
    pub fn acknowledge_below(&mut self, client: ClientId, seq: RequestSeq) {
        if let Some(c) = self.clients.get_mut(&client) {
            c.acked = c.acked.max(seq.0);
        }
        self.forget_below(client, seq);
    }

    /// Whether `c` needs no entry at all: nothing kept, and its low mark is its own
    /// acknowledgement (see the module docs).
    fn idle_and_seen(c: &ClientEntries) -> bool {
        c.slots.is_empty() && c.acked >= c.low
    }

    /// Drops the clients that need no entry (see the module docs); returns how many.
    pub fn forget_idle_clients(&mut self) -> usize {
        let before = self.clients.len();
        self.clients.retain(|_, c| !Self::idle_and_seen(c));
        before - self.clients.len()
    }

    /// Forgets `client`'s requests below `seq`: acknowledged, or evicted to stay in the limits.
    fn forget_below(&mut self, client: ClientId, seq: RequestSeq) {
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        if seq.0 <= c.low {
            return;
        }
        c.low = seq.0;
        let kept = c.slots.split_off(&seq.0);
        let dropped = std::mem::replace(&mut c.slots, kept);
        let dropped_done = dropped
            .values()
            .filter(|s| matches!(s, Slot::Done(_)))
            .count();
        c.done -= dropped_done;
        self.done -= dropped_done;
    }

    fn enforce_limits(&mut self, client: ClientId) {
        let per_client = self.limits.max_entries_per_client.max(1);
        if let Some(c) = self.clients.get(&client)
            && c.done > per_client
        {
            let seq = self.nth_done_after_oldest(client, c.done - per_client);
            self.forget_below(client, RequestSeq(seq));
        }
        let mut rounds = 0usize;
        while self.done > self.limits.max_entries.max(1) && rounds < self.clients.len() + 1 {
            rounds += 1;
            let Some((&busiest, c)) = self.clients.iter().max_by_key(|(id, c)| (c.done, *id))
            else {
                break;
            };
            let excess = (self.done - self.limits.max_entries.max(1)).min(c.done);
            let seq = self.nth_done_after_oldest(busiest, excess);
            self.forget_below(busiest, RequestSeq(seq));
        }
    }

    /// The sequence number just past the `n`-th oldest answered entry of `client`.
    fn nth_done_after_oldest(&self, client: ClientId, n: usize) -> u64 {
        let Some(c) = self.clients.get(&client) else {
            return 0;
        };
        c.slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Done(_)))
            .nth(n.saturating_sub(1))
            .map_or(c.low, |(seq, _)| seq + 1)
    }

    /// The answered entries and every client's low mark, for a checkpoint record.
    pub fn entries(&self) -> (Vec<MessageEntry>, Vec<(ClientId, RequestSeq)>) {
        let mut entries = Vec::with_capacity(self.done);
        let mut lows = Vec::new();
        for (&client, c) in &self.clients {
            if c.low > 0 && !Self::idle_and_seen(c) {
                lows.push((client, RequestSeq(c.low)));
            }
            for (&seq, slot) in &c.slots {
                if let Slot::Done(reply) = slot {
                    entries.push(MessageEntry {
                        request: RequestKey {
                            client,
                            seq: RequestSeq(seq),
                        },
                        reply: *reply,
                    });
                }
            }
        }
        (entries, lows)
    }

    /// Rebuilds a table from a checkpoint's entries and low marks.
    pub fn restore(
        limits: MessageTableLimits,
        entries: &[MessageEntry],
        lows: &[(ClientId, RequestSeq)],
    ) -> Self {
        let mut table = MessageTable::new(limits);
        for &(client, seq) in lows {
            table.clients.entry(client).or_default().low = seq.0;
        }
        for e in entries {
            table.finish(e.request, e.reply);
        }
        table
    }

    /// Answered entries kept.
    pub fn len(&self) -> usize {
        self.done
    }

    pub fn is_empty(&self) -> bool {
        self.done == 0
    }

    /// Checks the table's invariants; tests call it after every step.
    pub fn validate(&self) -> Result<(), String> {
        let mut done = 0;
        for (client, c) in &self.clients {
            let counted = c
                .slots
                .values()
                .filter(|s| matches!(s, Slot::Done(_)))
                .count();
            if counted != c.done {
                return Err(format!(
                    "client {}: {} answered entries counted, {} kept",
                    client.0, c.done, counted
                ));
            }
            if let Some((&first, _)) = c.slots.iter().next()
                && first < c.low
            {
                return Err(format!(
                    "client {}: entry {first} kept below the low mark {}",
                    client.0, c.low
                ));
            }
            if c.done > self.limits.max_entries_per_client.max(1) {
                return Err(format!(
                    "client {}: {} entries over the limit",
                    client.0, c.done
                ));
            }
            done += counted;
        }
        if done != self.done {
            return Err(format!("{} entries counted, {done} kept", self.done));
        }
        if self.done > self.limits.max_entries.max(1) {
            return Err(format!("{} entries over the limit", self.done));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::AbortReason;
    use duplex_lsg::OwnerEpoch;
    use proptest::prelude::*;

    fn key(client: u64, seq: u64) -> RequestKey {
        RequestKey {
            client: ClientId(client),
            seq: RequestSeq(seq),
        }
    }

    fn tx(n: u64) -> TxId {
        TxId {
            epoch: OwnerEpoch(1),
            number: n,
        }
    }

    const REPLY: Reply = Reply::Aborted(AbortReason::Requested);

    #[test]
    fn idle_clients_that_saw_every_reply_are_dropped_and_evicted_ones_are_kept() {
        let limits = MessageTableLimits {
            max_entries: 100,
            max_entries_per_client: 1,
        };
        let mut t = MessageTable::new(limits);
        let key = |client, seq| RequestKey {
            client: ClientId(client),
            seq: RequestSeq(seq),
        };
        let reply = Reply::Aborted(crate::ids::AbortReason::Requested);
        // Client 1 saw its reply: idle, nothing to keep.
        t.finish(key(1, 1), reply);
        t.acknowledge_below(ClientId(1), RequestSeq(2));
        // Client 2's first reply was evicted by the per-client limit, unseen: its low mark
        // must stay, or a resend would run again.
        t.finish(key(2, 1), reply);
        t.finish(key(2, 2), reply);
        t.acknowledge_below(ClientId(2), RequestSeq(1));
        let (_, lows) = t.entries();
        assert_eq!(
            lows,
            vec![(ClientId(2), RequestSeq(2))],
            "client 1 needs no low mark"
        );
        assert_eq!(t.forget_idle_clients(), 1);
        assert_eq!(
            t.lookup(key(1, 1)),
            Lookup::New,
            "client 1 is forgotten whole"
        );
        assert_eq!(
            t.lookup(key(2, 1)),
            Lookup::Forgotten { low: RequestSeq(2) }
        );
        assert_eq!(t.lookup(key(2, 2)), Lookup::Done(reply));
        // Once client 2 acknowledges past its eviction and its last reply, it goes too.
        t.acknowledge_below(ClientId(2), RequestSeq(3));
        assert_eq!(t.forget_idle_clients(), 1);
        assert!(t.is_empty());
        t.validate().expect("valid");
    }

    #[test]
    fn a_request_is_new_then_pending_then_answered_and_never_new_again() {
        let mut t = MessageTable::new(MessageTableLimits::default());
        assert_eq!(t.start(key(1, 1), tx(1)), Lookup::New);
        assert_eq!(t.start(key(1, 1), tx(2)), Lookup::Pending(tx(1)));
        t.finish(key(1, 1), REPLY);
        assert_eq!(t.start(key(1, 1), tx(3)), Lookup::Done(REPLY));
        t.acknowledge_below(ClientId(1), RequestSeq(2));
        assert_eq!(
            t.start(key(1, 1), tx(4)),
            Lookup::Forgotten { low: RequestSeq(2) }
        );
        t.validate().expect("valid");
    }

    #[test]
    fn a_checkpointed_table_restores_to_the_same_answers() {
        let mut t = MessageTable::new(MessageTableLimits::default());
        for s in 1..10 {
            t.finish(key(s % 3, s), REPLY);
        }
        t.acknowledge_below(ClientId(1), RequestSeq(5));
        let (entries, lows) = t.entries();
        let back = MessageTable::restore(MessageTableLimits::default(), &entries, &lows);
        for c in 0..3 {
            for s in 0..12 {
                assert_eq!(back.lookup(key(c, s)), t.lookup(key(c, s)), "{c}#{s}");
            }
        }
    }

    proptest! {
        #[test]
        fn the_table_stays_within_its_limits_and_never_calls_an_answered_request_new(
            ops in proptest::collection::vec((0u64..4, 0u64..64, 0u8..3), 1..400),
            max_entries in 1usize..20,
            per_client in 1usize..10,
        ) {
            let limits = MessageTableLimits { max_entries, max_entries_per_client: per_client };
            let mut t = MessageTable::new(limits);
            let mut answered = std::collections::BTreeSet::new();
            for (client, seq, op) in ops {
                let k = key(client, seq);
                match op {
                    0 => { t.start(k, tx(seq)); }
                    1 => { t.finish(k, REPLY); answered.insert(k); }
                    _ => t.acknowledge_below(ClientId(client), RequestSeq(seq / 2)),
                }
                t.validate().map_err(TestCaseError::fail)?;
                for a in &answered {
                    let found = t.lookup(*a);
                    prop_assert!(!matches!(found, Lookup::New | Lookup::Pending(_)),
                        "answered {a} looks {found:?}");
                }
            }
        }
    }
}
