//! The TLS webhook listener over a real socket on 127.0.0.1: certificates from a test CA, ALPN,
//! TLS versions, body limits and bad bodies, certificate reload through a Secret-volume style
//! `..data` symlink swap, and graceful drain.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore, SupportedProtocolVersion};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use pod_template_webhook::admission::Policy;
use pod_template_webhook::names::Names;
use pod_template_webhook::server::{serve_tls, webhook_router, AppState, Limits};
use pod_template_webhook::store::dir::DirStore;
use pod_template_webhook::store::{Lookup, Snapshot, StoreStats, TemplateEntry, TemplateStore};
use pod_template_webhook::tls::{self, CertResolver};

/// Every test body runs under this bound.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

fn crate_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn flyte_review() -> Vec<u8> {
    std::fs::read(crate_path("examples/reviews/flyte-task-pod.json")).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Test PKI

struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: CertificateDer<'static>,
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { der: cert.der().clone(), issuer: rcgen::Issuer::new(params, key) }
    }

    /// A leaf for `localhost` and `127.0.0.1`, signed by this CA.
    fn leaf(&self, common_name: &str) -> Leaf {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() }
    }
}

fn resolver_for(leaf: &Leaf) -> Arc<CertResolver> {
    let loaded =
        tls::load_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes(), Path::new("cert.pem"), Path::new("key.pem"))
            .expect("the generated pair loads");
    CertResolver::new(loaded.key)
}

// ---------------------------------------------------------------------------------------------
// Server

struct Server {
    addr: SocketAddr,
    metrics: Arc<pod_template_webhook::metrics::Metrics>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<()>,
}

fn example_templates() -> DirStore {
    DirStore::load(&crate_path("examples/templates"), &Names::default()).expect("example templates load")
}

async fn start_server(resolver: Arc<CertResolver>, limits: Limits) -> Server {
    start_server_with(resolver, limits, Arc::new(example_templates())).await
}

async fn start_server_with(resolver: Arc<CertResolver>, limits: Limits, store: Arc<dyn TemplateStore>) -> Server {
    let state = AppState::new(store, Policy::default());
    let app = webhook_router(state.clone(), &limits);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(tls::server_config(resolver));
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(serve_tls(listener, acceptor, app, limits, state.metrics.clone(), async move {
        let _ = rx.await;
    }));
    Server { addr, metrics: state.metrics.clone(), shutdown: Some(tx), handle }
}

// ---------------------------------------------------------------------------------------------
// Client

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(
    ca: &CertificateDer<'static>,
    alpn: &[&[u8]],
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

const ALL_VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    server_name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

fn presented_leaf(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    let (_, conn) = tls.get_ref();
    conn.peer_certificates().expect("the server presented a certificate")[0].clone().into_owned()
}

fn alpn(tls: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Proto {
    H1,
    H2,
}

/// A request sender over one TLS connection, HTTP/1.1 or HTTP/2; the connection is driven by a
/// spawned task.
enum Sender<B> {
    H1(hyper::client::conn::http1::SendRequest<B>),
    H2(hyper::client::conn::http2::SendRequest<B>),
}

async fn handshake<B>(tls: TlsStream<TcpStream>, proto: Proto) -> Sender<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = TokioIo::new(tls);
    match proto {
        Proto::H1 => {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.expect("HTTP/1.1 handshake");
            tokio::spawn(conn);
            Sender::H1(send)
        }
        Proto::H2 => {
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("HTTP/2 handshake");
            tokio::spawn(conn);
            Sender::H2(send)
        }
    }
}

fn mutate_request<B>(body: B) -> Request<B> {
    Request::post("https://localhost/mutate")
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap()
}

impl<B> Sender<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Waits until the connection can take another request (HTTP/1.1 finishes the previous one).
    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    fn send(
        &mut self,
        req: Request<B>,
    ) -> impl std::future::Future<Output = hyper::Result<Response<Incoming>>> + Send + 'static {
        let fut: std::pin::Pin<Box<dyn std::future::Future<Output = hyper::Result<Response<Incoming>>> + Send>> =
            match self {
                Sender::H1(s) => {
                    // HTTP/1.1 uses the origin form of the target.
                    let mut req = req;
                    let path = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
                    *req.uri_mut() = path.parse().unwrap();
                    Box::pin(s.send_request(req))
                }
                Sender::H2(s) => Box::pin(s.send_request(req)),
            };
        fut
    }
}

async fn read_response(resp: Response<Incoming>) -> (StatusCode, Bytes) {
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("response body within 10 s")
        .expect("response body")
        .to_bytes();
    (status, body)
}

/// POSTs `body` to /mutate on a fresh connection with `proto` (ALPN asserted), returns status and body.
async fn post_once(addr: SocketAddr, ca: &CertificateDer<'static>, proto: Proto, body: Vec<u8>) -> (StatusCode, Bytes) {
    let offer: &[u8] = if proto == Proto::H2 { b"h2" } else { b"http/1.1" };
    let tls = connect(addr, client_config(ca, &[offer], ALL_VERSIONS), "localhost").await.expect("TLS handshake");
    assert_eq!(alpn(&tls).as_deref(), Some(offer));
    let mut sender = handshake::<Full<Bytes>>(tls, proto).await;
    let resp = sender.send(mutate_request(Full::new(Bytes::from(body)))).await.expect("a response");
    read_response(resp).await
}

