//! Only this process's user may use its same-host socket: another user's process is refused
//! before it is sent anything (the socket hands out mappings of this process's memory).

use std::io::Read;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use mooncake_core::{EngineConfig, Location, TransferEngine};
use mooncake_transport_shm::{ShmConfig, ShmTransport};

/// Connects to the abstract socket `name` and says whether the target sent its greeting.
fn greeted(name: &str) -> bool {
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let Ok(mut s) = UnixStream::connect_addr(&addr) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut b = [0u8; 16];
    s.read_exact(&mut b).is_ok()
}

/// Not a test on its own: the other user's side, run by `another_users_process_is_refused`.
#[test]
#[ignore = "runs only as the other user's process of another_users_process_is_refused"]
fn other_user_side() {
    let Ok(name) = std::env::var("MC_TEST_SHM_SOCKET") else {
        return;
    };
    println!("GREETED {}", greeted(&name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_process_is_refused() {
    let engine = TransferEngine::start(
        EngineConfig::new("127.0.0.1"),
        vec![ShmTransport::new(ShmConfig::default()).expect("shared memory on this host")],
    )
    .await
    .unwrap();
    let _buf = engine.allocate_buffer(1 << 16, Location::cpu(0)).unwrap();
    let address = engine
        .local_descriptor()
        .endpoint("shm")
        .unwrap()
        .address
        .clone();
    let name = address.split_once('/').unwrap().1.to_owned();
    // This process's own user is greeted.
    let n = name.clone();
    assert!(tokio::task::spawn_blocking(move || greeted(&n))
        .await
        .unwrap());

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped the other-user half: starting a process as another user needs root");
        return;
    }
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "other_user_side",
            "--include-ignored",
            "--nocapture",
        ])
        .env("MC_TEST_SHM_SOCKET", &name)
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(child) = child else {
        println!("skipped the other-user half: cannot start a process as uid 65534");
        return;
    };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    if !out.contains("GREETED") {
        println!("skipped the other-user half: uid 65534 could not run this test binary");
        return;
    }
    assert!(out.contains("GREETED false"), "{out}");
    engine.shutdown().await;
}
