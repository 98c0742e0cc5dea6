//! QUIC transport between nodes: one endpoint per node that both accepts and connects,
//! mutual TLS 1.3 where a peer is trusted only if the SHA-256 of its certificate is pinned
//! (like an SSH host key), and length-prefixed frames on streams.
//!
//! Certificates are self-signed, so names, issuers and validity dates mean nothing here;
//! what authenticates a peer is the pinned hash plus the TLS 1.3 handshake signature, which
//! proves the peer holds the private key of the certificate it presents.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ReadExactError, RecvStream, SendStream, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

/// Who a peer is: the SHA-256 of its certificate's DER encoding.
pub type PeerId = [u8; 32];

/// The application protocol both sides must agree on during the handshake.
pub const ALPN: &[u8] = b"twinfs/1";

/// The name a client puts in its handshake. Peers are identified by certificate hash,
/// never by name, so every connection uses the same one.
const SERVER_NAME: &str = "twinfs";

/// Bytes of the big-endian `u32` length prefix in front of every frame.
const FRAME_HEADER_LEN: usize = 4;

/// Close code sent to a peer that completed the handshake but is not the one we dialled.
const CLOSE_UNEXPECTED_PEER: VarInt = VarInt::from_u32(1);

/// Keep-alives well under the idle timeout, so an idle but healthy link never times out
/// while a dead peer is noticed within seconds.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
const IDLE_TIMEOUT_MS: u32 = 10_000;

/// Receive windows sized for loopback/LAN bandwidth-delay products, so that a large file
/// streams at link speed instead of stalling on flow-control credit.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;

/// The SHA-256 of a certificate's DER encoding, the identity a peer is pinned by.
pub fn peer_id_of(cert_der: &[u8]) -> PeerId {
    Sha256::digest(cert_der).into()
}

/// A node's own TLS identity: its self-signed certificate and private key
/// (ECDSA P-256 in practice).
#[derive(Debug)]
pub struct TlsIdentity {
    /// The DER certificate presented to peers; its hash is this node's [`PeerId`].
    pub cert: CertificateDer<'static>,
    /// The private key matching `cert`.
    pub key: PrivateKeyDer<'static>,
}

/// The set of peers a node accepts, shared between the daemon (which may replace it when
/// the configuration changes) and the endpoint's verifiers. A change applies to the next
/// handshake; established connections are left alone.
#[derive(Clone, Debug)]
pub struct PinnedPeers(Arc<RwLock<HashSet<PeerId>>>);

impl PinnedPeers {
    /// A set pinning exactly `ids`.
    pub fn new(ids: impl IntoIterator<Item = PeerId>) -> Self {
        Self(Arc::new(RwLock::new(ids.into_iter().collect())))
    }

    /// Whether `id` is pinned.
    pub fn contains(&self, id: &PeerId) -> bool {
        // The set is only ever swapped whole, so a panic elsewhere cannot leave it
        // half-updated: a poisoned lock still holds a consistent set.
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(id)
    }

    /// Pins exactly `ids` from now on.
    pub fn replace(&self, ids: impl IntoIterator<Item = PeerId>) {
        let ids = ids.into_iter().collect();
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = ids;
    }
}

/// Why a length-prefixed frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more bytes than the caller accepts.
    #[error("frame of {len} bytes is larger than the limit of {max}")]
    TooLarge {
        /// The announced payload length.
        len: usize,
        /// The caller's limit.
        max: usize,
    },
}