/// Asserts `body` is the AdmissionReview answer to flyte-task-pod.json: uid echoed, allowed, and
/// a JSON patch that adds hello=world to the primary container.
fn assert_flyte_mutated(body: &[u8]) {
    let review: Value = serde_json::from_slice(&flyte_review()).unwrap();
    let answer: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", String::from_utf8_lossy(body)));
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{answer}");
    assert_eq!(answer["kind"], "AdmissionReview", "{answer}");
    let resp = &answer["response"];
    assert_eq!(resp["uid"], review["request"]["uid"], "uid echoed: {answer}");
    assert_eq!(resp["allowed"], true, "{answer}");
    assert_eq!(resp["patchType"], "JSONPatch", "{answer}");
    let patch_bytes = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(resp["patch"].as_str().expect("patch is base64"))
            .expect("base64")
    };
    let patch: json_patch::Patch = serde_json::from_slice(&patch_bytes).expect("patch is a JSON Patch");
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).expect("patch applies to the request object");
    let env = pod["spec"]["containers"][0]["env"].as_array().expect("primary container has env");
    assert!(
        env.iter().any(|e| e["name"] == "hello" && e["value"] == "world"),
        "hello=world env added to the primary container: {env:?}"
    );
}

fn listener_limits(max_body_bytes: usize) -> Limits {
    Limits { max_body_bytes, ..Limits::default() }
}

macro_rules! bounded {
    ($body:expr) => {
        tokio::time::timeout(TEST_TIMEOUT, $body).await.expect("test exceeded its time bound")
    };
}

// ---------------------------------------------------------------------------------------------
// 1. ALPN h2 and http/1.1, CA-signed certificate, /mutate works over both

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutate_over_h2_and_http1_with_a_ca_signed_certificate() {
    bounded!(async {
        let ca = TestCa::new("test CA");
        let leaf = ca.leaf("webhook");
        let mut server = start_server(resolver_for(&leaf), Limits::default()).await;

        for (proto, offer, name) in [(Proto::H2, &b"h2"[..], "127.0.0.1"), (Proto::H1, &b"http/1.1"[..], "localhost")] {
            let tls = connect(server.addr, client_config(&ca.der, &[offer], ALL_VERSIONS), name)
                .await
                .unwrap_or_else(|e| panic!("{proto:?}: handshake with a client trusting only the test CA: {e}"));
            assert_eq!(alpn(&tls).as_deref(), Some(offer), "{proto:?}: negotiated ALPN");
            assert_eq!(presented_leaf(&tls), leaf.der, "{proto:?}: the server presents the configured leaf");
            assert_eq!(tls.get_ref().1.peer_certificates().unwrap().len(), 1);
            let mut sender = handshake::<Full<Bytes>>(tls, proto).await;
            // Two requests on the same connection: keep-alive / multiplexing works.
            for _ in 0..2 {
                sender
                    .ready()
                    .await
                    .unwrap_or_else(|e| panic!("{proto:?}: connection kept open for another request: {e}"));
                let resp = sender.send(mutate_request(Full::new(Bytes::from(flyte_review())))).await.expect("response");
                assert_eq!(resp.headers().get("content-type").unwrap(), "application/json", "{proto:?}");
                let (status, body) = read_response(resp).await;
                assert_eq!(status, StatusCode::OK, "{proto:?}: {}", String::from_utf8_lossy(&body));
                assert_flyte_mutated(&body);
            }
        }

        // A client offering both gets h2 (the server prefers it); one offering neither gets no ALPN
        // but still a working HTTP/1.1 connection.
        let tls = connect(server.addr, client_config(&ca.der, &[b"http/1.1", b"h2"], ALL_VERSIONS), "localhost")
            .await
            .unwrap();
        assert_eq!(alpn(&tls).as_deref(), Some(&b"h2"[..]));
        let tls = connect(server.addr, client_config(&ca.der, &[], ALL_VERSIONS), "localhost").await.unwrap();
        assert_eq!(alpn(&tls), None);
        let mut sender = handshake::<Full<Bytes>>(tls, Proto::H1).await;
        let (status, body) =
            read_response(sender.send(mutate_request(Full::new(Bytes::from(flyte_review())))).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert_flyte_mutated(&body);

        // A client trusting another CA refuses the server.
        let other = TestCa::new("other CA");
        let err = connect(server.addr, client_config(&other.der, &[b"h2"], ALL_VERSIONS), "localhost").await;
        assert!(err.is_err(), "a client trusting a different CA must fail the handshake");

        server.shutdown.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server.handle)
            .await
            .expect("serve_tls returns after shutdown")
            .unwrap();
    })
}

// ---------------------------------------------------------------------------------------------
// 2. TLS versions

