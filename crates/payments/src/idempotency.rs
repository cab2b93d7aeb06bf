//! Idempotency: a key presented with a request, scoped to its caller, and the first answer it
//! got, kept for a day.

use farthing_kernel::{DecodeError, Fields, Get, Put};
use farthing_ledger::Timestamp;

use crate::codec::{decode_outcome, encode_outcome};
use crate::model::Outcome;
use crate::parties::Principal;

/// An idempotency key presented with a command.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct IdempotencyKey {
    pub principal: Principal,
    pub key: String,
}

/// The longest idempotency key accepted (Stripe's limit).
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct IdempotencyClaim {
    pub key: IdempotencyKey,
    /// A digest of the request (method, path and body); the same key with another request
    /// is refused.
    pub fingerprint: [u8; 32],
}

/// An idempotency key's stored answer.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct IdempotencyRow {
    pub key: IdempotencyKey,
    /// The digest of the request first made with the key.
    pub fingerprint: [u8; 32],
    pub outcome: Outcome,
    /// When the key was first used: pruning forgets keys by this time.
    pub made: Timestamp,
}

impl Fields for IdempotencyRow {
    fn put(&self, out: &mut impl Put) {
        self.key
            .principal
            .put_fields(out, "principal_kind", "principal_id");
        out.text("key", &self.key.key);
        out.digest("fingerprint", &self.fingerprint);
        let mut outcome = Vec::new();
        encode_outcome(&self.outcome, &mut outcome);
        out.blob("outcome", &outcome);
        out.int("created_at", self.made.0);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        let principal = Principal::get_fields(input, "principal_kind", "principal_id")?;
        let key = input.text("key")?;
        let fingerprint = input.digest("fingerprint")?;
        let outcome = input.blob("outcome")?;
        let made = Timestamp(input.int("created_at")?);
        Ok(IdempotencyRow {
            key: IdempotencyKey { principal, key },
            fingerprint,
            outcome: decode_outcome(&outcome)?,
            made,
        })
    }
}

/// The result of looking up an idempotency key before doing any work.
#[derive(Debug, PartialEq, Eq)]
pub enum IdempotencyLookup<'a> {
    /// Never seen (or forgotten): go ahead.
    New,
    /// Seen with the same request: answer with this.
    Replay(&'a Outcome),
    /// Seen with a different request.
    Reused,
}

/// What a key keeps: the digest of its first request, that request's answer, and when.
struct Kept {
    fingerprint: [u8; 32],
    outcome: Outcome,
    made: Timestamp,
}

/// The keys held, and the order they were made in, for pruning.
#[derive(Default)]
pub(crate) struct Idempotency {
    keys: farthing_kernel::Table<IdempotencyKey, Kept>,
    /// Keys in the order they were made. It may also name keys let go since it was last
    /// cleared of them (`let_go`): a prune passes over those, and a key read back is put in
    /// again where it was made.
    order: std::collections::VecDeque<(Timestamp, IdempotencyKey)>,
    /// Keys let go since `order` was last cleared of them: it is cleared once they are half
    /// of it, so forgetting a few shards at a time costs a pass over it now and then, not at
    /// every step.
    let_go: usize,
    /// The time of each prune since the changes were last taken, when tracking.
    prunes: Vec<Timestamp>,
    /// The latest prune's time: keys made before it are gone, whatever storage still holds.
    pruned_before: Timestamp,
}

impl Idempotency {
    pub(crate) fn track_changes(&mut self) {
        self.keys.track_changes();
    }

