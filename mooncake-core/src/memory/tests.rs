use std::pin::Pin;
use std::sync::Mutex;

use super::*;
use proptest::prelude::*;

#[test]
fn register_resolve_unregister() {
    let reg = MemoryRegistry::new();
    let a = reg
        .register_owned(AlignedBuffer::new(8192).unwrap(), Location::cpu(0))
        .unwrap();
    let r = reg.resolve(a + 100, 200).unwrap();
    r.write_from(&[7u8; 200]).unwrap();
    assert_eq!(reg.resolve(a + 100, 200).unwrap().to_vec(), vec![7u8; 200]);
    assert!(reg.resolve(a + 8000, 200).is_err());
    assert!(reg.resolve(a - 1, 2).is_err());
    assert!(reg.resolve(a, u64::MAX).is_err());
    assert!(reg.resolve(u64::MAX - 2, 10).is_err());
    assert!(reg.resolve(a + 8192, 0).is_ok());
    drop(r);
    assert!(reg.unregister(a).unwrap().is_done());
    assert!(reg.resolve(a, 1).is_err());
    assert!(matches!(reg.unregister(a), Err(Error::NotRegistered(_))));
}

#[test]
fn large_buffers_are_mapped_zeroed_and_aligned() {
    for len in [
        AlignedBuffer::MAP_THRESHOLD - 1,
        AlignedBuffer::MAP_THRESHOLD,
        64 << 20,
    ] {
        let b = AlignedBuffer::new(len).unwrap();
        assert_eq!(b.addr() % AlignedBuffer::ALIGN as u64, 0);
        let reg = MemoryRegistry::new();
        let a = reg.register_owned(b, Location::cpu(0)).unwrap();
        let tail = reg.resolve(a + len as u64 - 4096, 4096).unwrap();
        assert!(tail.to_vec().iter().all(|&x| x == 0));
        tail.write_from(&[9u8; 4096]).unwrap();
        assert_eq!(tail.to_vec(), vec![9u8; 4096]);
        drop(tail);
        reg.unregister_blocking(a).unwrap();
    }
}

#[test]
fn overlapping_and_empty_registrations_are_refused() {
    let reg = MemoryRegistry::new();
    let buf = AlignedBuffer::new(4096).unwrap();
    let a = buf.addr();
    // SAFETY: `buf` outlives the registration (unregistered below before drop).
    unsafe {
        reg.register(a, 4096, Location::cpu(0)).unwrap();
        assert!(matches!(
            reg.register(a + 10, 10, Location::cpu(0)),
            Err(Error::AddressOverlapped { .. })
        ));
        assert!(reg.register(a + 4096, 0, Location::cpu(0)).is_err());
    }
    reg.unregister_blocking(a).unwrap();
    drop(buf);
}

#[test]
fn unregister_blocking_waits_for_regions() {
    let reg = Arc::new(MemoryRegistry::new());
    let a = reg
        .register_owned(AlignedBuffer::new(4096).unwrap(), Location::cpu(0))
        .unwrap();
    let region = reg.resolve(a, 16).unwrap();
    let t = std::thread::spawn(move || reg.unregister_blocking(a));
    std::thread::sleep(Duration::from_millis(30));
    assert!(!t.is_finished(), "unregister must wait for the live region");
    region.write_from(&[1u8; 16]).unwrap();
    drop(region);
    t.join().unwrap().unwrap();
}

#[test]
fn unregister_blocking_gives_up_after_its_bound() {
    let reg = MemoryRegistry::new();
    let a = reg
        .register_owned(AlignedBuffer::new(4096).unwrap(), Location::cpu(0))
        .unwrap();
    let region = reg.resolve(a, 16).unwrap();
    let waiting = reg.unregister(a).unwrap();
    let e = waiting
        .wait_blocking(Duration::from_millis(20))
        .unwrap_err();
    assert_eq!(e.code(), crate::ErrorCode::OBJECT_REPLICA_BUSY);
    // The memory stays valid for the region that still holds it.
    region.write_from(&[2u8; 16]).unwrap();
}

#[tokio::test]
async fn regions_hear_that_their_buffer_was_unregistered() {
    let reg = MemoryRegistry::new();
    let a = reg
        .register_owned(AlignedBuffer::new(4096).unwrap(), Location::cpu(0))
        .unwrap();
    let region = reg.resolve(a, 16).unwrap();
    let sub = region.slice(4, 4).unwrap();
    assert!(!region.is_revoked());
    // A transfer holding the region waits on it alongside its I/O.
    let waiter = tokio::spawn(region.revoked());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiter.is_finished());
    let unregistering = reg.unregister(a).unwrap();
    tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .expect("told at once")
        .unwrap();
    assert!(region.is_revoked() && sub.is_revoked());
    sub.revoked().await;
    // The transfer lets go: the unregistration completes.
    drop((region, sub));
    tokio::time::timeout(Duration::from_secs(1), unregistering)
        .await
        .expect("released");
}

