//! The transport's floor for bulk bytes: how long twinfs's QUIC endpoints (the same
//! configuration as the daemon's: pinned mutual TLS, windows, datagram size) take to
//! move N MiB from memory to memory over loopback, on S streams at once, against a
//! plain TCP connection on loopback moving the same bytes in the same run, with the
//! CPU time each took (both ends run in this process). No disk, no files: what no
//! full sync over this transport can beat, in time or in CPU.
//!
//! usage: cargo run --release -p twinfs-replicator --example transport_floor -- [MIB] [STREAMS] [ROUNDS]

use std::error::Error;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustls::pki_types::PrivatePkcs8KeyDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use twinfs_replicator::transport::{
    connect, endpoint, peer_id_of, Listener, PinnedPeers, TlsIdentity,
};

type Result<T = ()> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

const CHUNK: usize = 1 << 20;

/// CPU time (user + system) of this process so far: both ends of each transfer run in
/// it, so a difference is what one transfer cost in all.
fn cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given; zeroed is a valid start.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to an rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn identity(name: &str) -> Result<TlsIdentity> {
    let generated = rcgen::generate_simple_self_signed(vec![name.into()])?;
    Ok(TlsIdentity {
        cert: generated.cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der()).into(),
    })
}

fn arg(n: usize, default: usize) -> Result<usize> {
    match std::env::args().nth(n) {
        Some(a) => Ok(a.parse()?),
        None => Ok(default),
    }
}

async fn quic(mib: usize, streams: usize) -> Result<(Duration, Duration, u64)> {
    let (a, b) = (identity("floor-a")?, identity("floor-b")?);
    let (a_id, b_id) = (peer_id_of(&a.cert), peer_id_of(&b.cert));
    let ea = endpoint("127.0.0.1:0".parse()?, &a, PinnedPeers::new([b_id]))?;
    let eb = endpoint("127.0.0.2:0".parse()?, &b, PinnedPeers::new([a_id]))?;
    let b_addr = eb.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (conn, _) = Listener::new(eb.clone())
            .accept()
            .await
            .ok_or("endpoint closed")??;
        let mut tasks = Vec::new();
        for _ in 0..streams {
            let mut recv = conn.accept_uni().await?;
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while let Some(chunk) = recv.read_chunk(CHUNK, true).await? {
                    n += chunk.bytes.len() as u64;
                }
                Ok::<u64, Box<dyn Error + Send + Sync>>(n)
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        // Every byte is in: the transfer ends here, not after the close's drain.
        let done = (Instant::now(), cpu());
        let rtt = conn.rtt();
        let mtu = conn.stats().path.current_mtu;
        conn.close(0u32.into(), b"done");
        eb.wait_idle().await;
        Ok::<_, Box<dyn Error + Send + Sync>>((total, rtt, mtu, done))
    });
    let (conn, _) = connect(&ea, b_addr, b_id).await?;
    let data = bytes::Bytes::from(vec![0x5au8; CHUNK]);
    let (start, cpu0) = (Instant::now(), cpu());
    let per_stream = mib / streams;
    let mut senders = Vec::new();
    for _ in 0..streams {
        let mut send = conn.open_uni().await?;
        let data = data.clone();
        senders.push(tokio::spawn(async move {
            for _ in 0..per_stream {
                send.write_chunk(data.clone()).await?;
            }
            send.finish()?;
            send.stopped().await?;
            Ok::<(), Box<dyn Error + Send + Sync>>(())
        }));
    }
    for s in senders {
        s.await??;
    }
    let (total, rtt, mtu, (done, cpu1)) = receiver.await??;
    let (took, used) = (done - start, cpu1 - cpu0);
    eprintln!(
        "  quic: rtt {rtt:?}, mtu {mtu}, lost {}",
        conn.stats().path.lost_packets
    );
    ea.wait_idle().await;
    Ok((took, used, total))
}

async fn tcp(mib: usize) -> Result<(Duration, Duration, u64)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        Ok::<u64, std::io::Error>(total)
    });
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let data = vec![0x5au8; CHUNK];
    let (start, cpu0) = (Instant::now(), cpu());
    for _ in 0..mib {
        s.write_all(&data).await?;
    }
    s.shutdown().await?;
    let total = receiver.await??;
    Ok((start.elapsed(), cpu() - cpu0, total))
}

#[tokio::main]
async fn main() -> Result {
    let mib = arg(1, 512)?;
    let streams = arg(2, 1)?.max(1);
    let rounds = arg(3, 3)?;
    for round in 1..=rounds {
        let (q, qc, qb) = quic(mib, streams).await?;
        let (t, tc, tb) = tcp(mib).await?;
        println!(
            "round {round}: quic {streams} stream(s) {:.3} s, CPU {:.3} s ({:.0} MB/s, {qb} B); \
             tcp {:.3} s, CPU {:.3} s ({:.0} MB/s, {tb} B)",
            q.as_secs_f64(),
            qc.as_secs_f64(),
            qb as f64 / q.as_secs_f64() / 1e6,
            t.as_secs_f64(),
            tc.as_secs_f64(),
            tb as f64 / t.as_secs_f64() / 1e6,
        );
    }
    Ok(())
}
