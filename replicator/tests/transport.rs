//! Real-QUIC tests of the transport on 127.0.0.1: mutual pinning, refusals (unpinned
//! peer, stolen certificate without its key, wrong pinned peer), handshakes left
//! hanging, and frame limits.

use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ConnectionError, Endpoint, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::task::JoinHandle;
use twinfs_replicator::transport::{
    connect, endpoint, peer_id_of, read_frame, write_frame, Accepted, Listener, PeerId,
    PinnedPeers, TlsIdentity, TransportError, ALPN, MAX_HANDSHAKES_PER_IP,
};

type TestResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

/// Every test finishes well within this, or fails instead of hanging.
const TEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_FRAME: usize = 1024;
const LOCALHOST: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// A running node: its ID, the set it pins, and its endpoint on a free port.
struct Node {
    id: PeerId,
    pinned: PinnedPeers,
    endpoint: Endpoint,
    addr: SocketAddr,
}

fn identity(name: &str) -> TestResult<TlsIdentity> {
    let generated = rcgen::generate_simple_self_signed(vec![name.into()])?;
    Ok(TlsIdentity {
        cert: generated.cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der()).into(),
    })
}

fn start(identity: &TlsIdentity, pins: &[PeerId]) -> TestResult<Node> {
    let pinned = PinnedPeers::new(pins.iter().copied());
    let endpoint = endpoint(LOCALHOST, identity, pinned.clone())?;
    Ok(Node {
        id: peer_id_of(&identity.cert),
        pinned,
        addr: endpoint.local_addr()?,
        endpoint,
    })
}

/// Nodes A and B, each pinning the other.
fn pair() -> TestResult<(Node, Node)> {
    let (a, b) = (identity("node-a")?, identity("node-b")?);
    let (a_id, b_id) = (peer_id_of(&a.cert), peer_id_of(&b.cert));
    Ok((start(&a, &[b_id])?, start(&b, &[a_id])?))
}

/// The next handshake `endpoint` completes or fails, through a listener of its own.
async fn accept(endpoint: &Endpoint) -> Option<Accepted> {
    Listener::new(endpoint.clone()).accept().await
}

async fn within<T>(test: impl Future<Output = TestResult<T>>) -> TestResult<T> {
    tokio::time::timeout(TEST_TIMEOUT, test).await?
}

/// Accepts one stream and answers each frame with `reply:` + frame until the stream
/// ends; returns what was received.
async fn answer(connection: &Connection) -> TestResult<Vec<Vec<u8>>> {
    let (mut send, mut recv) = connection.accept_bi().await?;
    let mut received = Vec::new();
    while let Some(frame) = read_frame(&mut recv, MAX_FRAME).await? {
        write_frame(&mut send, &[b"reply:".as_slice(), &frame].concat()).await?;
        received.push(frame);
    }
    send.finish()?;
    Ok(received)
}

/// Accepts one connection, answers one stream on it, and waits for the client to hang up.
fn serve_one(endpoint: &Endpoint) -> JoinHandle<TestResult<(PeerId, Vec<Vec<u8>>)>> {
    let endpoint = endpoint.clone();
    tokio::spawn(async move {
        let (connection, peer) = accept(&endpoint).await.ok_or("endpoint closed")??;
        let received = answer(&connection).await?;
        connection.closed().await;
        Ok((peer, received))
    })
}

/// Accepts one connection and returns the refusal; a connection that gets in is a failure.
fn expect_refusal(endpoint: &Endpoint) -> JoinHandle<TestResult<TransportError>> {
    let endpoint = endpoint.clone();
    tokio::spawn(async move {
        match accept(&endpoint).await.ok_or("endpoint closed")? {
            Ok((_, peer)) => Err(format!("accepted peer {peer:02x?}").into()),
            Err(error) => Ok(error),
        }
    })
}

/// Connects to `addr` expecting `peer`, sends one frame and reads the reply.
async fn exchange(from: &Endpoint, addr: SocketAddr, peer: PeerId) -> TestResult<Vec<u8>> {
    let (connection, _) = connect(from, addr, peer).await?;
    ask(&connection).await
}