#[tokio::test]
async fn unregister_future_completes_when_the_last_region_goes() {
    let reg = MemoryRegistry::new();
    let a = reg
        .register_owned(AlignedBuffer::new(4096).unwrap(), Location::cpu(0))
        .unwrap();
    let region = reg.resolve(a, 16).unwrap();
    let copy = region.slice(4, 4).unwrap();
    let mut waiting = reg.unregister(a).unwrap();
    assert!(reg.resolve(a, 1).is_err(), "no new access after unregister");
    assert!(!waiting.is_done());
    let poll_once = |w: &mut Unregistering| futures::FutureExt::now_or_never(Pin::new(w)).is_some();
    assert!(!poll_once(&mut waiting));
    drop(region);
    assert!(!poll_once(&mut waiting), "a sub-region still holds it");
    let waiter = tokio::spawn(waiting);
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    drop(copy);
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken by the last region")
        .unwrap();
    // Without regions it is done at once.
    let b = reg
        .register_owned(AlignedBuffer::new(4096).unwrap(), Location::cpu(0))
        .unwrap();
    let w = reg.unregister(b).unwrap();
    assert!(w.is_done());
    w.await;
}

/// Records what it is told; attaches a value whose drop it also records.
#[derive(Debug, Default)]
struct Recorder {
    fail_len: Option<u64>,
    log: Mutex<Vec<String>>,
}

struct Attached(Arc<Recorder>, u64);

impl Drop for Attached {
    fn drop(&mut self) {
        self.0
            .log
            .lock()
            .unwrap()
            .push(format!("drop {:#x}", self.1));
    }
}

#[derive(Debug)]
struct Hook(&'static str, Arc<Recorder>);

impl RegistrationHook for Hook {
    fn protocol(&self) -> &str {
        self.0
    }
    fn on_register(&self, buffer: &RegisteredBuffer) -> Result<Registration> {
        if self.1.fail_len == Some(buffer.len()) {
            return Err(Error::NotSupported("refused".into()));
        }
        self.1
            .log
            .lock()
            .unwrap()
            .push(format!("{} register {:#x}", self.0, buffer.addr()));
        Ok(Registration {
            keys: Some(vec![buffer.len(), 7]),
            attachment: Some(Box::new(Attached(self.1.clone(), buffer.addr()))),
        })
    }
    fn on_unregister(&self, buffer: &RegisteredBuffer) {
        self.1
            .log
            .lock()
            .unwrap()
            .push(format!("{} unregister {:#x}", self.0, buffer.addr()));
    }
}

#[test]
fn hooks_publish_keys_keep_attachments_and_hear_of_unregistration() {
    let first = Arc::new(Recorder::default());
    let second = Arc::new(Recorder {
        fail_len: Some(8192),
        ..Recorder::default()
    });
    let reg = MemoryRegistry::with_hooks(vec![
        Arc::new(Hook("one", first.clone())),
        Arc::new(Hook("two", second.clone())),
    ]);
    let a = reg
        .register_owned(AlignedBuffer::new(4096).unwrap(), Location::cpu(0))
        .unwrap();
    let desc = &reg.descriptors()[0];
    assert_eq!(desc.key("one"), Some(&[4096, 7][..]));
    assert_eq!(desc.key("two"), Some(&[4096, 7][..]));
    assert_eq!(desc.key("tcp"), None);
    let region = reg.resolve(a, 8).unwrap();
    let att = region.buffer().attachment::<Attached>().unwrap();
    assert_eq!(att.1, a);
    assert!(region.buffer().attachment::<u32>().is_none());
    let waiting = reg.unregister(a).unwrap();
    let log = |r: &Recorder| r.log.lock().unwrap().clone();
    assert_eq!(
        log(&first),
        vec![
            format!("one register {a:#x}"),
            format!("one unregister {a:#x}")
        ]
    );
    drop(region);
    assert!(waiting.is_done());
    assert_eq!(log(&first).last(), Some(&format!("drop {a:#x}")));
    // A hook's refusal fails the registration; the hooks before it are told.
    let refused = AlignedBuffer::new(8192).unwrap();
    let b = refused.addr();
    assert!(reg.register_owned(refused, Location::cpu(0)).is_err());
    assert!(reg.resolve(b, 1).is_err());
    assert_eq!(
        log(&first)[3..],
        [
            format!("one register {b:#x}"),
            format!("one unregister {b:#x}"),
            format!("drop {b:#x}")
        ]
    );
    assert_eq!(log(&second).len(), 3, "never told of the refused buffer");
}

proptest! {
    #[test]
    fn resolve_agrees_with_naive_check(
        sizes in proptest::collection::vec(1u64..10_000, 1..6),
        probes in proptest::collection::vec((any::<u64>(), any::<u64>(), 0usize..6, 0u64..12_000, 0u64..12_000), 1..64),
    ) {
        let reg = MemoryRegistry::new();
        let mut bufs = Vec::new();
        for s in &sizes {
            let a = reg.register_owned(AlignedBuffer::new(*s as usize).unwrap(), Location::cpu(0)).unwrap();
            bufs.push((a, *s));
        }
        for (raw_addr, raw_len, which, off, len) in probes {
            // Mix wild probes with probes near real buffers.
            for (addr, len) in [(raw_addr, raw_len), (bufs[which % bufs.len()].0.wrapping_add(off), len)] {
                let naive = bufs.iter().any(|&(b, s)| {
                    (addr as u128) >= b as u128 && (addr as u128 + len as u128) <= (b as u128 + s as u128)
                });
                prop_assert_eq!(reg.resolve(addr, len).is_ok(), naive, "addr {:#x} len {}", addr, len);
            }
        }
    }
}