/// Why setting up, opening or using a connection to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// rustls refused the TLS configuration, e.g. a private key that does not match the
    /// certificate or that ring cannot use.
    #[error("TLS configuration refused: {0}")]
    Tls(#[from] rustls::Error),
    /// The TLS configuration lacks the cipher suite QUIC's initial packets need.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[from] NoInitialCipherSuite),
    /// The UDP socket could not be bound.
    #[error("binding the QUIC endpoint to {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The endpoint could not start a connection (e.g. it is closed or `addr` is invalid).
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The peer's address.
        addr: SocketAddr,
        /// Why quinn refused.
        source: quinn::ConnectError,
    },
    /// The handshake failed: unreachable peer, timeout, or either side refused the other's
    /// certificate or signature.
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The peer's address.
        addr: SocketAddr,
        /// Why the connection ended.
        source: quinn::ConnectionError,
    },
    /// An incoming handshake did not complete in time; its connection was dropped.
    #[error("handshake with {addr} not completed within {after:?}")]
    HandshakeTimeout {
        /// The peer's address.
        addr: SocketAddr,
        /// How long it had.
        after: Duration,
    },
    /// The handshake completed without a peer certificate, which the TLS configuration
    /// should make impossible.
    #[error("peer at {addr} presented no certificate")]
    NoPeerCertificate {
        /// The peer's address.
        addr: SocketAddr,
    },
    /// The peer at `addr` is pinned, but it is not the peer that was dialled.
    #[error("peer at {addr} is {}, expected {}", Hex(.presented), Hex(.expected))]
    UnexpectedPeer {
        /// The peer's address.
        addr: SocketAddr,
        /// The peer that was dialled.
        expected: PeerId,
        /// The peer that answered.
        presented: PeerId,
    },
    /// Writing to a stream failed, usually because the connection was lost.
    #[error("writing a frame: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed, usually because the connection was lost.
    #[error("reading a frame: {0}")]
    Read(#[from] quinn::ReadError),
    /// A frame's length prefix exceeds the limit; the body was not read.
    #[error("frame of {len} bytes is larger than the limit of {max}")]
    FrameTooLarge {
        /// The announced (or, when writing, the actual) payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame's length prefix.
    #[error("stream ended {got} bytes into a {FRAME_HEADER_LEN}-byte frame length prefix")]
    TruncatedHeader {
        /// Bytes of the prefix received.
        got: usize,
    },
    /// The stream ended inside a frame's payload.
    #[error("stream ended {got} bytes into a {len}-byte frame")]
    TruncatedFrame {
        /// The announced payload length.
        len: usize,
        /// Bytes of the payload received.
        got: usize,
    },
}

impl From<FrameError> for TransportError {
    fn from(err: FrameError) -> Self {
        match err {
            FrameError::TooLarge { len, max } => Self::FrameTooLarge { len, max },
        }
    }
}

/// Creates an endpoint bound to `bind` that accepts connections from, and connects to,
/// peers in `pinned`, presenting `identity`.
pub fn endpoint(
    bind: SocketAddr,
    identity: &TlsIdentity,
    pinned: PinnedPeers,
) -> Result<quinn::Endpoint, TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedVerifier {
        pinned,
        provider: provider.clone(),
    });
    let transport = Arc::new(transport_config());

    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    // A resumed session skips certificate verification, so a peer removed from the pinned
    // set could come back on an old ticket: never issue or store any.
    server_tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server_tls.send_tls13_tickets = 0;
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
    server.transport_config(transport.clone());

    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    // Same reason as the server side: every handshake must go through the verifier.
    client_tls.resumption = rustls::client::Resumption::disabled();
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));
    client.transport_config(transport);

    let socket = std::net::UdpSocket::bind(bind)
        .map_err(|source| TransportError::Bind { addr: bind, source })?;
    socket_buffers(&socket);
    let runtime = quinn::default_runtime().ok_or_else(|| TransportError::Bind {
        addr: bind,
        source: std::io::Error::other("no async runtime"),
    })?;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| TransportError::Bind {
            addr: bind,
            source: std::io::Error::other(e),
        })?;
    let mut endpoint = quinn::Endpoint::new(config, Some(server), socket, runtime)
        .map_err(|source| TransportError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// The largest UDP payload a node sends or accepts. MTU discovery searches up to it
/// from 1200, so Ethernet paths settle at 1452 or below while loopback and jumbo-frame
/// links get datagrams four times as large (a full sync over loopback took 15 % less
/// time). Not higher: quinn sends up to 10 datagrams in one GSO call, which the kernel
/// refuses past 64 KiB in all, and the refused datagrams count as lost.
const MAX_UDP_PAYLOAD: u16 = 6400;

/// Bytes of kernel buffer each way for the endpoint's socket. The default (208 KiB
/// here) overflows when a full sync bursts at loopback speed: datagrams are dropped,
/// QUIC takes each drop as congestion and the window stays small.
const SOCKET_BUFFER: i32 = 16 << 20;

/// Sets the socket's receive and send buffers to [`SOCKET_BUFFER`]: past
/// `net.core.rmem_max` where the daemon may (root, `SO_RCVBUFFORCE`), else up to it.
fn socket_buffers(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let set = |option: libc::c_int| {
        // SAFETY: a valid socket fd and a pointer to an int of the given size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&SOCKET_BUFFER as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            ) == 0
        }
    };
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if !set(force) && !set(plain) {
            tracing::debug!(
                option = plain,
                "cannot size the socket buffer; kernel default kept"
            );
        }
    }
}

