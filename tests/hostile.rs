//! Hostile input against the real TLS server: each class gets its status or a closed
//! connection, and the server still answers a valid review afterwards.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use pod_template_webhook::admission::Policy;
use pod_template_webhook::names::Names;
use pod_template_webhook::server::{serve_tls, webhook_router, AppState, Limits};
use pod_template_webhook::store::dir::DirStore;
use pod_template_webhook::tls;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SAMPLE: &[u8] = include_bytes!("../examples/reviews/flyte-task-pod.json");

struct Server {
    port: u16,
    ca_pem: String,
}

async fn start(limits: Limits) -> Server {
    let pki = support::TestPki::new("hostile-ca");
    let leaf = pki.server();
    let cert = tls::load_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes(), "c".as_ref(), "k".as_ref()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(tls::CertResolver::new(cert.key)));
    let store =
        DirStore::load(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/templates").as_ref(), &Names::default()).unwrap();
    let state = AppState::new(Arc::new(store), Policy::default());
    let app = webhook_router(state.clone(), &limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(serve_tls(listener, acceptor, app, limits, state.metrics.clone(), std::future::pending()));
    Server { port, ca_pem: pki.ca_pem }
}

impl Server {
    async fn tls(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap()).unwrap();
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .unwrap()
    }

    /// POSTs `body` to /mutate over a fresh HTTP/1.1 connection.
    async fn post<B>(&self, body: B) -> (StatusCode, String)
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(self.tls().await)).await.unwrap();
        tokio::spawn(conn);
        let req = Request::post("/mutate").header("content-type", "application/json").body(body).unwrap();
        match send.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                let bytes = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                (status, String::from_utf8_lossy(&bytes).into_owned())
            }
            Err(e) => (StatusCode::from_u16(599).unwrap(), e.to_string()),
        }
    }

    async fn still_answers(&self) {
        let (status, body) = self.post(Full::new(Bytes::from_static(SAMPLE))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("\"allowed\":true"), "{body}");
    }
}

#[tokio::test]
async fn tls_garbage_closes_the_connection_and_leaves_the_server_alone() {
    // The server's own bound (header read timeout) is far below the client's patience: a close
    // seen within it is the server's doing.
    let header_read_timeout = Duration::from_secs(1);
    let server = start(Limits { header_read_timeout, ..Limits::default() }).await;
    for garbage in
        [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0][..], &[0u8; 4096][..]]
    {
        let mut tcp = TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
        let _ = tcp.write_all(garbage).await;
        let mut buf = vec![0u8; 1024];
        let started = std::time::Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue, // a TLS alert, then the close
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the server must close a connection that speaks no TLS");
        let took = started.elapsed();
        assert!(took < header_read_timeout + Duration::from_secs(2), "closed by the server, not by waiting: {took:?}");
    }
    server.still_answers().await;
}

#[tokio::test]
async fn bad_json_of_every_kind_is_a_4xx_never_a_panic() {
    let server = start(Limits::default()).await;
    let deeply_nested = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
    let mut not_utf8 = SAMPLE.to_vec();
    not_utf8[40] = 0xff;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("deeply nested", deeply_nested.into_bytes()),
        ("not UTF-8", not_utf8),
        ("truncated", SAMPLE[..SAMPLE.len() / 2].to_vec()),
        ("empty", Vec::new()),
        (
            "wrong shape",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":[]}}"#.to_vec(),
        ),
        ("huge number", format!("{{\"request\": {}}}", "9".repeat(100_000)).into_bytes()),
    ];
    for (what, body) in cases {
        let (status, text) = server.post(Full::new(Bytes::from(body))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {text}");
        assert!(text.contains("AdmissionReview"), "{what}: {text}");
    }
    server.still_answers().await;
}

/// The sample review with `value` set at `spec.extra` of its pod (the pod otherwise as sent).
fn sample_with_extra(value: &str) -> Vec<u8> {
    let text = std::str::from_utf8(SAMPLE).unwrap();
    let spec = "\"spec\": {";
    let at = text.find(spec).expect("the sample pod has a spec");
    format!("{}{spec}\"extra\": {value}, {}", &text[..at], &text[at + spec.len()..]).into_bytes()
}

