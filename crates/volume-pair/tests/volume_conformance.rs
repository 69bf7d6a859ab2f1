//! One script, two volumes: [`MemoryVolume`] (the model simulations trust as an oracle) and a
//! real [`DataVolume`] of an LSG on a `SimStore` must give the same answers to every read, scan,
//! generation and update record, so whatever a simulation checks against the model holds for
//! the real volume.
//!
//! The script runs the way the owner will: lock, build the update record (its before image read
//! from the volume), append it to the audit trail, apply the change at the record's LSN; abort
//! undoes with compensation records carrying the before images. It adds redo replays at old
//! LSNs, which must change nothing, and scans with every kind of bound. A fixed part is followed
//! by a seeded random part; a failure names its seed.

use std::ops::Bound;
use std::time::Duration;

use duplex_lsg::{
    LogStorageGroup, LsgConfig, LsgId, Lsn, OpenMode, OwnerEpoch, RecordFlags, SimStore,
};
use duplex_pair::{AuditBody, Compensation, TxEnd, TxId, Update};
use duplex_volume_pair::{
    KeyValue, LockConfig, LockOutcome, MemoryVolume, VolumeAccess, VolumePair,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const RECORD_LIMIT_BYTES: usize = 4 << 10;

fn small_config() -> LsgConfig {
    LsgConfig {
        audit_segment_bytes: 64 << 10,
        volume_segment_bytes: 64 << 10,
        max_batch_bytes: 8 << 10,
        max_record_bytes: RECORD_LIMIT_BYTES,
        max_key_bytes: 64,
        max_value_bytes: 1 << 10,
    }
}

/// Where the script's audit records go: the LSG's trail, or a counter giving the same dense
/// LSNs for the model.
trait Trail {
    fn append(&mut self, body: &AuditBody) -> Lsn;
}

#[derive(Default)]
struct CountingTrail {
    last: u64,
}

impl Trail for CountingTrail {
    fn append(&mut self, body: &AuditBody) -> Lsn {
        body.encode(RECORD_LIMIT_BYTES).expect("encodes");
        self.last += 1;
        Lsn(self.last)
    }
}

impl Trail for &LogStorageGroup<SimStore> {
    fn append(&mut self, body: &AuditBody) -> Lsn {
        let payload = body.encode(RECORD_LIMIT_BYTES).expect("encodes");
        self.audit()
            .append(body.record_type(), RecordFlags::NONE, &payload)
            .expect("append")
    }
}

/// What the script saw; both runs must see the same list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Get(Vec<u8>, Option<Vec<u8>>),
    Scan(Vec<KeyValue>),
    Generation(Vec<u8>, Option<Lsn>),
    Logged(Lsn, AuditBody),
}

struct Script<'a, V: VolumeAccess, T: Trail> {
    vol: &'a V,
    generation: &'a dyn Fn(&[u8]) -> Option<Lsn>,
    trail: T,
    pair: VolumePair,
    /// Per open transaction, its updates and their LSNs (for undo).
    open: Vec<(TxId, Vec<(Lsn, Update)>)>,
    seen: Vec<Seen>,
}

fn tx(n: u64) -> TxId {
    TxId {
        epoch: OwnerEpoch(1),
        number: n,
    }
}

impl<'a, V: VolumeAccess, T: Trail> Script<'a, V, T> {
    fn new(vol: &'a V, generation: &'a dyn Fn(&[u8]) -> Option<Lsn>, trail: T) -> Self {
        Script {
            vol,
            generation,
            trail,
            pair: VolumePair::new("accounts".into(), LockConfig::default()),
            open: Vec::new(),
            seen: Vec::new(),
        }
    }

    fn log(&mut self, body: AuditBody) -> Lsn {
        let lsn = self.trail.append(&body);
        self.seen.push(Seen::Logged(lsn, body));
        lsn
    }

