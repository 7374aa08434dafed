//! The catalog in a [`MetadataStore`]: what payloads exist and which peer holds which pieces.
//!
//! Key layout (names are escaped: `%` as `%25`, `/` as `%2F`, so that one name is never a
//! prefix-path of another's keys):
//!
//! ```text
//! p2p/v1/payload/{name}          PayloadRecord: name, sizes, piece size, one hash per piece,
//!                                generation, origin segment. Created by compare-and-swap from
//!                                revision 0 (unique names); force_create overwrites.
//! p2p/v1/have/{name}/{segment}   HaveRecord: the generation it belongs to, the holder's segment
//!                                and buffers, a bitmap of its verified pieces, and how many
//!                                uploads it admits at once.
//! ```
//!
//! Availability is one key per (payload, peer), written only by that peer: many peers finishing
//! pieces at once write distinct keys, so they never contend (no compare-and-swap retries), and
//! each peer batches its updates (at most one write per publish interval of the store's config). A reader lists the `have/{name}/`
//! prefix and ignores records of another generation (left over from a replaced payload).
//! Values are postcard-encoded.

use std::sync::Arc;

use mooncake_core::MetadataStore;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::piece::{layout, Bitmap, Buffer, PieceHash};

const PAYLOAD_PREFIX: &str = "p2p/v1/payload/";
const HAVE_PREFIX: &str = "p2p/v1/have/";

/// A registered payload, as the catalog holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadRecord {
    /// The payload's name, unique in the cluster.
    pub name: String,
    /// The shard size given at registration; pieces subdivide shards.
    pub max_shard_size: u64,
    /// Sum of `size_list`.
    pub total_size: u64,
    /// The registered buffers' sizes, in order.
    pub size_list: Vec<u64>,
    /// Piece size (the last piece of each shard may be shorter).
    pub piece_size: u64,
    /// BLAKE3 hash of each piece.
    pub hashes: Vec<PieceHash>,
    /// Random per registration: tells this payload's availability records from those of a
    /// replaced payload of the same name.
    pub generation: u64,
    /// Segment of the registering instance; `None` once it unregistered.
    pub origin: Option<String>,
}

impl PayloadRecord {
    /// Number of pieces.
    pub fn pieces(&self) -> usize {
        self.hashes.len()
    }