/// serde_json skips the review's object unparsed, so its own depth limit never applied there;
/// the webhook checks the whole body (README: nested deeper than 128 levels → 400), and the
/// other values serde_json only skips but could not read (a number beyond f64, a lone surrogate).
#[tokio::test]
async fn a_pod_nested_5000_levels_deep_is_a_400_not_a_mutation() {
    let server = start(Limits::default()).await;
    let deep = |n: usize| format!("{}1{}", "{\"a\":[".repeat(n / 2), "]}".repeat(n / 2));
    let (status, text) = server.post(Full::new(Bytes::from(sample_with_extra(&deep(5000))))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("nested deeper than 128 levels"), "{text}");
    for (value, needle) in [("1e400", "number out of range"), ("\"\\ud800\"", "lone surrogate")] {
        let (status, text) = server.post(Full::new(Bytes::from(sample_with_extra(value)))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{value}: {text}");
        assert!(text.contains(needle), "{value}: {text}");
    }
    // Within the limit, the same pod is mutated as usual.
    let (status, text) = server.post(Full::new(Bytes::from(sample_with_extra(&deep(100))))).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.contains("\"patch\""), "{text}");
    server.still_answers().await;
}

/// `serve` as its own process (the binary, TLS from files, the example templates), so that its
/// memory is its own; killed on drop.
struct Process {
    child: std::process::Child,
    port: u16,
    ca_pem: String,
    _dir: tempfile::TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    async fn start() -> Process {
        let pki = support::TestPki::new("hostile-process-ca");
        let leaf = pki.server();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert, &leaf.cert_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        let (port, admin) = (support::free_port(), support::free_port());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_pod-template-webhook"))
            .arg("serve")
            .args(["--templates", concat!(env!("CARGO_MANIFEST_DIR"), "/examples/templates")])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--admin-listen", &format!("127.0.0.1:{admin}")])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            // As the chart and the image run it.
            .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let process = Process { child, port, ca_pem: pki.ca_pem, _dir: dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "serve did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        process
    }

    /// Peak resident memory of the server process so far (VmHWM), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap();
        line.trim().trim_end_matches(" kB").parse().unwrap()
    }
}

/// Sends `mib` MiB of spaces to `/mutate` while reading the answer (the server may answer before
/// the body is done): chunked without a Content-Length, or with one. Returns the status line.
async fn stream_and_read_status(server: &Server, mib: usize, chunked: bool) -> String {
    let tls = server.tls().await;
    let (mut rx, mut tx) = tokio::io::split(tls);
    let writer = async move {
        let framing =
            if chunked { "Transfer-Encoding: chunked".to_owned() } else { format!("Content-Length: {}", mib << 20) };
        let head = format!("POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n");
        tx.write_all(head.as_bytes()).await?;
        let chunk = match chunked {
            true => [format!("{:x}\r\n", 1 << 20).into_bytes(), vec![b' '; 1 << 20], b"\r\n".to_vec()].concat(),
            false => vec![b' '; 1 << 20],
        };
        for _ in 0..mib {
            tx.write_all(&chunk).await?;
        }
        if chunked {
            tx.write_all(b"0\r\n\r\n").await?;
        }
        // Keep the write half open until the answer is read.
        std::future::pending::<std::io::Result<()>>().await
    };
    let reader = async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(2).any(|w| w == b"\r\n") {
            let n = rx.read(&mut buf).await.expect("the answer is read before the connection ends");
            assert!(n > 0, "the connection closed without an answer");
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).lines().next().unwrap_or_default().to_owned()
    };
    tokio::pin!(reader);
    tokio::select! {
        status = &mut reader => status,
        // The server stops reading once it answered and closes: the write fails, and the answer
        // that came before the close is still there to read.
        Err(_) = writer => reader.await,
    }
}

#[tokio::test]
async fn a_100_mb_body_is_refused_with_413_and_memory_stays_bounded() {
    let process = Process::start().await;
    let server = Server { port: process.port, ca_pem: process.ca_pem.clone() };
    server.still_answers().await;
    let before = process.peak_rss_kib();
    // Streamed, without Content-Length: the cap must hold while reading, not just on the header.
    let bounded = |future| async { tokio::time::timeout(Duration::from_secs(60), future).await.unwrap() };
    let status = bounded(stream_and_read_status(&server, 100, true)).await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    let grown_mib = process.peak_rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 16, "the server's peak RSS grew by {grown_mib} MiB for a 100 MB body (cap 3 MiB)");
    // With a Content-Length over the cap, the refusal comes without reading the body.
    let status = bounded(stream_and_read_status(&server, 4, false)).await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    server.still_answers().await;
}

#[tokio::test]
async fn a_client_that_trickles_its_body_is_cut_off_by_the_request_timeout() {
    let limits = Limits { request_timeout: Duration::from_millis(300), ..Limits::default() };
    let server = start(limits).await;
    let frames = futures::stream::unfold(0, |i| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (i < 50).then(|| (Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b" "))), i + 1))
    });
    let started = std::time::Instant::now();
    let (status, _) = server.post(StreamBody::new(frames)).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(3));
    server.still_answers().await;
}