/// A client that does not trust the certificate (an API server whose caBundle does not match)
/// fails the handshake: the server counts it (`tls_handshake_failures_total`) and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusting_client_is_a_counted_handshake_failure() {
    bounded!(async {
        let (ca, other) = (TestCa::new("test CA"), TestCa::new("another CA"));
        let server = start_server(resolver_for(&ca.leaf("webhook")), Limits::default()).await;
        assert_eq!(server.metrics.tls_handshake_failures(), 0);
        let refused = connect(server.addr, client_config(&other.der, &[b"http/1.1"], ALL_VERSIONS), "localhost").await;
        assert!(refused.is_err(), "a client of another CA must not complete the handshake");
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.metrics.tls_handshake_failures() != 1 {
            assert!(Instant::now() < deadline, "the failed handshake was not counted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (status, body) = post_once(server.addr, &ca.der, Proto::H1, flyte_review()).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert_eq!(server.metrics.tls_handshake_failures(), 1, "a good handshake is not counted");
        assert!(server.metrics.render(0, 0, 0).contains("pod_template_webhook_tls_handshake_failures_total 1"));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_only_and_tls13_only_clients_both_work() {
    bounded!(async {
        let ca = TestCa::new("test CA");
        let leaf = ca.leaf("webhook");
        let server = start_server(resolver_for(&leaf), Limits::default()).await;

        for (version, expect) in
            [(&rustls::version::TLS12, ProtocolVersion::TLSv1_2), (&rustls::version::TLS13, ProtocolVersion::TLSv1_3)]
        {
            let tls = connect(server.addr, client_config(&ca.der, &[b"h2"], &[version]), "localhost")
                .await
                .unwrap_or_else(|e| panic!("{expect:?}-only client: {e}"));
            assert_eq!(tls.get_ref().1.protocol_version(), Some(expect));
            assert_eq!(alpn(&tls).as_deref(), Some(&b"h2"[..]), "{expect:?}");
            assert_eq!(presented_leaf(&tls), leaf.der);
            let mut sender = handshake::<Full<Bytes>>(tls, Proto::H2).await;
            let (status, body) =
                read_response(sender.send(mutate_request(Full::new(Bytes::from(flyte_review())))).await.unwrap()).await;
            assert_eq!(status, StatusCode::OK, "{expect:?}");
            assert_flyte_mutated(&body);
        }
        // A client offering both gets TLS 1.3.
        let tls = connect(server.addr, client_config(&ca.der, &[b"h2"], ALL_VERSIONS), "localhost").await.unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        drop(server);
    })
}

// ---------------------------------------------------------------------------------------------
// 3. Body limit and malformed bodies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_bodies_are_4xx_and_the_server_keeps_serving() {
    bounded!(async {
        const LIMIT: usize = 64 * 1024;
        let ca = TestCa::new("test CA");
        let leaf = ca.leaf("webhook");
        let server = start_server(resolver_for(&leaf), listener_limits(LIMIT)).await;

        // The example review itself is below the limit, so the limit is what decides.
        assert!(flyte_review().len() < LIMIT);
        // A syntactically valid AdmissionReview padded past the limit.
        let mut big: Value = serde_json::from_slice(&flyte_review()).unwrap();
        big["request"]["object"]["metadata"]["annotations"]["padding"] = Value::String("x".repeat(LIMIT + 1024));
        let big = serde_json::to_vec(&big).unwrap();
        assert!(big.len() > LIMIT);

        for proto in [Proto::H1, Proto::H2] {
            let (status, body) = post_once(server.addr, &ca.der, proto, big.clone()).await;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{proto:?}: {}", String::from_utf8_lossy(&body));

            let (status, body) = post_once(
                server.addr,
                &ca.der,
                proto,
                b"{\"apiVersion\": \"admission.k8s.io/v1\", \"kind\": ".to_vec(),
            )
            .await;
            let text = String::from_utf8_lossy(&body);
            assert_eq!(status, StatusCode::BAD_REQUEST, "{proto:?}: {text}");
            assert!(text.contains("AdmissionReview"), "{proto:?}: message names what was expected: {text}");

            let (status, body) = post_once(server.addr, &ca.der, proto, b"not json at all".to_vec()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{proto:?}: {}", String::from_utf8_lossy(&body));
            assert!(String::from_utf8_lossy(&body).contains("AdmissionReview"));

            let (status, body) = post_once(
                server.addr,
                &ca.der,
                proto,
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            )
            .await;
            let text = String::from_utf8_lossy(&body);
            assert_eq!(status, StatusCode::BAD_REQUEST, "{proto:?}: review without request: {text}");
            assert!(text.contains("request"), "{proto:?}: {text}");

            // A valid review still works on a new connection.
            let (status, body) = post_once(server.addr, &ca.der, proto, flyte_review()).await;
            assert_eq!(status, StatusCode::OK, "{proto:?}: {}", String::from_utf8_lossy(&body));
            assert_flyte_mutated(&body);
        }

        // Exactly at the limit is accepted by the size check (then rejected as bad JSON, 400, not 413).
        let mut at_limit = b"{".to_vec();
        at_limit.resize(LIMIT, b' ');
        let (status, _) = post_once(server.addr, &ca.der, Proto::H1, at_limit).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "a body of exactly max_body_bytes is not too large");
        drop(server);
    })
}

// ---------------------------------------------------------------------------------------------
// 3b. A panic in the handler

/// The example templates in a store whose next snapshot panics once armed: a real panic in the
/// admission path, with no product code for injecting it.
struct PanicOnce {
    templates: DirStore,
    armed: std::sync::atomic::AtomicBool,
}

impl TemplateStore for PanicOnce {
    fn lookup(&self, namespace: &str, name: &str) -> Lookup {
        self.templates.lookup(namespace, name)
    }
    fn lookup_shadow(&self, namespace: &str, name: &str) -> Option<Arc<TemplateEntry>> {
        self.templates.lookup_shadow(namespace, name)
    }
    fn snapshot(&self) -> Snapshot<'_> {
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("injected: the store failed");
        }
        self.templates.snapshot()
    }
    fn is_ready(&self) -> bool {
        true
    }
    fn stats(&self) -> StoreStats {
        self.templates.stats()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_handler_is_a_500_and_the_connection_and_the_server_keep_serving() {
    bounded!(async {
        let ca = TestCa::new("test CA");
        let leaf = ca.leaf("webhook");
        let store = Arc::new(PanicOnce { templates: example_templates(), armed: true.into() });
        let server = start_server_with(resolver_for(&leaf), Limits::default(), store.clone()).await;
        let uid =
            serde_json::from_slice::<Value>(&flyte_review()).unwrap()["request"]["uid"].as_str().unwrap().to_owned();

        for proto in [Proto::H1, Proto::H2] {
            let offer: &[u8] = if proto == Proto::H2 { b"h2" } else { b"http/1.1" };
            let tls = connect(server.addr, client_config(&ca.der, &[offer], ALL_VERSIONS), "localhost").await.unwrap();
            let mut sender = handshake::<Full<Bytes>>(tls, proto).await;
            store.armed.store(true, Ordering::SeqCst);
            let resp = sender.send(mutate_request(Full::new(Bytes::from(flyte_review())))).await.expect("an answer");
            let (status, body) = read_response(resp).await;
            let text = String::from_utf8_lossy(&body);
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{proto:?}: {text}");
            assert!(text.contains("internal error of the webhook") && text.contains(&uid), "{proto:?}: {text}");
            // The same connection answers the next request.
            sender.ready().await.expect("the connection survived the panic");
            let resp = sender.send(mutate_request(Full::new(Bytes::from(flyte_review())))).await.expect("an answer");
            let (status, body) = read_response(resp).await;
            assert_eq!(status, StatusCode::OK, "{proto:?}: {}", String::from_utf8_lossy(&body));
            assert_flyte_mutated(&body);
        }
        assert_eq!(server.metrics.handler_panics(), 2);
        assert_eq!((server.metrics.admissions("error"), server.metrics.admissions("mutated")), (2, 2));
        // And a new connection.
        let (status, body) = post_once(server.addr, &ca.der, Proto::H1, flyte_review()).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    })
}

// ---------------------------------------------------------------------------------------------
// 4. Certificate reload through a Secret-volume `..data` symlink swap

/// A directory laid out like a Kubernetes Secret volume: `cert.pem` and `key.pem` are symlinks
/// into `..data`, itself a symlink to a timestamped directory.
struct SecretVolume {
    dir: tempfile::TempDir,
    generation: usize,
}

impl SecretVolume {
    fn new(cert_pem: &[u8], key_pem: &[u8]) -> SecretVolume {
        let dir = tempfile::tempdir().unwrap();
        let mut volume = SecretVolume { dir, generation: 0 };
        volume.publish(cert_pem, key_pem);
        std::os::unix::fs::symlink("..data/cert.pem", volume.cert()).unwrap();
        std::os::unix::fs::symlink("..data/key.pem", volume.key()).unwrap();
        volume
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// Writes a new generation directory and atomically points `..data` at it (as the kubelet does).
    fn publish(&mut self, cert_pem: &[u8], key_pem: &[u8]) {
        self.generation += 1;
        let gen_name = format!("..2026_01_01_00_00_0{}.{}", self.generation, 1000 + self.generation);
        let gen_dir = self.dir.path().join(&gen_name);
        std::fs::create_dir(&gen_dir).unwrap();
        std::fs::write(gen_dir.join("cert.pem"), cert_pem).unwrap();
        std::fs::write(gen_dir.join("key.pem"), key_pem).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&gen_name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }
}

async fn handshake_leaf(addr: SocketAddr, ca: &CertificateDer<'static>) -> CertificateDer<'static> {
    let tls = connect(addr, client_config(ca, &[b"h2"], ALL_VERSIONS), "localhost").await.expect("handshake");
    presented_leaf(&tls)
}

/// Polls new handshakes until the presented leaf is `want`, for at most `bound`.
async fn wait_for_leaf(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    want: &CertificateDer<'static>,
    bound: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        if &handshake_leaf(addr, ca).await == want {
            return started.elapsed();
        }
        assert!(started.elapsed() < bound, "the new certificate was not served within {bound:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reloads_on_a_secret_volume_symlink_swap_and_keeps_the_last_good_pair() {
    bounded!(async {
        let ca = TestCa::new("test CA");
        let (first, second, third, fourth) = (ca.leaf("first"), ca.leaf("second"), ca.leaf("third"), ca.leaf("fourth"));
        let mut volume = SecretVolume::new(first.cert_pem.as_bytes(), first.key_pem.as_bytes());

        let (loaded, bytes) =
            tls::load_files(&volume.cert(), &volume.key()).expect("initial pair loads through the symlinks");
        let resolver = CertResolver::new(loaded.key);
        let (reloads, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (counter, failures_seen) = (reloads.clone(), failures.clone());
        let watcher = tokio::spawn(tls::watch_files(
            volume.cert(),
            volume.key(),
            bytes,
            resolver.clone(),
            Duration::from_millis(100),
            move |event| match event {
                tls::CertEvent::Loaded(c) => {
                    assert!(c.not_after > 0, "a reloaded certificate has a known expiry");
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                tls::CertEvent::Failed { source } => {
                    assert_eq!(source, "files");
                    failures_seen.fetch_add(1, Ordering::SeqCst);
                }
            },
        ));
        let server = start_server(resolver, Limits::default()).await;

        assert_eq!(handshake_leaf(server.addr, &ca.der).await, first.der);
        // Unchanged files are not "reloaded".
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(reloads.load(Ordering::SeqCst), 0, "no reload without a change");

        // Swap to the second pair.
        volume.publish(second.cert_pem.as_bytes(), second.key_pem.as_bytes());
        let took = wait_for_leaf(server.addr, &ca.der, &second.der, Duration::from_secs(5)).await;
        eprintln!("second certificate served after {took:?}");
        assert_eq!(reloads.load(Ordering::SeqCst), 1);
        // Requests still work with the new certificate.
        let (status, body) = post_once(server.addr, &ca.der, Proto::H2, flyte_review()).await;
        assert_eq!(status, StatusCode::OK);
        assert_flyte_mutated(&body);

        // Swap to broken pairs: a garbage key, then a valid key that does not match the certificate.
        let broken: [(&str, &[u8], &[u8]); 3] = [
            (
                "garbage key",
                third.cert_pem.as_bytes(),
                b"-----BEGIN PRIVATE KEY-----\nnot base64 !!\n-----END PRIVATE KEY-----\n",
            ),
            ("no PEM at all", b"garbage", b"garbage"),
            ("mismatched key", third.cert_pem.as_bytes(), fourth.key_pem.as_bytes()),
        ];
        for (what, cert, key) in broken {
            let failed_before = failures.load(Ordering::SeqCst);
            volume.publish(cert, key);
            // Ten polling periods: every handshake meanwhile still gets the last good pair.
            let until = Instant::now() + Duration::from_millis(1000);
            let mut handshakes = 0;
            while Instant::now() < until {
                assert_eq!(
                    handshake_leaf(server.addr, &ca.der).await,
                    second.der,
                    "{what}: the last good pair keeps serving"
                );
                handshakes += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(handshakes >= 3, "{what}: only {handshakes} handshakes in 1 s");
            assert_eq!(reloads.load(Ordering::SeqCst), 1, "{what}: a broken pair is not a reload");
            assert!(failures.load(Ordering::SeqCst) >= failed_before + 5, "{what}: each failed check is counted");
        }

        // The watcher survived the broken files: a good pair is picked up again.
        volume.publish(third.cert_pem.as_bytes(), third.key_pem.as_bytes());
        wait_for_leaf(server.addr, &ca.der, &third.der, Duration::from_secs(5)).await;
        assert_eq!(reloads.load(Ordering::SeqCst), 2);
        assert!(!watcher.is_finished(), "watch_files keeps running");
        watcher.abort();
        drop(server);
    })
}

// ---------------------------------------------------------------------------------------------
// 5. Graceful shutdown

type ChunkSender = futures::channel::mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;
/// A request sent, its response still to come.
type PendingResponse = JoinHandle<hyper::Result<Response<Incoming>>>;
type ChunkBody = StreamBody<futures::channel::mpsc::UnboundedReceiver<Result<Frame<Bytes>, Infallible>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_then_returns() {
    bounded!(async {
        let ca = TestCa::new("test CA");
        let leaf = ca.leaf("webhook");
        let drain_timeout = Duration::from_secs(20);
        let mut server = start_server(resolver_for(&leaf), Limits { drain_timeout, ..Limits::default() }).await;
        let review = flyte_review();
        let half = review.len() / 2;

        // Before shutdown: a few complete requests (a keep-alive connection that will be idle at
        // shutdown, which must not hold the drain up).
        let idle_tls =
            connect(server.addr, client_config(&ca.der, &[b"http/1.1"], ALL_VERSIONS), "localhost").await.unwrap();
        let mut idle = handshake::<Full<Bytes>>(idle_tls, Proto::H1).await;
        let (status, _) =
            read_response(idle.send(mutate_request(Full::new(Bytes::from(review.clone())))).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        let idle_h2_tls =
            connect(server.addr, client_config(&ca.der, &[b"h2"], ALL_VERSIONS), "localhost").await.unwrap();
        let mut idle_h2 = handshake::<Full<Bytes>>(idle_h2_tls, Proto::H2).await;
        let (status, _) =
            read_response(idle_h2.send(mutate_request(Full::new(Bytes::from(review.clone())))).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);

        // In flight at shutdown: requests whose bodies are streamed slowly, on HTTP/1.1 and HTTP/2
        // connections (three streams share one HTTP/2 connection).
        let mut in_flight: Vec<(Proto, ChunkSender, PendingResponse)> = Vec::new();
        let mut h2_shared: Option<Sender<ChunkBody>> = None;
        for proto in [Proto::H1, Proto::H1, Proto::H2, Proto::H2, Proto::H2] {
            let mut sender = if proto == Proto::H2 && h2_shared.is_some() {
                h2_shared.take().unwrap()
            } else {
                let offer: &[u8] = if proto == Proto::H2 { b"h2" } else { b"http/1.1" };
                let tls =
                    connect(server.addr, client_config(&ca.der, &[offer], ALL_VERSIONS), "localhost").await.unwrap();
                handshake::<ChunkBody>(tls, proto).await
            };
            sender.ready().await.unwrap();
            let (tx, rx) = futures::channel::mpsc::unbounded();
            tx.unbounded_send(Ok(Frame::data(Bytes::copy_from_slice(&review[..half / 2])))).unwrap();
            let resp = tokio::spawn(sender.send(mutate_request(StreamBody::new(rx))));
            if proto == Proto::H2 {
                h2_shared = Some(sender);
            }
            in_flight.push((proto, tx, resp));
        }
        // Let the server read the headers and the first chunks.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (_, tx, _) in &in_flight {
            tx.unbounded_send(Ok(Frame::data(Bytes::copy_from_slice(&review[half / 2..half])))).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (proto, _, resp) in &in_flight {
            assert!(!resp.is_finished(), "{proto:?}: the request must still be in flight (its body is incomplete)");
        }

        // Shutdown starts while every request is half-sent.
        let shutdown_at = Instant::now();
        server.shutdown.take().unwrap().send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!server.handle.is_finished(), "serve_tls must wait for the in-flight requests");
        // No new connections once shutdown has begun.
        let refused = tokio::time::timeout(Duration::from_secs(5), async {
            match connect(server.addr, client_config(&ca.der, &[b"h2"], ALL_VERSIONS), "localhost").await {
                Err(_) => true,
                Ok(tls) => {
                    // Accepted by a lingering socket: it must not serve requests.
                    let mut s = handshake::<Full<Bytes>>(tls, Proto::H2).await;
                    s.send(mutate_request(Full::new(Bytes::from(review.clone())))).await.is_err()
                }
            }
        })
        .await
        .unwrap_or(true);
        assert!(refused, "a new connection after shutdown must not be served");

        // The bodies finish, slowly.
        for chunk in review[half..].chunks(review[half..].len() / 3 + 1) {
            for (_, tx, _) in &in_flight {
                tx.unbounded_send(Ok(Frame::data(Bytes::copy_from_slice(chunk)))).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut completed = 0;
        for (proto, tx, resp) in in_flight {
            drop(tx); // end of body
            let resp = tokio::time::timeout(Duration::from_secs(10), resp)
                .await
                .unwrap_or_else(|_| panic!("{proto:?}: in-flight request got no answer"))
                .unwrap()
                .unwrap_or_else(|e| panic!("{proto:?}: in-flight request failed during drain: {e}"));
            let (status, body) = read_response(resp).await;
            assert_eq!(status, StatusCode::OK, "{proto:?}: {}", String::from_utf8_lossy(&body));
            assert_flyte_mutated(&body);
            completed += 1;
        }
        assert_eq!(completed, 5);

        // serve_tls returns once they are done, well before the drain timeout (idle keep-alive
        // connections must not hold it up).
        tokio::time::timeout(Duration::from_secs(8), &mut server.handle)
            .await
            .expect("serve_tls returns soon after the in-flight requests completed")
            .unwrap();
        let took = shutdown_at.elapsed();
        eprintln!("serve_tls returned {took:?} after shutdown began");
        assert!(took < drain_timeout, "returned by draining, not by hitting the drain timeout ({took:?})");
        drop((idle, idle_h2));
    })
}

/// `serve_tls` with nothing in flight returns promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_without_requests_returns_promptly() {
    bounded!(async {
        let ca = TestCa::new("test CA");
        let leaf = ca.leaf("webhook");
        let mut server = start_server(resolver_for(&leaf), Limits::default()).await;
        assert_eq!(handshake_leaf(server.addr, &ca.der).await, leaf.der);
        let started = Instant::now();
        server.shutdown.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), &mut server.handle).await.expect("serve_tls returns").unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(TcpStream::connect(server.addr).await.is_err(), "the listener is closed");
    })
}

/// Opens an HTTP/1.1 connection (ALPN http/1.1) to `addr`.
async fn h1_connection(addr: SocketAddr, ca: &CertificateDer<'static>) -> Sender<Full<Bytes>> {
    let tls = connect(addr, client_config(ca, &[b"http/1.1"], ALL_VERSIONS), "localhost").await.expect("TLS handshake");
    handshake::<Full<Bytes>>(tls, Proto::H1).await
}

fn says_connection_close(resp: &Response<Incoming>) -> bool {
    resp.headers().get(hyper::header::CONNECTION).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
}

/// The API server talks HTTP/1.1 to webhooks (it turns HTTP/2 off for them) and keeps its
/// keep-alive connections to a replica through the Service while that replica shuts down. Closing
/// an idle one races with the POST the client may be writing on it at that moment, which then fails
/// with `EOF` (no retry for a POST on a reused connection): a failed pod creation. So: idle
/// keep-alive connections outlive the header read timeout; a request arriving on an open
/// connection during the drain is answered, with `Connection: close`, and only then is that
/// connection closed; a connection quiet for `DRAIN_IDLE_CLOSE` is closed by the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_http1_answers_requests_on_open_connections_with_connection_close() {
    bounded!(async {
        let ca = TestCa::new("test CA");
        let leaf = ca.leaf("webhook");
        let header_read_timeout = Duration::from_millis(300);
        let mut server = start_server(resolver_for(&leaf), Limits { header_read_timeout, ..Limits::default() }).await;
        let review = || Full::new(Bytes::from(flyte_review()));
        let mut busy = h1_connection(server.addr, &ca.der).await;
        let mut quiet = h1_connection(server.addr, &ca.der).await;
        for conn in [&mut busy, &mut quiet] {
            let resp = conn.send(mutate_request(review())).await.expect("a response");
            assert!(!says_connection_close(&resp), "keep-alive while serving");
            let (status, body) = read_response(resp).await;
            assert_eq!(status, StatusCode::OK);
            assert_flyte_mutated(&body);
        }

        // Idle keep-alive connections are not closed by the header read timeout: the client
        // decides when an idle connection ends.
        tokio::time::sleep(header_read_timeout * 4).await;
        busy.ready().await.expect("the idle keep-alive connection is still open");
        let (status, _) =
            read_response(busy.send(mutate_request(review())).await.expect("a response on the idle connection")).await;
        assert_eq!(status, StatusCode::OK);

        // Shutdown starts; 200 ms later a request arrives on an open connection.
        let shutdown_at = Instant::now();
        server.shutdown.take().unwrap().send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!server.handle.is_finished(), "serve_tls is still draining");
        busy.ready().await.expect("an open connection is not closed at once when the drain starts");
        let resp = busy.send(mutate_request(review())).await.expect("a request arriving during the drain is answered");
        assert!(
            says_connection_close(&resp),
            "the answer tells the client not to reuse the connection: {:?}",
            resp.headers()
        );
        let (status, body) = read_response(resp).await;
        assert_eq!(status, StatusCode::OK);
        assert_flyte_mutated(&body);
        // Then the server closes it (the client already knows).
        assert!(
            tokio::time::timeout(Duration::from_secs(2), busy.ready()).await.expect("closed soon after").is_err(),
            "the connection is closed after its Connection: close answer"
        );

        // The quiet connection is closed by the server once idle for DRAIN_IDLE_CLOSE, and then the
        // drain is over.
        tokio::time::timeout(
            pod_template_webhook::server::DRAIN_IDLE_CLOSE + Duration::from_secs(3),
            &mut server.handle,
        )
        .await
        .expect("serve_tls returns once the quiet connection is closed")
        .unwrap();
        let took = shutdown_at.elapsed();
        eprintln!("drain over {took:?} after shutdown began");
        assert!(quiet.ready().await.is_err(), "the quiet connection was closed");
    })
}

/// Reads one HTTP/2 frame: (type, flags, stream id, payload), or None at EOF.
async fn read_h2_frame<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Option<(u8, u8, u32, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.ok()?;
    let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some((head[3], head[4], stream_id, payload))
}

fn h2_frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

/// On HTTP/2 the drain sends GOAWAY before the server closes the connection, read off the wire: a
/// client learns which streams were taken and retries the others elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_http2_sends_goaway_before_closing() {
    bounded!(async {
        use tokio::io::AsyncWriteExt;
        const SETTINGS: u8 = 0x4;
        const PING: u8 = 0x6;
        const GOAWAY: u8 = 0x7;
        const ACK: u8 = 0x1;
        let ca = TestCa::new("test CA");
        let leaf = ca.leaf("webhook");
        let mut server = start_server(resolver_for(&leaf), Limits::default()).await;
        let mut tls = connect(server.addr, client_config(&ca.der, &[b"h2"], ALL_VERSIONS), "localhost").await.unwrap();
        assert_eq!(alpn(&tls).as_deref(), Some(&b"h2"[..]));
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        tls.write_all(&h2_frame(SETTINGS, 0, &[])).await.unwrap();
        tls.flush().await.unwrap();
        // The server's SETTINGS first, acknowledged.
        let (kind, flags, _, _) = read_h2_frame(&mut tls).await.expect("server SETTINGS");
        assert_eq!((kind, flags & ACK), (SETTINGS, 0));
        tls.write_all(&h2_frame(SETTINGS, ACK, &[])).await.unwrap();
        tls.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;

        server.shutdown.take().unwrap().send(()).unwrap();
        let mut goaways = Vec::new();
        let eof = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some((kind, flags, _, payload)) = read_h2_frame(&mut tls).await {
                match kind {
                    GOAWAY => {
                        let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
                        let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                        goaways.push((last, code));
                    }
                    PING if flags & ACK == 0 => {
                        tls.write_all(&h2_frame(PING, ACK, &payload)).await.unwrap();
                        tls.flush().await.unwrap();
                    }
                    _ => {}
                }
            }
        })
        .await;
        assert!(eof.is_ok(), "the server closes the connection after GOAWAY");
        eprintln!("GOAWAY frames (last stream id, error code): {goaways:?}");
        assert!(!goaways.is_empty(), "GOAWAY reached the client before the close");
        assert!(goaways.iter().all(|&(_, code)| code == 0), "NO_ERROR: a graceful GOAWAY");
        tokio::time::timeout(Duration::from_secs(5), &mut server.handle).await.expect("serve_tls returns").unwrap();
    })
}

/// Two replicas behind a "Service" (the test's clients), clients sending one request after another
/// on keep-alive HTTP/1.1 connections like the API server, and one replica shutting down in the
/// middle: not one request fails. A client only opens a new connection when the old one was
/// closed before it sent anything (as Go's transport does); a request written on a connection
/// that then fails counts as a failed admission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_when_a_replica_drains_under_load() {
    bounded!(async {
        use std::sync::atomic::AtomicBool;
        let ca = TestCa::new("test CA");
        let leaf = ca.leaf("webhook");
        let mut old = start_server(resolver_for(&leaf), Limits::default()).await;
        let new = start_server(resolver_for(&leaf), Limits::default()).await;
        let (old_addr, new_addr) = (old.addr, new.addr);
        let old_gone = Arc::new(AtomicBool::new(false));
        let (ok, failed, closes) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut workers = Vec::new();
        for worker in 0..6usize {
            let (ca, old_gone, ok, failed, closes) =
                (ca.der.clone(), old_gone.clone(), ok.clone(), failed.clone(), closes.clone());
            workers.push(tokio::spawn(async move {
                let body = flyte_review();
                let mut conn: Option<Sender<Full<Bytes>>> = None;
                let mut errors = Vec::new();
                while Instant::now() < deadline {
                    if let Some(c) = conn.as_mut() {
                        if c.ready().await.is_err() {
                            conn = None; // closed while idle, before anything was written: reconnect
                        }
                    }
                    if conn.is_none() {
                        // The Service: both replicas while the old one is an endpoint (alternating
                        // by worker), then only the new one.
                        let to_old = !old_gone.load(Ordering::Acquire) && worker % 2 == 0;
                        let addr = if to_old { old_addr } else { new_addr };
                        match connect(addr, client_config(&ca, &[b"http/1.1"], ALL_VERSIONS), "localhost").await {
                            Ok(tls) => conn = Some(handshake::<Full<Bytes>>(tls, Proto::H1).await),
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                continue;
                            }
                        }
                    }
                    let c = conn.as_mut().unwrap();
                    match c.send(mutate_request(Full::new(Bytes::from(body.clone())))).await {
                        Ok(resp) => {
                            let close = says_connection_close(&resp);
                            let (status, answer) = read_response(resp).await;
                            if status == StatusCode::OK {
                                assert_flyte_mutated(&answer);
                                ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.push(format!("status {status}"));
                            }
                            if close {
                                closes.fetch_add(1, Ordering::Relaxed);
                                conn = None;
                            }
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.push(e.to_string());
                            conn = None;
                        }
                    }
                }
                errors
            }));
        }
        // Endpoint removed (no new connections routed to it), then SIGTERM, like a deleted pod
        // after its preStop sleep; established connections keep being used.
        tokio::time::sleep(Duration::from_secs(1)).await;
        old_gone.store(true, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = ok.load(Ordering::Relaxed);
        old.shutdown.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(3), &mut old.handle)
            .await
            .expect("the old replica's drain ends")
            .unwrap();
        let mut errors = Vec::new();
        for w in workers {
            errors.extend(w.await.unwrap());
        }
        let (ok, failed, closes) =
            (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed), closes.load(Ordering::Relaxed));
        eprintln!("{ok} requests answered ({before} before the shutdown), {failed} failed, {closes} Connection: close answers");
        assert_eq!(failed, 0, "failed requests: {errors:?}");
        assert!(closes >= 1, "the draining replica told its clients to move with Connection: close");
        assert!(ok > before, "requests went on after the shutdown");
        drop(new);
    })
}

