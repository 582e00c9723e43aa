//! Direct links on loopback: two members reach each other and exchange
//! messages with answers; every way of not being the peer asked for, or not
//! being admitted, is refused in the handshake.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use quicproquo_core::limits::PAYLOAD_BYTES_MAX;
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId};
use quicproquo_p2p::{ALPN, Ack, Admit, DirectMessage, Endpoint, Link, P2pError, identity_of};
use rand_core::OsRng;

fn key() -> SigningKey {
    SigningKey::generate(&mut OsRng)
}

fn id(key: &SigningKey) -> IdentityKey {
    IdentityKey(key.verifying_key().to_bytes())
}

fn admitting(keys: &[&SigningKey]) -> Admit {
    let set: HashSet<IdentityKey> = keys.iter().map(|k| id(k)).collect();
    Arc::new(move |peer| set.contains(peer))
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn message(n: u8) -> DirectMessage {
    DirectMessage {
        channel: ChannelId::try_from_slice(&[7; 16]).unwrap(),
        message_id: MessageId([n; 16]),
        after_seq: u64::from(n) * 1_000_000_007,
        payload: vec![n; 100 + usize::from(n)],
    }
}

/// Answers everything `endpoint` receives with `ack`, handing the
/// messages to `out`.
fn serve(
    endpoint: Arc<Endpoint>,
    ack: Ack,
    out: tokio::sync::mpsc::UnboundedSender<(IdentityKey, DirectMessage)>,
) {
    tokio::spawn(async move {
        while let Some(link) = endpoint.accept().await {
            let out = out.clone();
            tokio::spawn(async move {
                while let Ok(received) = link.receive().await {
                    let _ = out.send((link.peer(), received.message.clone()));
                    let _ = received.answer(ack).await;
                }
            });
        }
    });
}

#[tokio::test]
async fn two_members_exchange_messages_directly_with_answers() {
    let (alice, bob) = (key(), key());
    let a = Arc::new(Endpoint::bind(loopback(), &alice, admitting(&[&bob])).unwrap());
    let b = Arc::new(Endpoint::bind(loopback(), &bob, admitting(&[&alice])).unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    serve(b.clone(), Ack::Taken, tx);

    let link: Link = a.connect(b.local_addr().unwrap(), id(&bob)).await.unwrap();
    assert_eq!(link.peer(), id(&bob));
    for n in 0..20 {
        assert_eq!(link.send(&message(n)).await.unwrap(), Ack::Taken);
        let (from, got) = rx.recv().await.unwrap();
        assert_eq!(
            from,
            id(&alice),
            "the receiver knows the sender from the handshake"
        );
        assert_eq!(got, message(n));
    }
    // A largest payload goes too.
    let mut big = message(1);
    big.payload = vec![9; PAYLOAD_BYTES_MAX];
    assert_eq!(link.send(&big).await.unwrap(), Ack::Taken);
    assert_eq!(rx.recv().await.unwrap().1.payload.len(), PAYLOAD_BYTES_MAX);
}

#[tokio::test]
async fn a_refusal_comes_back_as_refused() {
    let (alice, bob) = (key(), key());
    let a = Endpoint::bind(loopback(), &alice, admitting(&[&bob])).unwrap();
    let b = Arc::new(Endpoint::bind(loopback(), &bob, admitting(&[&alice])).unwrap());
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    serve(b.clone(), Ack::Refused, tx);
    let link = a.connect(b.local_addr().unwrap(), id(&bob)).await.unwrap();
    assert_eq!(link.send(&message(1)).await.unwrap(), Ack::Refused);
}

#[tokio::test]
async fn an_oversized_or_empty_payload_is_not_sent() {
    let (alice, bob) = (key(), key());
    let a = Endpoint::bind(loopback(), &alice, admitting(&[&bob])).unwrap();
    let b = Arc::new(Endpoint::bind(loopback(), &bob, admitting(&[&alice])).unwrap());
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    serve(b.clone(), Ack::Taken, tx);
    let link = a.connect(b.local_addr().unwrap(), id(&bob)).await.unwrap();
    for len in [0, PAYLOAD_BYTES_MAX + 1] {
        let mut m = message(1);
        m.payload = vec![1; len];
        assert!(
            matches!(link.send(&m).await, Err(P2pError::Frame(_))),
            "{len}"
        );
    }
}

#[tokio::test]
async fn a_non_member_cannot_connect() {
    let (alice, bob, mallory) = (key(), key(), key());
    // Bob admits only Alice.
    let b = Arc::new(Endpoint::bind(loopback(), &bob, admitting(&[&alice])).unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    serve(b.clone(), Ack::Taken, tx);
    // Mallory would talk to Bob: her side admits him, his refuses her.
    let m = Endpoint::bind(loopback(), &mallory, admitting(&[&bob])).unwrap();
    let r = m.connect(b.local_addr().unwrap(), id(&bob)).await;
    // The handshake may complete on Mallory's side before Bob's refusal
    // arrives; then the first message fails.
    if let Ok(link) = r {
        assert!(link.send(&message(1)).await.is_err());
    }
    assert!(
        rx.try_recv().is_err(),
        "nothing from a non-member reached Bob"
    );
}

#[tokio::test]
async fn an_endpoint_with_another_identity_than_asked_is_refused() {
    let (alice, bob, mallory) = (key(), key(), key());
    // Mallory answers at the address Alice thinks is Bob's.
    let m = Arc::new(Endpoint::bind(loopback(), &mallory, admitting(&[&alice])).unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    serve(m.clone(), Ack::Taken, tx);
    let a = Endpoint::bind(loopback(), &alice, admitting(&[&bob])).unwrap();
    let r = a.connect(m.local_addr().unwrap(), id(&bob)).await;
    assert!(matches!(r, Err(P2pError::Connect(_))), "{r:?}");
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn no_connection_is_made_to_a_peer_not_admitted() {
    let (alice, bob) = (key(), key());
    let a = Endpoint::bind(loopback(), &alice, admitting(&[])).unwrap();
    let b = Endpoint::bind(loopback(), &bob, admitting(&[&alice])).unwrap();
    let r = a.connect(b.local_addr().unwrap(), id(&bob)).await;
    assert!(matches!(r, Err(P2pError::NotAdmitted(_))), "{r:?}");
}

/// A client with a certificate of its own making, the ALPN of its
/// choice, and no check of the answering end.
async fn raw_client(
    to: SocketAddr,
    alpn: &[u8],
    cert: Option<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<quinn::Connection, String> {
    #[derive(Debug)]
    struct AnyServer;
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut crypto = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(crypto)).unwrap();
    let endpoint = quinn::Endpoint::client(loopback()).unwrap();
    let conn = endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), to, "qpq-peer")
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    // A refused client certificate may only show once the server speaks.
    match conn.open_bi().await {
        Ok((mut s, mut r)) => {
            s.write_all(&message(1).encode())
                .await
                .map_err(|e| e.to_string())?;
            let _ = s.finish();
            let mut b = [0u8; 1];
            r.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            Ok(conn)
        }
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn no_certificate_another_alpn_or_a_non_ed25519_key_is_refused() {
    let (alice, bob) = (key(), key());
    let b = Arc::new(Endpoint::bind(loopback(), &bob, admitting(&[&alice])).unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    serve(b.clone(), Ack::Taken, tx);
    let to = b.local_addr().unwrap();

    // No client certificate.
    assert!(raw_client(to, ALPN, None).await.is_err());
    // The server's ALPN.
    let ecdsa = rcgen::generate_simple_self_signed(vec!["qpq-peer".into()]).unwrap();
    let ecdsa_chain = vec![ecdsa.cert.der().clone()];
    let ecdsa_key =
        rustls::pki_types::PrivateKeyDer::Pkcs8(ecdsa.signing_key.serialize_der().into());
    assert!(identity_of(&ecdsa_chain[0]).is_none());
    assert!(
        raw_client(
            to,
            b"qpq/1",
            Some((ecdsa_chain.clone(), ecdsa_key.clone_key()))
        )
        .await
        .is_err()
    );
    // A certificate whose key is not an Ed25519 identity.
    assert!(
        raw_client(to, ALPN, Some((ecdsa_chain, ecdsa_key)))
            .await
            .is_err()
    );
    assert!(rx.try_recv().is_err(), "nothing reached Bob");
}

#[tokio::test]
async fn an_endpoint_keeps_at_most_its_limit_of_connections_open() {
    use quicproquo_core::limits::DIRECT_CONNECTIONS_MAX;
    let (alice, bob) = (key(), key());
    let b = Arc::new(Endpoint::bind(loopback(), &bob, admitting(&[&alice])).unwrap());
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    serve(b.clone(), Ack::Taken, tx);
    let a = Endpoint::bind(loopback(), &alice, admitting(&[&bob])).unwrap();
    let mut links = Vec::new();
    for _ in 0..DIRECT_CONNECTIONS_MAX {
        links.push(a.connect(b.local_addr().unwrap(), id(&bob)).await.unwrap());
    }
    let more = a.connect(b.local_addr().unwrap(), id(&bob)).await;
    assert!(matches!(more, Err(P2pError::Connect(_))), "{more:?}");
    // One closed makes room again.
    links.pop().unwrap().close();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(a.connect(b.local_addr().unwrap(), id(&bob)).await.is_ok());
}
