//! A serving peer is SIGKILLed halfway through its own pull: the other receivers, each in its
//! own process, complete, verify, and fetch again only what they lacked. The processes share a
//! catalog served by this test process over loopback (see `support/net_meta.rs`).
// Real processes, real deadlines: this harness reads the clock.
#![allow(clippy::disallowed_methods)]

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::{Location, MemoryMetadataStore, MetadataStore};
use mooncake_p2p::catalog::{have_key, HaveRecord};
use mooncake_p2p::scheduler::SchedulerConfig;
use mooncake_p2p::{Buffer, P2PConfig, P2PStore};
use support::net_meta::{serve, NetMeta};

const SIZE: u64 = 32 << 20;
const PIECE: u64 = 64 << 10;
const PIECES: usize = (SIZE / PIECE) as usize;
const NAME: &str = "ckpt/killed";
const DEADLINE: Duration = Duration::from_secs(60);

fn config() -> P2PConfig {
    P2PConfig {
        piece_size: Some(PIECE),
        scheduler: SchedulerConfig {
            pipeline_per_peer: 1,
            request_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            ..SchedulerConfig::default()
        },
        max_in_flight: 2,
        publish_interval: Duration::from_millis(5),
        refresh_interval: Duration::from_millis(50),
        pull_timeout: DEADLINE,
        ..P2PConfig::default()
    }
}

fn content() -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// One peer, in a child process: `origin` registers the payload, `receiver` pulls and checks
/// it; both print what they did and serve until their standard input closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of killed_serving_peer_survivors_complete_and_verify, started by it"]
async fn p2p_child() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let role = std::env::var("P2P_CHILD_ROLE").expect("started by the parent test");
    let meta_addr = std::env::var("P2P_META").expect("started by the parent test");
    let meta: Arc<dyn MetadataStore> = Arc::new(NetMeta::connect(&meta_addr).await);
    let store = P2PStore::new(meta, "127.0.0.1", config()).await.unwrap();
    println!("SEGMENT {}", store.segment_name());
    let addr = store
        .engine()
        .allocate_buffer(SIZE as usize, Location::cpu(0))
        .unwrap();
    let bufs = [Buffer::new(addr, SIZE)];
    let region = store.engine().memory().resolve(addr, SIZE).unwrap();
    match role.as_str() {
        "origin" => {
            region.write_from(&content()).unwrap();
            store
                .register(NAME, &bufs, 8 << 20, "", false)
                .await
                .unwrap();
            println!("READY");
        }
        _ => {
            let r = store.get_replica(NAME, &bufs).await.unwrap();
            let ok = region.to_vec() == content();
            let from: Vec<String> = r
                .pieces_from
                .iter()
                .map(|(s, n)| format!("{s}={n}"))
                .collect();
            println!(
                "DONE ok={ok} pieces={} fetched={} corrupt={} duplicates={} failed={} ms={} from={}",
                r.pieces,
                r.fetched,
                r.corrupt,
                r.duplicates,
                r.failed_requests,
                r.elapsed.as_millis(),
                from.join(",")
            );
        }
    }
    // Serve until the parent closes our standard input.
    tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new()))
        .await
        .unwrap()
        .unwrap();
    store.close().await.unwrap();
}

/// A child process and the lines it prints.
struct Peer {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Peer {
    fn start(role: &str, meta: &str) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "p2p_child", "--ignored", "--nocapture"])
            .env("P2P_CHILD_ROLE", role)
            .env("P2P_META", meta)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Peer { child, lines }
    }

    /// The rest of the first line starting with `tag `, waiting until `deadline`.
    fn expect(&self, tag: &str, deadline: Instant) -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {tag} line in time"));
            if let Some(rest) = line.strip_prefix(tag) {
                return rest.trim().to_owned();
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // Closing stdin asks the child to close; a kill makes sure of it.
        drop(self.child.stdin.take());
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, name: &str) -> String {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        .to_owned()
}

#[test]
fn killed_serving_peer_survivors_complete_and_verify() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Arc::new(MemoryMetadataStore::new());
    let addr = rt.block_on(serve(store.clone())).to_string();
    let deadline = Instant::now() + DEADLINE;

    let origin = Peer::start("origin", &addr);
    origin.expect("SEGMENT", deadline);
    origin.expect("READY", deadline);
    let mut victim = Peer::start("receiver", &addr);
    let survivors = [
        Peer::start("receiver", &addr),
        Peer::start("receiver", &addr),
    ];
    let victim_segment = victim.expect("SEGMENT", deadline);

    // Kill the victim once it holds (and serves) half the pieces.
    let key = have_key(NAME, &victim_segment);
    let held = loop {
        assert!(Instant::now() < deadline, "the victim never reached half");
        if let Some(v) = rt.block_on(store.get(&key)).unwrap() {
            let have: HaveRecord = postcard::from_bytes(&v.value).unwrap();
            if have.have.count_ones() >= PIECES / 2 {
                break have.have.count_ones();
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    victim.child.kill().unwrap(); // SIGKILL: no goodbye, its catalog entry stays.
    victim.child.wait().unwrap();
    assert!(held < PIECES, "the victim finished before it was killed");

    let mut from_victim = 0;
    for s in &survivors {
        let done = s.expect("DONE", deadline);
        assert_eq!(field(&done, "ok"), "true", "{done}");
        assert_eq!(field(&done, "corrupt"), "0", "{done}");
        let n = |f: &str| field(&done, f).parse::<usize>().unwrap();
        assert_eq!(n("pieces"), PIECES);
        // Requests to the dead peer failed; nothing verified was fetched again.
        assert_eq!(n("fetched"), n("pieces") + n("duplicates"), "{done}");
        for source in field(&done, "from").split(',') {
            let (segment, count) = source.rsplit_once('=').unwrap();
            if segment == victim_segment {
                from_victim += count.parse::<usize>().unwrap();
            }
        }
        eprintln!("survivor: {done} (victim killed holding {held}/{PIECES})");
    }
    // The victim was a real source before it died, not a bystander.
    assert!(from_victim > 0, "no survivor got a piece from the victim");
}