// ---------------------------------------------------------------------------------------------
// Slow clients: the handshake and the request headers are time-bounded.

/// Reads until EOF or error; returns how long that took, or None if the connection stayed open
/// for `bound`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(mut stream: S, bound: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let result = tokio::time::timeout(bound, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    result.ok().map(|()| started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_clients_are_disconnected_after_the_header_read_timeout() {
    bounded!(async {
        use tokio::io::AsyncWriteExt;
        let ca = TestCa::new("test CA");
        let leaf = ca.leaf("webhook");
        let timeout = Duration::from_millis(500);
        let server =
            start_server(resolver_for(&leaf), Limits { header_read_timeout: timeout, ..Limits::default() }).await;

        // A TCP connection that never starts the TLS handshake.
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let took = closed_within(tcp, Duration::from_secs(5)).await.expect("a silent TCP client is disconnected");
        assert!(took >= timeout.mul_f32(0.8), "not before the timeout: {took:?}");

        // A TLS client that sends half a request head and stalls (slowloris).
        let mut tls =
            connect(server.addr, client_config(&ca.der, &[b"http/1.1"], ALL_VERSIONS), "localhost").await.unwrap();
        tls.write_all(b"POST /mutate HTTP/1.1\r\nHost: localhost\r\n").await.unwrap();
        tls.flush().await.unwrap();
        let took = closed_within(tls, Duration::from_secs(5))
            .await
            .expect("a client stalling in its request head is disconnected");
        assert!(took >= timeout.mul_f32(0.8), "not before the timeout: {took:?}");

        // Meanwhile and afterwards, normal clients are served.
        let (status, body) = post_once(server.addr, &ca.der, Proto::H1, flyte_review()).await;
        assert_eq!(status, StatusCode::OK);
        assert_flyte_mutated(&body);
        drop(server);
    })
}