    fn updates(&mut self, t: TxId) -> &mut Vec<(Lsn, Update)> {
        if let Some(i) = self.open.iter().position(|(id, _)| *id == t) {
            return &mut self.open[i].1;
        }
        self.open.push((t, Vec::new()));
        &mut self.open.last_mut().expect("just pushed").1
    }

    fn write(&mut self, t: TxId, key: &[u8], after: Option<&[u8]>) {
        let outcome = self.pair.lock_for_write(Duration::ZERO, t, key);
        assert_eq!(
            outcome,
            Ok(LockOutcome::Granted),
            "the script never conflicts"
        );
        let update = self
            .pair
            .update_record(self.vol, t, key, after.map(<[u8]>::to_vec))
            .expect("update record");
        let lsn = self.log(AuditBody::Update(update.clone()));
        self.vol.apply(key, after, lsn).expect("apply");
        self.updates(t).push((lsn, update));
    }

    fn read(&mut self, t: TxId, key: &[u8]) {
        let outcome = self.pair.read(Duration::ZERO, t, key);
        assert_eq!(
            outcome,
            Ok(LockOutcome::Granted),
            "the script never conflicts"
        );
        self.get(key);
    }

    fn get(&mut self, key: &[u8]) {
        let value = self.vol.get(key).expect("get");
        self.seen.push(Seen::Get(key.to_vec(), value));
        self.seen
            .push(Seen::Generation(key.to_vec(), (self.generation)(key)));
    }

    fn scan(&mut self, start: Bound<&[u8]>, end: Bound<&[u8]>, limit: usize) {
        let got = self.vol.scan(start, end, limit).expect("scan");
        self.seen.push(Seen::Scan(got));
    }

    fn end(&mut self, t: TxId) -> Vec<(Lsn, Update)> {
        let updates = self.updates(t).clone();
        self.open.retain(|(id, _)| *id != t);
        updates
    }

    fn commit(&mut self, t: TxId) {
        self.end(t);
        self.log(AuditBody::Commit(TxEnd {
            tx: t,
            epoch: OwnerEpoch(1),
            request: None,
        }));
        assert_eq!(self.pair.release(t), vec![]);
    }

    /// Undoes `t`'s updates newest first, each with a compensation record.
    fn abort(&mut self, t: TxId) {
        for (lsn, update) in self.end(t).into_iter().rev() {
            let undo = self.log(AuditBody::Compensation(Compensation {
                tx: t,
                undoes: lsn,
                volume: update.volume.clone(),
                key: update.key.clone(),
                restore: update.before.clone(),
            }));
            self.vol
                .apply(&update.key, update.before.as_deref(), undo)
                .expect("undo");
        }
        assert_eq!(self.pair.release(t), vec![]);
    }

    /// Redo of an already applied change must change nothing.
    fn replay(&mut self, lsn: Lsn, key: &[u8], value: Option<&[u8]>) {
        self.vol.apply(key, value, lsn).expect("replay");
        self.get(key);
    }

    fn all(&mut self) {
        self.scan(Bound::Unbounded, Bound::Unbounded, usize::MAX);
    }
}

