//! The embedded demo: a target process and an initiator process move data over loopback TCP
//! through the transfer engine and verify every byte. No external service is involved.
//!
//! ```text
//! cargo run --release --example transfer_demo
//! ```

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Instant;

use mooncake::{Discovery, Location, TransferRequest};

const SIZE: usize = 256 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().nth(1).as_deref() == Some("--target") {
        return target().await;
    }
    println!(
        "mooncake-rs transfer engine demo: two processes, loopback TCP, {} MiB each way",
        SIZE >> 20
    );
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--target")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let line = BufReader::new(child.stdout.take().ok_or("no stdout")?)
        .lines()
        .next()
        .ok_or("target printed nothing")??;
    let mut words = line.split_whitespace();
    let (segment, remote) = match (words.next(), words.next()) {
        (Some(s), Some(a)) => (s.to_owned(), a.parse::<u64>()?),
        _ => return Err(format!("unexpected target line {line:?}").into()),
    };
    println!("target process {} serves segment {segment}", child.id());

    let engine = mooncake::start_engine("127.0.0.1", Discovery::P2PHandshake).await?;
    let local = engine.allocate_buffer(SIZE, Location::cpu(0))?;
    let peer = engine.open_segment(&segment).await?;
    println!(
        "initiator segment {} opened {segment} by handshake",
        engine.segment_name()
    );

    // READ the target's pattern in 4 MiB requests, one batch.
    let chunk = 4u64 << 20;
    let reads: Vec<_> = (0..SIZE as u64 / chunk)
        .map(|i| TransferRequest::read(&peer, remote + i * chunk, local + i * chunk, chunk))
        .collect();
    let t = Instant::now();
    for r in engine.transfer(reads).await {
        r?;
    }
    let secs = t.elapsed().as_secs_f64();
    let got = engine.memory().resolve(local, SIZE as u64)?.to_vec();
    assert!(got == pattern(7, SIZE), "READ returned wrong bytes");
    println!(
        "READ  {} MiB in {:.1} ms = {:.2} GB/s, verified",
        SIZE >> 20,
        secs * 1e3,
        SIZE as f64 / secs / 1e9
    );

    // WRITE a new pattern back, then READ it again to verify what the target holds.
    engine
        .memory()
        .resolve(local, SIZE as u64)?
        .write_from(&pattern(42, SIZE))?;
    let writes: Vec<_> = (0..SIZE as u64 / chunk)
        .map(|i| TransferRequest::write(&peer, remote + i * chunk, local + i * chunk, chunk))
        .collect();
    let t = Instant::now();
    for r in engine.transfer(writes).await {
        r?;
    }
    let secs = t.elapsed().as_secs_f64();
    engine
        .memory()
        .resolve(local, SIZE as u64)?
        .write_from(&vec![0u8; SIZE])?;
    let reads: Vec<_> = (0..SIZE as u64 / chunk)
        .map(|i| TransferRequest::read(&peer, remote + i * chunk, local + i * chunk, chunk))
        .collect();
    for r in engine.transfer(reads).await {
        r?;
    }
    let got = engine.memory().resolve(local, SIZE as u64)?.to_vec();
    assert!(got == pattern(42, SIZE), "WRITE did not land");
    println!(
        "WRITE {} MiB in {:.1} ms = {:.2} GB/s, verified by reading back",
        SIZE >> 20,
        secs * 1e3,
        SIZE as f64 / secs / 1e9
    );

    // A request outside the target's registered memory is refused, not executed.
    let bad = engine
        .transfer(vec![TransferRequest::read(
            &peer,
            remote + SIZE as u64,
            local,
            4096,
        )])
        .await;
    println!(
        "out-of-range READ refused as expected: {}",
        bad[0].as_ref().err().ok_or("accepted")?
    );

    engine.shutdown().await;
    drop(child.stdin.take());
    child.wait()?;
    println!("demo OK");
    Ok(())
}

async fn target() -> Result<(), Box<dyn std::error::Error>> {
    let engine = mooncake::start_engine("127.0.0.1", Discovery::P2PHandshake).await?;
    let buf = engine.allocate_buffer(SIZE, Location::cpu(0))?;
    engine
        .memory()
        .resolve(buf, SIZE as u64)?
        .write_from(&pattern(7, SIZE))?;
    println!("{} {}", engine.segment_name(), buf);
    // Serve until the initiator closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut b = [0u8; 1];
        let _ = std::io::stdin().read(&mut b);
    })
    .await?;
    engine.shutdown().await;
    Ok(())
}