async fn ask(connection: &Connection) -> TestResult<Vec<u8>> {
    let (mut send, mut recv) = connection.open_bi().await?;
    write_frame(&mut send, b"hello").await?;
    send.finish()?;
    let reply = read_frame(&mut recv, MAX_FRAME).await?;
    connection.close(VarInt::from_u32(0), b"done");
    reply.ok_or_else(|| "stream ended without a reply".into())
}

#[tokio::test(flavor = "multi_thread")]
async fn mutually_pinned_nodes_exchange_frames() -> TestResult {
    within(async {
        let (a, b) = pair()?;
        let server = serve_one(&b.endpoint);

        let (connection, peer) = connect(&a.endpoint, b.addr, b.id).await?;
        assert_eq!(peer, b.id);
        let (mut send, mut recv) = connection.open_bi().await?;
        let messages: [&[u8]; 3] = [b"first", b"", &[7; 1000]];
        for message in messages {
            write_frame(&mut send, message).await?;
            let reply = read_frame(&mut recv, MAX_FRAME).await?;
            assert_eq!(reply, Some([b"reply:".as_slice(), message].concat()));
        }
        send.finish()?;
        assert_eq!(read_frame(&mut recv, MAX_FRAME).await?, None);
        connection.close(VarInt::from_u32(0), b"done");

        let (client, received) = server.await??;
        assert_eq!(client, a.id);
        assert_eq!(received, messages.map(<[u8]>::to_vec));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn unpinned_client_is_refused() -> TestResult {
    within(async {
        let (a, b) = (identity("node-a")?, identity("node-b")?);
        let b_id = peer_id_of(&b.cert);
        let a = start(&a, &[b_id])?;
        let b = start(&b, &[])?;
        let refusal = expect_refusal(&b.endpoint);

        // A trusts B, so A's side of the handshake may complete before B refuses A;
        // the refusal then shows up on the first stream operation.
        let attempt = exchange(&a.endpoint, b.addr, b.id).await;
        assert!(attempt.is_err(), "A got through: {attempt:?}");
        let refusal = refusal.await??;
        assert!(matches!(refusal, TransportError::Handshake { addr, .. } if addr.port() == a.addr.port()), "{refusal}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn unpinning_applies_to_the_next_handshake() -> TestResult {
    within(async {
        let (a, b) = pair()?;
        let server = serve_one(&b.endpoint);
        assert_eq!(exchange(&a.endpoint, b.addr, b.id).await?, b"reply:hello");
        server.await??;

        b.pinned.replace([]);
        let refusal = expect_refusal(&b.endpoint);
        assert!(exchange(&a.endpoint, b.addr, b.id).await.is_err());
        refusal.await??;
        Ok(())
    })
    .await
}

/// A client presenting B's certificate but signing with C's key is refused by A,
/// although B is pinned.
#[tokio::test(flavor = "multi_thread")]
async fn stolen_certificate_is_refused_by_the_server() -> TestResult {
    within(async {
        let (a, b, c) = (
            identity("node-a")?,
            identity("node-b")?,
            identity("node-c")?,
        );
        let a = start(&a, &[peer_id_of(&b.cert)])?;
        let refusal = expect_refusal(&a.endpoint);

        let impostor = Endpoint::client(LOCALHOST)?;
        let attempt = async {
            let connection = impostor
                .connect_with(impostor_client(&b, &c)?, a.addr, "twinfs")?
                .await?;
            ask(&connection).await
        }
        .await;
        assert!(attempt.is_err(), "the impostor got through: {attempt:?}");

        let refusal = refusal.await??;
        assert!(refusal.to_string().contains("BadSignature"), "{refusal}");
        Ok(())
    })
    .await
}

/// A server presenting B's certificate but signing with C's key is refused by A,
/// although A dials B's ID.
#[tokio::test(flavor = "multi_thread")]
async fn stolen_certificate_is_refused_by_the_client() -> TestResult {
    within(async {
        let (a, b, c) = (
            identity("node-a")?,
            identity("node-b")?,
            identity("node-c")?,
        );
        let b_id = peer_id_of(&b.cert);
        let a = start(&a, &[b_id])?;
        let impostor = Endpoint::server(impostor_server(&b, &c)?, LOCALHOST)?;
        let impostor_addr = impostor.local_addr()?;
        let impostor_side = tokio::spawn(async move {
            let incoming = impostor.accept().await.ok_or("impostor endpoint closed")?;
            let result: Result<Connection, ConnectionError> = incoming.accept()?.await;
            TestResult::Ok(result.is_err())
        });

        let attempt = connect(&a.endpoint, impostor_addr, b_id).await;
        match attempt {
            Err(TransportError::Handshake { addr, source }) => {
                assert_eq!(addr, impostor_addr);
                assert!(source.to_string().contains("BadSignature"), "{source}");
            }
            other => panic!("expected a handshake failure, got {other:?}"),
        }
        assert!(impostor_side.await??, "the impostor's handshake succeeded");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn pinned_but_unexpected_peer_is_refused() -> TestResult {
    within(async {
        let (a, b, c) = (
            identity("node-a")?,
            identity("node-b")?,
            identity("node-c")?,
        );
        let (a_id, b_id, c_id) = (
            peer_id_of(&a.cert),
            peer_id_of(&b.cert),
            peer_id_of(&c.cert),
        );
        let a = start(&a, &[b_id, c_id])?;
        let c = start(&c, &[a_id])?;
        let c_side = tokio::spawn({
            let endpoint = c.endpoint.clone();
            async move {
                let (connection, _) = accept(&endpoint).await.ok_or("endpoint closed")??;
                TestResult::Ok(connection.closed().await)
            }
        });

        match connect(&a.endpoint, c.addr, b_id).await {
            Err(error @ TransportError::UnexpectedPeer { .. }) => {
                let message = error.to_string();
                assert!(message.contains(&c.addr.to_string()), "{message}");
                assert!(
                    message.contains(&hex(&b_id)) && message.contains(&hex(&c_id)),
                    "{message}"
                );
            }
            other => panic!("expected UnexpectedPeer, got {other:?}"),
        }
        assert!(matches!(
            c_side.await??,
            ConnectionError::ApplicationClosed(_)
        ));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_frame_closes_only_that_connection() -> TestResult {
    within(async {
        let (a, b) = pair()?;
        let big = vec![0; 1 << 20];
        let server = tokio::spawn({
            let endpoint = b.endpoint.clone();
            async move {
                let (connection, _) = accept(&endpoint).await.ok_or("endpoint closed")??;
                let (_send, mut recv) = connection.accept_bi().await?;
                let refused = read_frame(&mut recv, MAX_FRAME).await;
                connection.close(VarInt::from_u32(2), b"frame too large");
                TestResult::Ok(refused)
            }
        });

        let (connection, _) = connect(&a.endpoint, b.addr, b.id).await?;
        let (mut send, _recv) = connection.open_bi().await?;
        // B may close the connection before all of the frame is sent; either way is fine.
        let _ = write_frame(&mut send, &big).await;
        match server.await?? {
            Err(TransportError::FrameTooLarge { len, max }) => {
                assert_eq!((len, max), (big.len(), MAX_FRAME));
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert!(matches!(
            connection.closed().await,
            ConnectionError::ApplicationClosed(_)
        ));

        let server = serve_one(&b.endpoint);
        assert_eq!(exchange(&a.endpoint, b.addr, b.id).await?, b"reply:hello");
        server.await??;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_a_stream_is_an_error() -> TestResult {
    within(async {
        let (a, b) = pair()?;
        let mut garbage: Vec<Vec<u8>> = vec![
            vec![1, 2, 3],
            vec![0, 0, 0, 10, 1, 2],
            [[0xff; 4].as_slice(), b"junk"].concat(),
        ];
        // Deterministic pseudo-random buffers, all of which announce more than they hold
        // or more than the limit.
        let mut state = 0x9e37_79b9_u32;
        for len in 1..20 {
            garbage.push(
                (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 17;
                        state ^= state << 5;
                        state.to_be_bytes()[0] | 0x80
                    })
                    .collect(),
            );
        }
        let count = garbage.len();

        let server = tokio::spawn({
            let endpoint = b.endpoint.clone();
            async move {
                let (connection, _) = accept(&endpoint).await.ok_or("endpoint closed")??;
                let mut results = Vec::new();
                for _ in 0..count {
                    let mut recv = connection.accept_uni().await?;
                    results.push(read_frame(&mut recv, MAX_FRAME).await);
                }
                TestResult::Ok(results)
            }
        });

        let (connection, _) = connect(&a.endpoint, b.addr, b.id).await?;
        for bytes in &garbage {
            let mut send = connection.open_uni().await?;
            send.write_all(bytes).await?;
            send.finish()?;
        }
        let results = server.await??;
        connection.close(VarInt::from_u32(0), b"done");

        assert!(matches!(
            results[0],
            Err(TransportError::TruncatedHeader { got: 3 })
        ));
        assert!(matches!(
            results[1],
            Err(TransportError::TruncatedFrame { len: 10, got: 2 })
        ));
        assert!(matches!(
            results[2],
            Err(TransportError::FrameTooLarge { .. })
        ));
        for (bytes, result) in garbage.iter().zip(&results) {
            assert!(result.is_err(), "{bytes:?} decoded as {result:?}");
        }
        Ok(())
    })
    .await
}

/// A rustls client config presenting `cert_of`'s certificate but signing with `key_of`'s
/// key, which rustls would refuse to build through `with_client_auth_cert`.
fn impostor_client(cert_of: &TlsIdentity, key_of: &TlsIdentity) -> TestResult<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_cert_resolver(mismatched_key(cert_of, key_of)?);
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls)?,
    )))
}

/// The server-side counterpart of [`impostor_client`].
fn impostor_server(cert_of: &TlsIdentity, key_of: &TlsIdentity) -> TestResult<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(mismatched_key(cert_of, key_of)?);
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(tls)?,
    )))
}

fn mismatched_key(
    cert_of: &TlsIdentity,
    key_of: &TlsIdentity,
) -> TestResult<Arc<SingleCertAndKey>> {
    let key = rustls::crypto::ring::sign::any_supported_type(&key_of.key)?;
    Ok(Arc::new(SingleCertAndKey::from(CertifiedKey::new(
        vec![cert_of.cert.clone()],
        key,
    ))))
}

/// The impostor's own verifier: it accepts anyone, since only A's checks are under test.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn hex(id: &PeerId) -> String {
    id.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// How many handshakes `stalled_handshakes_do_not_keep_a_peer_out` leaves hanging.
const STALLED: usize = 4;

/// Anyone can send a first flight with the right ALPN (a client's certificate is only
/// checked in its second flight) and never finish: pending handshakes must not keep a
/// pinned peer out, and each is given up after a while.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_handshakes_do_not_keep_a_peer_out() -> TestResult {
    let (a, b) = pair()?;
    let mut listener = Listener::new(b.endpoint.clone());
    let mut stalled = Vec::new();
    let mut listener = within(async {
        for _ in 0..STALLED {
            let socket = stall_handshake(b.addr, LOCALHOST.ip())
                .await?
                .ok_or("a stalled handshake was refused")?;
            stalled.push(socket);
        }
        let server = tokio::spawn(async move {
            let (connection, peer) = listener.accept().await.ok_or("endpoint closed")??;
            assert_eq!(answer(&connection).await?, [b"hello"]);
            connection.closed().await;
            TestResult::Ok((listener, peer))
        });
        assert_eq!(exchange(&a.endpoint, b.addr, b.id).await?, b"reply:hello");
        let (listener, peer) = server.await??;
        assert_eq!(peer, a.id);
        Ok(listener)
    })
    .await?;
    // Each stalled handshake is given up (and its slot freed) in the end.
    tokio::time::timeout(2 * TEST_TIMEOUT, async {
        for _ in 0..STALLED {
            let failed = listener.accept().await.ok_or("endpoint closed")?;
            assert!(
                matches!(failed, Err(TransportError::HandshakeTimeout { .. })),
                "{failed:?}"
            );
        }
        TestResult::Ok(())
    })
    .await??;
    Ok(())
}

/// Handshakes from one address beyond the limit are refused, and those from another
/// address still get in.
#[tokio::test(flavor = "multi_thread")]
async fn handshakes_past_the_limit_of_an_address_are_refused() -> TestResult {
    let (a, b) = pair()?;
    let listener = Listener::new(b.endpoint.clone());
    // Another address of the loopback network.
    let elsewhere = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
    within(async {
        let mut stalled = Vec::new();
        let mut refused = 0;
        for _ in 0..MAX_HANDSHAKES_PER_IP + 4 {
            match stall_handshake(b.addr, elsewhere).await? {
                Some(socket) => stalled.push(socket),
                None => refused += 1,
            }
        }
        assert_eq!((stalled.len(), refused), (MAX_HANDSHAKES_PER_IP, 4));
        a_peer_gets_in(listener, &a, &b).await
    })
    .await
}

/// A host with a few addresses that takes every handshake slot (8 from each of 8
/// addresses) keeps strangers out, but not a configured peer.
#[tokio::test(flavor = "multi_thread")]
async fn handshakes_filling_every_slot_do_not_keep_a_peer_out() -> TestResult {
    let (a, b) = pair()?;
    let listener = Listener::with_peers(b.endpoint.clone(), vec![LOCALHOST.ip()]);
    within(async {
        let mut stalled = Vec::new();
        for host in 2..10 {
            let from = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, host));
            for _ in 0..MAX_HANDSHAKES_PER_IP {
                let socket = stall_handshake(b.addr, from)
                    .await?
                    .ok_or("a handshake within the limits was refused")?;
                stalled.push(socket);
            }
        }
        let stranger = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 10));
        assert!(
            stall_handshake(b.addr, stranger).await?.is_none(),
            "every slot is taken: a stranger is refused"
        );
        a_peer_gets_in(listener, &a, &b).await
    })
    .await
}

/// `a` connects to `b` (whose incoming connections `listener` takes) and is answered.
async fn a_peer_gets_in(mut listener: Listener, a: &Node, b: &Node) -> TestResult {
    let server = tokio::spawn(async move {
        let (connection, _) = listener.accept().await.ok_or("endpoint closed")??;
        answer(&connection).await?;
        connection.closed().await;
        TestResult::Ok(())
    });
    assert_eq!(exchange(&a.endpoint, b.addr, b.id).await?, b"reply:hello");
    server.await??;
    Ok(())
}

/// Starts a handshake with `server` from an address of `from` and stops halfway, as an
/// attacker would: it answers a Retry (proving its address), waits for the server's
/// first flight and never sends its own second one. Returns its socket (the handshake
/// stays pending while it is open), or `None` if the server refused the connection.
async fn stall_handshake(
    server: SocketAddr,
    from: std::net::IpAddr,
) -> TestResult<Option<tokio::net::UdpSocket>> {
    use quinn_proto::{DatagramEvent, EndpointConfig, Event};

    let socket = tokio::net::UdpSocket::bind((from, 0)).await?;
    let mut endpoint =
        quinn_proto::Endpoint::new(Arc::new(EndpointConfig::default()), None, false, None);
    let (_, mut connection) = endpoint.connect(
        std::time::Instant::now(),
        any_server_client()?,
        server,
        "twinfs",
    )?;
    let mut buf = Vec::new();
    let mut datagram = vec![0; 65536];
    loop {
        let now = std::time::Instant::now();
        while let Some(transmit) = connection.poll_transmit(now, 1, &mut buf) {
            socket
                .send_to(&buf[..transmit.size], transmit.destination)
                .await?;
            buf.clear();
        }
        let (len, addr) = socket.recv_from(&mut datagram).await?;
        let data = bytes::BytesMut::from(&datagram[..len]);
        if let Some(DatagramEvent::ConnectionEvent(_, event)) =
            endpoint.handle(now, addr, None, None, data, &mut buf)
        {
            connection.handle_event(event);
        }
        buf.clear();
        while let Some(event) = connection.poll() {
            match event {
                Event::HandshakeDataReady => return Ok(Some(socket)),
                Event::ConnectionLost { .. } => return Ok(None),
                _ => {}
            }
        }
    }
}

/// A client that offers twinfs's ALPN, accepts any server and has no certificate of its
/// own (it never gets as far as sending one).
fn any_server_client() -> TestResult<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls)?,
    )))
}