    fn check(&self, key: &str) -> Result<()> {
        let bad = |reason: &str| {
            Err(Error::BadCatalogEntry {
                key: key.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if self.max_shard_size == 0 || self.piece_size == 0 {
            return bad("zero shard or piece size");
        }
        if self
            .size_list
            .iter()
            .try_fold(0u64, |a, &s| a.checked_add(s))
            != Some(self.total_size)
        {
            return bad("size_list does not add up to total_size");
        }
        if layout(self.total_size, self.max_shard_size, self.piece_size).len() != self.pieces() {
            return bad("one hash per piece expected");
        }
        Ok(())
    }
}

/// One peer's copy of a payload, as the catalog holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveRecord {
    /// The payload generation this copy belongs to.
    pub generation: u64,
    /// The holder's transfer-engine segment.
    pub segment: String,
    /// Where the holder keeps the payload: the file is these buffers concatenated.
    pub buffers: Vec<Buffer>,
    /// The holder's verified pieces.
    pub have: Bitmap,
    /// Pieces the holder is fetching from the payload's origin right now, so that other
    /// readers ask the origin for other ones (empty for complete copies).
    pub fetching: Vec<u32>,
    /// Uploads the holder admits at once, shared among the readers pulling at the time (see
    /// [`fair_share`](crate::scheduler::fair_share)).
    pub upload_slots: u32,
}

/// What a [`PayloadInfo`](crate::PayloadInfo) lists and a pull needs, read from any
/// [`MetadataStore`].
#[derive(Clone, Debug)]
pub struct Catalog {
    store: Arc<dyn MetadataStore>,
}

/// `name` with `%` and `/` escaped, so that it is one path component.
pub fn escape(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2F")
}

fn unescape(escaped: &str) -> String {
    escaped.replace("%2F", "/").replace("%25", "%")
}

/// The key of a payload's record.
pub fn payload_key(name: &str) -> String {
    format!("{PAYLOAD_PREFIX}{}", escape(name))
}

/// The prefix of a payload's availability records.
pub fn have_prefix(name: &str) -> String {
    format!("{HAVE_PREFIX}{}/", escape(name))
}

/// The key of `segment`'s availability record of a payload.
pub fn have_key(name: &str, segment: &str) -> String {
    format!("{}{}", have_prefix(name), escape(segment))
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| Error::BadCatalogEntry {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("catalog records always encode")
}

impl Catalog {
    /// The catalog in `store`.
    pub fn new(store: Arc<dyn MetadataStore>) -> Self {
        Catalog { store }
    }

    /// The metadata store.
    pub fn store(&self) -> &Arc<dyn MetadataStore> {
        &self.store
    }

    /// Creates the payload record. Fails with [`Error::AlreadyExists`] if the name is taken,
    /// unless `force`: then the record is replaced, and the availability records of the old
    /// payload are removed (readers would ignore them anyway: they carry the old generation).
    pub async fn create(&self, record: &PayloadRecord, force: bool) -> Result<()> {
        let key = payload_key(&record.name);
        record.check(&key)?;
        let value = encode(record);
        loop {
            let expected = match self.store.get(&key).await? {
                None => 0,
                Some(_) if !force => return Err(Error::AlreadyExists(record.name.clone())),
                Some(v) => v.revision,
            };
            if self
                .store
                .compare_and_swap(&key, expected, Some(value.clone()))
                .await?
                .is_some()
            {
                break;
            }
            // Someone else wrote the key meanwhile: look again.
        }
        if force {
            for (k, v) in self.store.list(&have_prefix(&record.name)).await? {
                let stale = decode::<HaveRecord>(&k, &v.value)
                    .map_or(true, |h| h.generation != record.generation);
                if stale {
                    self.store.delete(&k).await?;
                }
            }
        }
        Ok(())
    }

    /// The payload record of `name` and its revision.
    pub async fn payload(&self, name: &str) -> Result<Option<(PayloadRecord, u64)>> {
        let key = payload_key(name);
        let Some(v) = self.store.get(&key).await? else {
            return Ok(None);
        };
        let record: PayloadRecord = decode(&key, &v.value)?;
        record.check(&key)?;
        Ok(Some((record, v.revision)))
    }

    /// Payload records whose names start with `prefix` (all of them for `""`), in name order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<PayloadRecord>> {
        let entries = self
            .store
            .list(&format!("{PAYLOAD_PREFIX}{}", escape(prefix)))
            .await?;
        let mut out = Vec::with_capacity(entries.len());
        for (key, v) in entries {
            let record: PayloadRecord = decode(&key, &v.value)?;
            debug_assert_eq!(unescape(&key[PAYLOAD_PREFIX.len()..]), record.name);
            out.push(record);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Writes this peer's availability record (only its owner writes it, so no CAS).
    pub async fn publish_have(&self, name: &str, have: &HaveRecord) -> Result<()> {
        self.store
            .put(&have_key(name, &have.segment), encode(have))
            .await?;
        Ok(())
    }

    /// Removes `segment`'s availability record of `name`.
    pub async fn withdraw_have(&self, name: &str, segment: &str) -> Result<()> {
        self.store.delete(&have_key(name, segment)).await?;
        Ok(())
    }

    /// The availability records of `name` that belong to `generation` and fit a payload of
    /// `pieces` pieces and `total_size` bytes; others are skipped.
    pub async fn holders(
        &self,
        name: &str,
        generation: u64,
        pieces: usize,
        total_size: u64,
    ) -> Result<Vec<HaveRecord>> {
        let mut out = Vec::new();
        for (key, v) in self.store.list(&have_prefix(name)).await? {
            let Ok(h) = decode::<HaveRecord>(&key, &v.value) else {
                tracing::warn!("skipping undecodable availability record {key}");
                continue;
            };
            let size: u64 = h.buffers.iter().map(|b| b.len).sum();
            if h.generation == generation
                && h.have.len() == pieces
                && h.have.is_valid()
                && size == total_size
            {
                out.push(h);
            }
        }
        Ok(out)
    }

    /// The origin `segment` stops serving `name`: its availability record goes, the record's
    /// origin is cleared, and the record itself goes when no copy is left. Fails with
    /// [`Error::NotRegisteredHere`] if `segment` is not the origin of the current generation.
    pub async fn unregister(&self, name: &str, segment: &str, generation: u64) -> Result<()> {
        let key = payload_key(name);
        loop {
            let Some((mut record, revision)) = self.payload(name).await? else {
                return Err(Error::NotRegisteredHere(name.to_owned()));
            };
            if record.generation != generation || record.origin.as_deref() != Some(segment) {
                return Err(Error::NotRegisteredHere(name.to_owned()));
            }
            record.origin = None;
            if self
                .store
                .compare_and_swap(&key, revision, Some(encode(&record)))
                .await?
                .is_some()
            {
                break;
            }
        }
        self.withdraw_have(name, segment).await?;
        self.remove_if_orphaned(name, generation).await
    }

    /// Removes the payload record of `generation` if its origin unregistered and no copy is
    /// left.
    pub async fn remove_if_orphaned(&self, name: &str, generation: u64) -> Result<()> {
        let Some((record, revision)) = self.payload(name).await? else {
            return Ok(());
        };
        if record.generation != generation || record.origin.is_some() {
            return Ok(());
        }
        let holders = self
            .holders(name, generation, record.pieces(), record.total_size)
            .await?;
        if holders.is_empty() {
            // A CAS: if the record changed meanwhile (replaced), leave it.
            self.store
                .compare_and_swap(&payload_key(name), revision, None)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::piece::hash_piece;
    use mooncake_core::MemoryMetadataStore;

    fn record(name: &str, generation: u64) -> PayloadRecord {
        PayloadRecord {
            name: name.into(),
            max_shard_size: 8,
            total_size: 10,
            size_list: vec![4, 6],
            piece_size: 4,
            // Pieces: [0,4) [4,8) [8,10).
            hashes: vec![hash_piece(b"x"); 3],
            generation,
            origin: Some("o:1".into()),
        }
    }

    fn have(segment: &str, generation: u64) -> HaveRecord {
        HaveRecord {
            generation,
            segment: segment.into(),
            buffers: vec![Buffer::new(4096, 10)],
            have: Bitmap::full(3),
            fetching: Vec::new(),
            upload_slots: 8,
        }
    }

    fn catalog() -> Catalog {
        Catalog::new(Arc::new(MemoryMetadataStore::new()))
    }

    #[tokio::test]
    async fn names_are_unique_unless_forced() {
        let c = catalog();
        c.create(&record("a", 1), false).await.unwrap();
        assert!(matches!(
            c.create(&record("a", 2), false).await,
            Err(Error::AlreadyExists(_))
        ));
        c.publish_have("a", &have("o:1", 1)).await.unwrap();
        c.create(&record("a", 2), true).await.unwrap();
        let (r, _) = c.payload("a").await.unwrap().unwrap();
        assert_eq!(r.generation, 2);
        // The old generation's availability went with it.
        assert!(c.holders("a", 1, 3, 10).await.unwrap().is_empty());
        assert!(c.store().list(&have_prefix("a")).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn inconsistent_records_are_refused() {
        let c = catalog();
        let mut r = record("a", 1);
        r.hashes.pop();
        assert!(matches!(
            c.create(&r, false).await,
            Err(Error::BadCatalogEntry { .. })
        ));
        let mut r = record("a", 1);
        r.size_list = vec![3];
        assert!(c.create(&r, false).await.is_err());
        c.store()
            .put(&payload_key("z"), vec![1, 2, 3])
            .await
            .unwrap();
        assert!(matches!(
            c.payload("z").await,
            Err(Error::BadCatalogEntry { .. })
        ));
    }

    #[tokio::test]
    async fn list_by_prefix_and_escaped_names() {
        let c = catalog();
        for n in ["ckpt/a", "ckpt/b", "ckpt", "other", "100%"] {
            c.create(&record(n, 1), false).await.unwrap();
        }
        let names = |v: Vec<PayloadRecord>| v.into_iter().map(|r| r.name).collect::<Vec<_>>();
        assert_eq!(
            names(c.list("ckpt/").await.unwrap()),
            vec!["ckpt/a", "ckpt/b"]
        );
        assert_eq!(c.list("").await.unwrap().len(), 5);
        assert_eq!(names(c.list("100").await.unwrap()), vec!["100%"]);
        // `ckpt`'s holders are not `ckpt/a`'s.
        c.publish_have("ckpt/a", &have("p:1", 1)).await.unwrap();
        assert!(c.holders("ckpt", 1, 3, 10).await.unwrap().is_empty());
        assert_eq!(c.holders("ckpt/a", 1, 3, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn holders_skip_other_generations_and_bad_shapes() {
        let c = catalog();
        c.create(&record("a", 1), false).await.unwrap();
        c.publish_have("a", &have("p:1", 1)).await.unwrap();
        c.publish_have("a", &have("p:2", 9)).await.unwrap();
        let mut wrong = have("p:3", 1);
        wrong.buffers = vec![Buffer::new(0, 3)];
        c.publish_have("a", &wrong).await.unwrap();
        let h = c.holders("a", 1, 3, 10).await.unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].segment, "p:1");
        c.withdraw_have("a", "p:1").await.unwrap();
        assert!(c.holders("a", 1, 3, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn unregister_keeps_the_record_while_copies_remain() {
        let c = catalog();
        c.create(&record("a", 1), false).await.unwrap();
        c.publish_have("a", &have("o:1", 1)).await.unwrap();
        c.publish_have("a", &have("p:1", 1)).await.unwrap();
        assert!(matches!(
            c.unregister("a", "p:1", 1).await,
            Err(Error::NotRegisteredHere(_))
        ));
        c.unregister("a", "o:1", 1).await.unwrap();
        let (r, _) = c.payload("a").await.unwrap().unwrap();
        assert_eq!(r.origin, None);
        assert_eq!(c.holders("a", 1, 3, 10).await.unwrap().len(), 1);
        // The last copy goes: so does the record.
        c.withdraw_have("a", "p:1").await.unwrap();
        c.remove_if_orphaned("a", 1).await.unwrap();
        assert!(c.payload("a").await.unwrap().is_none());
    }

    /// One catalog operation of a random history.
    #[derive(Clone, Debug)]
    enum Op {
        Create {
            name: usize,
            origin: usize,
            force: bool,
        },
        Publish {
            name: usize,
            peer: usize,
            stale: bool,
        },
        Withdraw {
            name: usize,
            peer: usize,
        },
        Unregister {
            name: usize,
            peer: usize,
        },
        Orphan {
            name: usize,
        },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0..2usize, 0..3usize, any::<bool>()).prop_map(|(name, origin, force)| Op::Create {
                name,
                origin,
                force
            }),
            (0..2usize, 0..3usize, any::<bool>()).prop_map(|(name, peer, stale)| Op::Publish {
                name,
                peer,
                stale
            }),
            (0..2usize, 0..3usize).prop_map(|(name, peer)| Op::Withdraw { name, peer }),
            (0..2usize, 0..3usize).prop_map(|(name, peer)| Op::Unregister { name, peer }),
            (0..2usize).prop_map(|name| Op::Orphan { name }),
        ]
    }

    /// What the catalog should hold for one name.
    #[derive(Default, Clone, Debug)]
    struct Model {
        /// (generation, origin peer) of the payload, if any.
        record: Option<(u64, Option<usize>)>,
        /// Availability records: peer -> generation.
        have: std::collections::BTreeMap<usize, u64>,
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        #[test]
        fn random_histories_match_a_model(ops in proptest::collection::vec(op(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let c = catalog();
                let names = ["a", "a/b"];
                let seg = |p: usize| format!("p:{p}");
                let mut model = [Model::default(), Model::default()];
                let mut next_gen = 1;
                for op in ops {
                    match op {
                        Op::Create { name, origin, force } => {
                            let mut r = record(names[name], next_gen);
                            r.origin = Some(seg(origin));
                            let got = c.create(&r, force).await;
                            let m = &mut model[name];
                            if m.record.is_some() && !force {
                                assert!(matches!(got, Err(Error::AlreadyExists(_))));
                            } else {
                                got.unwrap();
                                m.record = Some((next_gen, Some(origin)));
                                if force {
                                    m.have.clear();
                                }
                            }
                            next_gen += 1;
                        }
                        Op::Publish { name, peer, stale } => {
                            let m = &mut model[name];
                            let generation = match (m.record, stale) {
                                (Some((g, _)), false) => g,
                                _ => 0,
                            };
                            c.publish_have(names[name], &have(&seg(peer), generation))
                                .await
                                .unwrap();
                            m.have.insert(peer, generation);
                        }
                        Op::Withdraw { name, peer } => {
                            c.withdraw_have(names[name], &seg(peer)).await.unwrap();
                            model[name].have.remove(&peer);
                        }
                        Op::Unregister { name, peer } => {
                            let m = &mut model[name];
                            let generation = m.record.map_or(0, |(g, _)| g);
                            let got = c.unregister(names[name], &seg(peer), generation).await;
                            match m.record {
                                Some((g, Some(o))) if o == peer => {
                                    got.unwrap();
                                    m.have.remove(&peer);
                                    m.record = Some((g, None));
                                    if !m.have.values().any(|&h| h == g) {
                                        m.record = None;
                                    }
                                }
                                _ => assert!(matches!(got, Err(Error::NotRegisteredHere(_)))),
                            }
                        }
                        Op::Orphan { name } => {
                            let m = &mut model[name];
                            let generation = m.record.map_or(0, |(g, _)| g);
                            c.remove_if_orphaned(names[name], generation).await.unwrap();
                            if let Some((g, None)) = m.record {
                                if !m.have.values().any(|&h| h == g) {
                                    m.record = None;
                                }
                            }
                        }
                    }
                    // The catalog agrees with the model after every step.
                    for (i, m) in model.iter().enumerate() {
                        let got = c.payload(names[i]).await.unwrap();
                        let got = got.map(|(r, _)| {
                            let origin = r.origin.map(|o| o[2..].parse::<usize>().unwrap());
                            (r.generation, origin)
                        });
                        assert_eq!(got, m.record, "{}", names[i]);
                        if let Some((g, _)) = m.record {
                            let holders: Vec<String> = c
                                .holders(names[i], g, 3, 10)
                                .await
                                .unwrap()
                                .into_iter()
                                .map(|h| h.segment)
                                .collect();
                            let expected: Vec<String> = m
                                .have
                                .iter()
                                .filter(|(_, &h)| h == g)
                                .map(|(&p, _)| seg(p))
                                .collect();
                            assert_eq!(holders, expected, "{}", names[i]);
                        }
                    }
                    let listed = c.list("").await.unwrap().len();
                    assert_eq!(listed, model.iter().filter(|m| m.record.is_some()).count());
                }
            });
        }
    }
}