/// A body without Content-Length (HTTP/1.1 chunked, HTTP/2 DATA frames) is capped too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_bodies_without_content_length_are_capped() {
    bounded!(async {
        const LIMIT: usize = 64 * 1024;
        let ca = TestCa::new("test CA");
        let leaf = ca.leaf("webhook");
        let server = start_server(resolver_for(&leaf), listener_limits(LIMIT)).await;
        for proto in [Proto::H1, Proto::H2] {
            let offer: &[u8] = if proto == Proto::H2 { b"h2" } else { b"http/1.1" };
            let tls = connect(server.addr, client_config(&ca.der, &[offer], ALL_VERSIONS), "localhost").await.unwrap();
            let mut sender = handshake::<ChunkBody>(tls, proto).await;
            let (tx, rx) = futures::channel::mpsc::unbounded();
            // 2 x LIMIT in 8 KiB chunks, all queued up front; no Content-Length header.
            for _ in 0..(2 * LIMIT / 8192) {
                tx.unbounded_send(Ok(Frame::data(Bytes::from(vec![b' '; 8192])))).unwrap();
            }
            drop(tx);
            let req = mutate_request(StreamBody::new(rx));
            assert!(req.headers().get(hyper::header::CONTENT_LENGTH).is_none());
            match tokio::time::timeout(Duration::from_secs(10), sender.send(req)).await.expect("an answer within 10 s")
            {
                Ok(resp) => {
                    let (status, body) = read_response(resp).await;
                    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{proto:?}: {}", String::from_utf8_lossy(&body));
                }
                // The server may also reset the upload once over the cap; it must not accept it.
                Err(e) => eprintln!("{proto:?}: upload cut off: {e}"),
            }
        }
        let (status, _) = post_once(server.addr, &ca.der, Proto::H2, flyte_review()).await;
        assert_eq!(status, StatusCode::OK);
        drop(server);
    })
}