fn transport_config() -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    config
        .keep_alive_interval(Some(KEEP_ALIVE))
        // Peers are on a LAN or a backplane: a low first guess makes a handshake sent
        // before the peer was up retried within a fraction of a second, not seconds.
        .initial_rtt(Duration::from_millis(50))
        .max_idle_timeout(Some(VarInt::from_u32(IDLE_TIMEOUT_MS).into()))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    config.mtu_discovery_config(Some(mtu));
    config
}

/// Connects to the peer at `addr` and checks that it is `expected`, not merely some
/// pinned peer. Returns the connection and the peer's ID.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    expected: PeerId,
) -> Result<(Connection, PeerId), TransportError> {
    let result = async {
        let connecting = endpoint
            .connect(addr, SERVER_NAME)
            .map_err(|source| TransportError::Connect { addr, source })?;
        let connection = connecting
            .await
            .map_err(|source| TransportError::Handshake { addr, source })?;
        let presented = presented_id(&connection)?;
        if presented != expected {
            connection.close(CLOSE_UNEXPECTED_PEER, b"unexpected peer");
            return Err(TransportError::UnexpectedPeer {
                addr,
                expected,
                presented,
            });
        }
        Ok((connection, presented))
    }
    .await;
    match &result {
        Ok(_) => debug!(%addr, peer = %Hex(&expected), "connected"),
        Err(error) => warn!(%addr, peer = %Hex(&expected), %error, "connection to peer failed"),
    }
    result
}

/// How long a peer has to complete a handshake it started. A dialler gives up after 2 s
/// and tries again; what this bounds is a host that never finishes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handshakes under way at once, in all and from one IP address (an IPv6 /64 counts as
/// one). Anyone who can reach the port can start one (a client's certificate is checked
/// only in its second flight); past these limits new ones are refused rather than
/// queued, and a host needs addresses it can receive on (see [`Listener`]) to take more
/// than its share. Those from a configured peer's address count only against that
/// address's limit: a host with a few addresses that fills the rest does not keep the
/// peers out.
const MAX_HANDSHAKES: usize = 64;
/// See [`MAX_HANDSHAKES`].
pub const MAX_HANDSHAKES_PER_IP: usize = 8;

/// The connection of a completed handshake and its peer, or why it failed.
pub type Accepted = Result<(Connection, PeerId), TransportError>;

/// Takes an endpoint's incoming connections: each handshake runs in a task of its own,
/// for at most [`HANDSHAKE_TIMEOUT`], so a host that starts handshakes and never
/// finishes them delays nobody else's. A first packet from an address not yet proven
/// is answered with a Retry, so a handshake holds a slot only for a host that receives
/// what is sent to its address (no spoofed floods).
pub struct Listener {
    accepted: tokio::sync::mpsc::Receiver<Accepted>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Starts taking `endpoint`'s incoming connections (on the current tokio runtime).
    pub fn new(endpoint: quinn::Endpoint) -> Listener {
        Listener::with_peers(endpoint, Vec::new())
    }