    pub(crate) fn lookup(
        &self,
        key: &IdempotencyKey,
        fingerprint: &[u8; 32],
    ) -> IdempotencyLookup<'_> {
        match self.keys.get(key) {
            None => IdempotencyLookup::New,
            Some(kept) if kept.fingerprint == *fingerprint => {
                IdempotencyLookup::Replay(&kept.outcome)
            }
            Some(_) => IdempotencyLookup::Reused,
        }
    }

    pub(crate) fn contains(&self, key: &IdempotencyKey) -> bool {
        self.keys.contains(key)
    }

    /// Keeps `claim`'s first answer, made at `made` (the latest time applied so far, so the
    /// order stays sorted).
    pub(crate) fn keep(&mut self, claim: &IdempotencyClaim, outcome: Outcome, made: Timestamp) {
        self.keys.put(
            claim.key.clone(),
            Kept {
                fingerprint: claim.fingerprint,
                outcome,
                made,
            },
        );
        self.order.push_back((made, claim.key.clone()));
    }

    /// Whether memory knows the key (held, or known gone).
    pub(crate) fn knows(&self, key: &IdempotencyKey) -> bool {
        self.keys.slot(key).is_some()
    }

    pub(crate) fn pruned_before(&self) -> Timestamp {
        self.pruned_before
    }

    pub(crate) fn set_pruned_before(&mut self, before: Timestamp) {
        self.pruned_before = before;
    }

    /// Forgets the keys not changed since the changes were last taken (a cache whose disk
    /// holds them), in `shards` only, and only those not used in the last `unused_for` rounds.
    pub(crate) fn forget_unchanged_in(&mut self, shards: std::ops::Range<usize>, unused_for: u32) {
        self.let_go += self.keys.forget_unchanged_in(shards, unused_for, |_| false);
        if self.let_go == 0 || 2 * self.let_go < self.order.len() {
            return;
        }
        let keys = &self.keys;
        self.order.retain(|(_, key)| keys.holds(key));
        self.order.shrink_to_fit();
        self.let_go = 0;
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.keys_held()
    }

    /// Forgets the keys made before `before`.
    pub(crate) fn prune(&mut self, before: Timestamp) {
        self.pruned_before = self.pruned_before.max(before);
        while let Some((made, _)) = self.order.front() {
            if *made >= before {
                break;
            }
            let (_, key) = self.order.pop_front().expect("front exists");
            self.keys.remove(&key);
        }
        if self.keys.is_tracking_changes() {
            self.prunes.push(before);
        }
    }

    /// Loads a stored key. Rows may come in any order: pruning goes by the time each was made.
    pub(crate) fn load(&mut self, row: IdempotencyRow) -> bool {
        if self.keys.slot(&row.key).is_some() {
            return false;
        }
        if row.made < self.pruned_before {
            // Pruned since storage last wrote it: as good as gone.
            return true;
        }
        let at = self.order.partition_point(|(made, _)| *made <= row.made);
        // The order may still name the key, from before it was let go: among those made at
        // the same time, just before `at`.
        let named = self
            .order
            .range(..at)
            .rev()
            .take_while(|(made, _)| *made == row.made)
            .any(|(_, key)| *key == row.key);
        if !named {
            self.order.insert(at, (row.made, row.key.clone()));
        }
        let loaded = self.keys.load(
            row.key,
            farthing_kernel::Slot::Present(Kept {
                fingerprint: row.fingerprint,
                outcome: row.outcome,
                made: row.made,
            }),
        );
        assert!(loaded, "the key was not held");
        true
    }

    /// Puts an imported key in; the caller sorts the order once the whole import is in
    /// ([`Idempotency::sort_order_from`]).
    pub(crate) fn put_imported(&mut self, row: &IdempotencyRow) {
        self.keys.put(
            row.key.clone(),
            Kept {
                fingerprint: row.fingerprint,
                outcome: row.outcome.clone(),
                made: row.made,
            },
        );
        self.order.push_back((row.made, row.key.clone()));
    }

    /// How many keys the pruning order holds: where an import's keys start.
    pub(crate) fn order_len(&self) -> usize {
        self.order.len()
    }

    /// Keeps the pruning order sorted by the time each key was made after keys were added
    /// from position `from` on (a stable sort: keys made at one time keep their order).
    pub(crate) fn sort_order_from(&mut self, from: usize) {
        let order = self.order.make_contiguous();
        if !order[from.saturating_sub(1)..].is_sorted_by_key(|(made, _)| *made) {
            order.sort_by_key(|(made, _)| *made);
        }
    }

    pub(crate) fn row(&self, key: &IdempotencyKey) -> Option<IdempotencyRow> {
        let kept = self.keys.get(key)?;
        Some(IdempotencyRow {
            key: key.clone(),
            fingerprint: kept.fingerprint,
            outcome: kept.outcome.clone(),
            made: kept.made,
        })
    }

    /// Every key held, by key.
    pub(crate) fn rows(&self) -> Vec<IdempotencyRow> {
        let mut keys: Vec<&IdempotencyKey> = self.keys.iter().map(|(key, _)| key).collect();
        keys.sort_unstable();
        keys.into_iter()
            .map(|key| self.row(key).expect("listed"))
            .collect()
    }

    /// The keys made since the changes were last taken that are still held, in the order
    /// made, and the times of the prunes since.
    pub(crate) fn take_changes(&mut self) -> (Vec<IdempotencyRow>, Vec<Timestamp>) {
        let mut changed: std::collections::HashSet<IdempotencyKey> = self
            .keys
            .take_changes()
            .into_iter()
            .filter_map(|(key, slot)| {
                matches!(slot, farthing_kernel::Slot::Present(_)).then_some(key)
            })
            .collect();
        // The table lists a key from its first change: a key pruned and then made again would
        // come at the prune. The pruning order has each key where it was made, and the keys
        // made since the last call are among its newest.
        let mut made = Vec::with_capacity(changed.len());
        for (_, key) in self.order.iter().rev() {
            if changed.is_empty() {
                break;
            }
            if changed.remove(key) {
                made.push(key);
            }
        }
        assert!(changed.is_empty(), "every key held is in the pruning order");
        let rows = made
            .into_iter()
            .rev()
            .map(|key| self.row(key).expect("present"))
            .collect();
        (rows, std::mem::take(&mut self.prunes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> IdempotencyKey {
        IdempotencyKey {
            principal: Principal::Operator,
            key: format!("key {n}"),
        }
    }

    fn claim(n: u32) -> IdempotencyClaim {
        IdempotencyClaim {
            key: key(n),
            fingerprint: [n as u8; 32],
        }
    }

    /// Keys let go a few shards at a time leave the pruning order as it was until they are
    /// half of it; a key read back is named in it once; pruning and the changes taken are
    /// what they would be with the order cleared at every step.
    #[test]
    fn keys_let_go_a_few_shards_at_a_time_leave_the_order_right() {
        let mut kept = Idempotency::default();
        kept.track_changes();
        for n in 0..200 {
            kept.keep(
                &claim(n),
                Outcome::OperatorKeySet,
                Timestamp(u64::from(n / 10)),
            );
        }
        let (made, _) = kept.take_changes();
        assert_eq!(made.len(), 200);
        let rows: Vec<IdempotencyRow> = (0..200).map(|n| kept.row(&key(n)).unwrap()).collect();

        // A few shards: some keys go, and the order still names them.
        kept.forget_unchanged_in(0..4, 0);
        let gone: Vec<u32> = (0..200).filter(|n| !kept.contains(&key(*n))).collect();
        assert!(!gone.is_empty() && 2 * gone.len() < 200);
        assert_eq!(kept.order.len(), 200);
        // Read back, a key is named once, where it was made.
        let back = gone[0];
        assert!(kept.load(rows[back as usize].clone()));
        assert_eq!(
            kept.order
                .iter()
                .filter(|(_, key)| *key == self::key(back))
                .count(),
            1
        );

        // Every shard: once half are gone, the order names only the keys held.
        kept.forget_unchanged_in(0..farthing_ledger::SHARDS, 0);
        assert_eq!(kept.len(), 0);
        assert!(kept.order.is_empty(), "{} left", kept.order.len());

        // Keys read back and a new one: pruning takes those made before its time, in order,
        // and the changes taken are the new key alone.
        for n in [5, 149, 199] {
            assert!(kept.load(rows[n].clone()));
        }
        kept.keep(&claim(500), Outcome::OperatorKeySet, Timestamp(30));
        kept.prune(Timestamp(15));
        assert!(!kept.contains(&key(5)) && !kept.contains(&key(149)));
        assert!(kept.contains(&key(199)) && kept.contains(&key(500)));
        let (made, prunes) = kept.take_changes();
        assert_eq!(
            made.iter().map(|row| row.key.clone()).collect::<Vec<_>>(),
            vec![key(500)]
        );
        assert_eq!(prunes, vec![Timestamp(15)]);
    }
}