fn fixed_part<V: VolumeAccess, T: Trail>(s: &mut Script<'_, V, T>) {
    let (a, b, c, d) = (&b"a"[..], &b"b"[..], &b"c"[..], &b"d"[..]);
    s.write(tx(1), a, Some(b"1"));
    s.write(tx(1), b, Some(b"2"));
    s.write(tx(1), c, Some(b"3"));
    s.commit(tx(1));
    s.all();
    s.write(tx(2), b, Some(b"two"));
    s.write(tx(2), b, Some(b"twice"));
    s.write(tx(2), a, None);
    s.write(tx(2), d, Some(b""));
    s.read(tx(2), b);
    s.get(a);
    s.all();
    s.abort(tx(2));
    s.get(a);
    s.get(b);
    s.get(d);
    s.all();
    s.write(tx(3), a, None);
    s.write(tx(3), a, Some(b"back"));
    s.commit(tx(3));
    // Redo of the first write of `a` (LSN 1) and of a later one at its own LSN.
    s.replay(Lsn(1), a, Some(b"1"));
    let now = (s.generation)(a).expect("a was written");
    s.replay(now, a, Some(b"other"));
    for (start, end, limit) in [
        (Bound::Included(a), Bound::Excluded(c), 10),
        (Bound::Excluded(a), Bound::Included(c), 10),
        (Bound::Included(b), Bound::Unbounded, 1),
        (Bound::Unbounded, Bound::Included(b), 10),
        (Bound::Included(c), Bound::Included(a), 10),
        (Bound::Excluded(b), Bound::Excluded(b), 10),
        (Bound::Included(b), Bound::Excluded(b), 10),
        (Bound::Unbounded, Bound::Unbounded, 0),
    ] {
        s.scan(start, end, limit);
    }
}

fn random_part<V: VolumeAccess, T: Trail>(s: &mut Script<'_, V, T>, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let key = |rng: &mut ChaCha8Rng| vec![b'k', rng.random_range(0..12u8)];
    // One transaction at a time, so the script never waits.
    for n in 100..160 {
        let t = tx(n);
        for _ in 0..rng.random_range(1..6) {
            let k = key(&mut rng);
            match rng.random_range(0..10) {
                0..2 => s.write(t, &k, None),
                2..7 => {
                    let len = rng.random_range(0..40);
                    let value: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                    s.write(t, &k, Some(&value));
                }
                _ => s.read(t, &k),
            }
        }
        if rng.random_bool(0.3) {
            s.abort(t);
        } else {
            s.commit(t);
        }
        let (lo, hi) = (key(&mut rng), key(&mut rng));
        s.scan(
            Bound::Included(&lo),
            Bound::Excluded(&hi),
            rng.random_range(0..8),
        );
    }
    s.all();
}

#[test]
fn the_model_and_a_real_volume_answer_one_script_alike() {
    for seed in 0..8 {
        let model = MemoryVolume::new();
        let model_generation = |k: &[u8]| model.generation(k);
        let mut m = Script::new(&model, &model_generation, CountingTrail::default());
        fixed_part(&mut m);
        random_part(&mut m, seed);

        let store = SimStore::new(seed);
        let mut lsg = LogStorageGroup::create_in(store.clone(), LsgId(1), small_config())
            .expect("create LSG");
        let real = lsg.create_volume("accounts").expect("create volume");
        let real_generation = |k: &[u8]| real.generation(k);
        let mut r = Script::new(&*real, &real_generation, &lsg);
        fixed_part(&mut r);
        random_part(&mut r, seed);

        assert_eq!(m.seen.len(), r.seen.len(), "seed {seed}");
        for (i, (a, b)) in m.seen.iter().zip(&r.seen).enumerate() {
            assert_eq!(
                a, b,
                "seed {seed}: step {i} differs (model left, real right)"
            );
        }

        // What the real volume made durable reads back the same after a reopen.
        let last = lsg.audit().flush().expect("flush trail");
        real.flush(last).expect("flush volume");
        let before_close =
            VolumeAccess::scan(&*real, Bound::Unbounded, Bound::Unbounded, usize::MAX)
                .expect("scan");
        drop(r);
        drop(real);
        drop(lsg);
        let lsg = LogStorageGroup::open_in(store, small_config(), OpenMode::Write).expect("reopen");
        let reopened = lsg.volume("accounts").expect("volume");
        let after = VolumeAccess::scan(&*reopened, Bound::Unbounded, Bound::Unbounded, usize::MAX)
            .expect("scan");
        assert_eq!(after, before_close, "seed {seed}");
        assert_eq!(
            after,
            model
                .scan(Bound::Unbounded, Bound::Unbounded, usize::MAX)
                .expect("scan"),
            "seed {seed}"
        );
    }
}