    /// [`Listener::new`], with the addresses the configured peers connect from: their
    /// handshakes are let in past the limit of all (see [`MAX_HANDSHAKES`]).
    pub fn with_peers(endpoint: quinn::Endpoint, peers: Vec<std::net::IpAddr>) -> Listener {
        let (tx, accepted) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
        let peers: std::collections::HashSet<_> = peers.into_iter().map(source_of).collect();
        let task = tokio::spawn(listen(endpoint, tx, peers));
        Listener { accepted, task }
    }

    /// The next completed or failed handshake, in the order they end. `None` once the
    /// endpoint is closed; `Some(Err(..))` for a connection that was refused, failed or
    /// timed out, after which the caller should simply accept again.
    pub async fn accept(&mut self) -> Option<Accepted> {
        self.accepted.recv().await
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Handshakes under way, in all (but those of peers' addresses) and by source (an IP
/// address; an IPv6 /64).
#[derive(Default)]
struct Handshakes {
    total: usize,
    by_ip: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// What handshakes are counted by: the address, or for IPv6 its /64 (a host is
/// commonly given a whole /64, and could take every slot from its addresses).
fn source_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
        v4 => v4,
    }
}

/// One handshake's place in [`Handshakes`], given back when dropped.
struct Slot {
    handshakes: Arc<std::sync::Mutex<Handshakes>>,
    ip: std::net::IpAddr,
    /// Counted in the total (not from a peer's address).
    counted: bool,
}

impl Slot {
    fn take(
        handshakes: &Arc<std::sync::Mutex<Handshakes>>,
        ip: std::net::IpAddr,
        peer: bool,
    ) -> Option<Slot> {
        let mut h = handshakes.lock().unwrap_or_else(PoisonError::into_inner);
        let from_ip = h.by_ip.get(&ip).copied().unwrap_or(0);
        if (!peer && h.total >= MAX_HANDSHAKES) || from_ip >= MAX_HANDSHAKES_PER_IP {
            return None;
        }
        if !peer {
            h.total += 1;
        }
        h.by_ip.insert(ip, from_ip + 1);
        Some(Slot {
            handshakes: handshakes.clone(),
            ip,
            counted: !peer,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut h = self
            .handshakes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.counted {
            h.total = h.total.saturating_sub(1);
        }
        if let Some(n) = h.by_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                h.by_ip.remove(&self.ip);
            }
        }
    }
}

async fn listen(
    endpoint: quinn::Endpoint,
    tx: tokio::sync::mpsc::Sender<Accepted>,
    peers: std::collections::HashSet<std::net::IpAddr>,
) {
    let handshakes = Arc::new(std::sync::Mutex::new(Handshakes::default()));
    while let Some(incoming) = endpoint.accept().await {
        let addr = incoming.remote_address();
        if !incoming.remote_address_validated() {
            // Dropping the Incoming a failed retry hands back refuses it; it cannot
            // fail here, as an unvalidated address may always be retried.
            let _ = incoming.retry();
            continue;
        }
        let source = source_of(addr.ip());
        let Some(slot) = Slot::take(&handshakes, source, peers.contains(&source)) else {
            warn!(%addr, "too many handshakes under way; connection refused");
            incoming.refuse();
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let result = handshake(incoming, addr).await;
            drop(slot);
            log_accepted(addr, &result);
            match result {
                // Nobody may be listening any more; the connection then closes.
                Ok(_) => {
                    let _ = tx.send(result).await;
                }
                // Only for the caller's information: never wait for room.
                Err(_) => {
                    let _ = tx.try_send(result);
                }
            }
        });
    }
}

async fn handshake(incoming: quinn::Incoming, addr: SocketAddr) -> Accepted {
    let connecting = incoming
        .accept()
        .map_err(|source| TransportError::Handshake { addr, source })?;
    let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(connected) => connected.map_err(|source| TransportError::Handshake { addr, source })?,
        // Dropping the handshake's future closes its connection.
        Err(_) => {
            return Err(TransportError::HandshakeTimeout {
                addr,
                after: HANDSHAKE_TIMEOUT,
            })
        }
    };
    let peer = presented_id(&connection)?;
    Ok((connection, peer))
}

fn log_accepted(addr: SocketAddr, result: &Accepted) {
    match result {
        Ok((_, peer)) => debug!(%addr, peer = %Hex(peer), "accepted"),
        // A dialler that gave up on this handshake (it dials again at once when the
        // peer it waits for knocks) is no fault of anyone's.
        Err(TransportError::Handshake {
            source: quinn::ConnectionError::ConnectionClosed(close),
            ..
        }) if close.error_code == quinn::TransportErrorCode::APPLICATION_ERROR => {
            debug!(%addr, "incoming connection abandoned by the dialler")
        }
        Err(error) => warn!(%addr, %error, "incoming connection failed"),
    }
}

/// The ID of the certificate the peer of an established connection presented.
fn presented_id(connection: &Connection) -> Result<PeerId, TransportError> {
    connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|cert| peer_id_of(cert)))
        .ok_or(TransportError::NoPeerCertificate {
            addr: connection.remote_address(),
        })
}

/// Writes `payload` as one frame: a big-endian `u32` length, then the bytes.
pub async fn write_frame(send: &mut SendStream, payload: &[u8]) -> Result<(), TransportError> {
    let len = u32::try_from(payload.len()).map_err(|_| TransportError::FrameTooLarge {
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    send.write_all(&len.to_be_bytes()).await?;
    send.write_all(payload).await?;
    Ok(())
}

/// Reads one frame of at most `max` bytes. `None` when the stream ends cleanly between
/// frames. A length over `max` is refused before any of the body is read, so the caller
/// can drop the stream or close the connection without buffering it.
pub async fn read_frame(
    recv: &mut RecvStream,
    max: usize,
) -> Result<Option<Vec<u8>>, TransportError> {
    let mut header = [0; FRAME_HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(ReadExactError::FinishedEarly(got)) => {
            return Err(TransportError::TruncatedHeader { got })
        }
        Err(ReadExactError::ReadError(error)) => return Err(error.into()),
    }
    let len = frame_len(header, max)?;
    let mut payload = vec![0; len];
    match recv.read_exact(&mut payload).await {
        Ok(()) => Ok(Some(payload)),
        Err(ReadExactError::FinishedEarly(got)) => Err(TransportError::TruncatedFrame { len, got }),
        Err(ReadExactError::ReadError(error)) => Err(error.into()),
    }
}

/// Decodes the frame at the start of `buf`: the payload and how many bytes of `buf` it
/// took, or `None` if `buf` does not hold a whole frame yet. A length over `max` is an
/// error as soon as the prefix is complete.
pub fn decode_frame(buf: &[u8], max: usize) -> Result<Option<(Vec<u8>, usize)>, FrameError> {
    let Some((header, rest)) = buf.split_first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(None);
    };
    let len = frame_len(*header, max)?;
    Ok(rest
        .get(..len)
        .map(|payload| (payload.to_vec(), FRAME_HEADER_LEN + len)))
}

fn frame_len(header: [u8; FRAME_HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    // usize is at least 32 bits on every target twinfs supports.
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Verifies peers on both sides of a handshake: the end-entity certificate must be pinned,
/// and the handshake signature must verify against it. Chains, names and dates are
/// ignored because pinned certificates are self-signed.
#[derive(Debug)]
struct PinnedVerifier {
    pinned: PinnedPeers,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    fn check_pinned(
        &self,
        end_entity: &CertificateDer<'_>,
        role: &str,
    ) -> Result<(), rustls::Error> {
        let id = peer_id_of(end_entity);
        if self.pinned.contains(&id) {
            return Ok(());
        }
        // The address is not known here; accept() and connect() log it with the error.
        warn!(peer = %Hex(&id), role, "refused a certificate that is not pinned");
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
        .inspect_err(|error| {
            warn!(peer = %Hex(&peer_id_of(cert)), %error, "handshake signature does not match the certificate");
        })
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Only TLS 1.3 is configured, so a TLS 1.2 signature means something is badly wrong.
fn refuse_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check_pinned(end_entity, "server")?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for PinnedVerifier {
    fn client_auth_mandatory(&self) -> bool {
        // Stated rather than left to the default: a client without a certificate must
        // never get in.
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check_pinned(end_entity, "client")?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// Lower-case hex, for peer IDs in logs and error messages.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn handshakes_are_counted_by_address_and_by_ipv6_64() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("address");
        assert_eq!(source_of(ip("198.18.0.7")), ip("198.18.0.7"));
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            source_of(ip("2001:db8:1:2::9"))
        );
        assert_ne!(
            source_of(ip("2001:db8:1:3::1")),
            source_of(ip("2001:db8:1:2::1"))
        );
        assert_eq!(source_of(ip("::ffff:198.18.0.7")), ip("198.18.0.7"));
    }

    fn encode(payload: &[u8]) -> Vec<u8> {
        let mut buf = u32::try_from(payload.len())
            .expect("test payloads are small")
            .to_be_bytes()
            .to_vec();
        buf.extend_from_slice(payload);
        buf
    }

    #[test]
    fn incomplete_input_asks_for_more() {
        assert_eq!(decode_frame(&[], 10), Ok(None));
        assert_eq!(decode_frame(&[0, 0, 0], 10), Ok(None));
        assert_eq!(decode_frame(&[0, 0, 0, 3, b'a', b'b'], 10), Ok(None));
    }

    #[test]
    fn empty_frame_is_a_frame() {
        assert_eq!(decode_frame(&[0, 0, 0, 0], 0), Ok(Some((vec![], 4))));
    }

    #[test]
    fn decodes_only_the_first_of_two_frames() {
        let mut buf = encode(b"one");
        buf.extend(encode(b"two"));
        assert_eq!(decode_frame(&buf, 10), Ok(Some((b"one".to_vec(), 7))));
        assert_eq!(decode_frame(&buf[7..], 10), Ok(Some((b"two".to_vec(), 7))));
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        assert_eq!(
            decode_frame(&[0, 0, 0, 11], 10),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        assert_eq!(
            decode_frame(&[0xff; 4], usize::MAX >> 40),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: usize::MAX >> 40
            })
        );
    }

    #[test]
    fn hex_is_lower_case_and_padded() {
        assert_eq!(Hex(&[0x00, 0xab, 0x0f]).to_string(), "00ab0f");
    }

    #[test]
    fn peer_id_is_sha256_of_der() {
        // SHA-256 of the empty string.
        assert_eq!(
            Hex(&peer_id_of(b"")).to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn pinned_set_can_be_replaced() {
        let pinned = PinnedPeers::new([[1; 32]]);
        let shared = pinned.clone();
        shared.replace([[2; 32]]);
        assert!(!pinned.contains(&[1; 32]));
        assert!(pinned.contains(&[2; 32]));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..64) {
            if let Ok(Some((payload, consumed))) = decode_frame(&buf, max) {
                prop_assert!(payload.len() <= max);
                prop_assert_eq!(consumed, payload.len() + FRAME_HEADER_LEN);
                prop_assert!(consumed <= buf.len());
            }
        }

        #[test]
        fn encoded_frames_round_trip_and_prefixes_are_incomplete(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            tail in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let frame = encode(&payload);
            for cut in 0..frame.len() {
                prop_assert_eq!(decode_frame(&frame[..cut], 64), Ok(None));
            }
            let mut buf = frame.clone();
            buf.extend(tail);
            prop_assert_eq!(decode_frame(&buf, 64), Ok(Some((payload, frame.len()))));
        }
    }
}
