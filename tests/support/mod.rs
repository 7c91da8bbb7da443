//! Test fixtures shared by the end-to-end tests: a real etcd + kube-apiserver on loopback, built
//! from their upstream Go modules by `tests/tools/build.sh` (cached outside git), and test
//! certificates made with rcgen.
#![allow(dead_code)]

pub mod flyte;

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A CA and a leaf signed by it, PEM encoded.
pub struct TestPki {
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    ca: CertifiedIssuer<'static, KeyPair>,
}

#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl TestPki {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        TestPki { ca_pem: ca.pem(), ca_der: ca.der().to_vec(), ca }
    }

    /// A serving certificate for 127.0.0.1 and localhost.
    pub fn server(&self) -> Leaf {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate: `CN=user, O=group`.
    pub fn client(&self, user: &str, group: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, user);
        params.distinguished_name.push(DnType::OrganizationName, group);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn tools_bin() -> PathBuf {
    let root = std::env::var_os("PTW_TOOLS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/pod-template-webhook/tools")
    });
    root.join("bin")
}

/// The path of a test tool, built from its Go module on first use (`tests/tools/build.sh`).
pub fn tool(name: &str) -> PathBuf {
    let path = tools_bin().join(name);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/build.sh");
    // build.sh is idempotent and cheap when up to date; serialize concurrent test binaries.
    let lock = std::fs::File::create(std::env::temp_dir().join("ptw-tools-build.lock")).unwrap();
    lock_file(&lock);
    if !path.exists() {
        let started = Instant::now();
        let status = Command::new("bash").arg(&script).arg(name).status().expect("run tests/tools/build.sh");
        assert!(status.success(), "tests/tools/build.sh {name} failed");
        eprintln!("built {name} in {:?}", started.elapsed());
    }
    path
}

fn lock_file(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: flock takes a file descriptor and a flag, and `f` keeps the descriptor open for
    // the whole call; the lock is released when the file is closed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
}

/// Starts `cmd` so that it dies with the thread that started it (PR_SET_PDEATHSIG): a test
/// process that ends, even by a panic or a kill, leaves no etcd or API server behind.
pub fn spawn_tied(cmd: &mut Command, log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: prctl is one, and the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        });
    }
    cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// etcd and kube-apiserver on loopback, with RBAC and the admission webhooks on.
pub struct ApiServer {
    pub url: String,
    pub dir: tempfile::TempDir,
    pub pki: TestPki,
    pub kubeconfig: PathBuf,
    etcd: Child,
    apiserver: Child,
    apiserver_cmd: Command,
    admin: Leaf,
}

impl ApiServer {
    /// Starts both processes; call it from a thread that outlives the tests (see `spawn_tied`).
    pub fn start() -> ApiServer {
        Self::start_with(&[])
    }

    /// [`ApiServer::start`] with `extra` kube-apiserver flags (e.g. `--watch-cache=false`).
    pub fn start_with(extra: &[&str]) -> ApiServer {
        let (etcd_bin, apiserver_bin) = (tool("etcd"), tool("kube-apiserver"));
        let dir = tempfile::Builder::new().prefix("ptw-apiserver-").tempdir().unwrap();
        let d = dir.path();
        let pki = TestPki::new("ptw-test-ca");
        let serving = pki.server();
        let admin = pki.client("ptw-admin", "system:masters");
        let sa_key = KeyPair::generate().unwrap();
        let write = |name: &str, text: &str| {
            let p = d.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca = write("ca.crt", &pki.ca_pem);
        let (cert, key) = (write("apiserver.crt", &serving.cert_pem), write("apiserver.key", &serving.key_pem));
        let sa = write("sa.key", &sa_key.serialize_pem());
        let sa_pub = write("sa.pub", &sa_key.public_key_pem());

        let (client_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let etcd = spawn_tied(
            Command::new(etcd_bin)
                .arg("--name=ptw")
                .arg(format!("--data-dir={}", d.join("etcd").display()))
                .arg(format!("--listen-client-urls={etcd_url}"))
                .arg(format!("--advertise-client-urls={etcd_url}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
                .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"))
                .arg(format!("--initial-cluster=ptw=http://127.0.0.1:{peer_port}"))
                .arg("--unsafe-no-fsync")
                .arg("--log-level=warn"),
            &d.join("etcd.log"),
        );
        let mut apiserver_cmd = Command::new(apiserver_bin);
        apiserver_cmd
                .arg(format!("--etcd-servers={etcd_url}"))
                .arg("--bind-address=127.0.0.1")
                .arg("--advertise-address=127.0.0.1")
                .arg(format!("--secure-port={api_port}"))
                .arg(format!("--cert-dir={}", d.join("certs").display()))
                .arg(format!("--tls-cert-file={}", cert.display()))
                .arg(format!("--tls-private-key-file={}", key.display()))
                .arg(format!("--client-ca-file={}", ca.display()))
                .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
                .arg(format!("--service-account-key-file={}", sa_pub.display()))
                .arg(format!("--service-account-signing-key-file={}", sa.display()))
                .arg("--service-cluster-ip-range=10.0.0.0/24")
                .arg("--authorization-mode=Node,RBAC")
                .arg("--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,MutatingAdmissionWebhook,ValidatingAdmissionWebhook")
                .arg("--endpoint-reconciler-type=none")
                .arg("--profiling=false")
                .arg("--v=1")
                .args(extra);
        let apiserver = spawn_tied(&mut apiserver_cmd, &d.join("kube-apiserver.log"));
        let url = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&url, &pki.ca_pem, &admin.cert_pem, &admin.key_pem)).unwrap();
        let mut server = ApiServer { url, dir, pki, kubeconfig, etcd, apiserver, apiserver_cmd, admin: admin.clone() };
        server.wait_ready(&ca, &admin);
        server.admin = admin;
        server
    }

    fn wait_ready(&mut self, ca: &Path, admin: &Leaf) {
        let started = Instant::now();
        let d = self.dir.path();
        let (cert, key) = (d.join("admin.crt"), d.join("admin.key"));
        std::fs::write(&cert, &admin.cert_pem).unwrap();
        std::fs::write(&key, &admin.key_pem).unwrap();
        loop {
            if let Ok(Some(status)) = self.apiserver.try_wait() {
                panic!("kube-apiserver exited ({status}):\n{}", self.log_tail("kube-apiserver.log"));
            }
            let ok = Command::new("curl")
                .args(["-fsS", "-o", "/dev/null", "--cacert"])
                .arg(ca)
                .arg("--cert")
                .arg(&cert)
                .arg("--key")
                .arg(&key)
                .arg(format!("{}/readyz", self.url))
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                eprintln!("kube-apiserver ready in {:?} at {}", started.elapsed(), self.url);
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "kube-apiserver not ready:\n{}",
                self.log_tail("kube-apiserver.log")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn log_tail(&self, name: &str) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join(name)) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Stops the API server (etcd stays): the "API server went away" case.
    pub fn stop_apiserver(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.apiserver.wait();
    }

    /// Starts the API server again on the same port and etcd.
    pub fn restart_apiserver(&mut self) {
        let log = self.dir.path().join("kube-apiserver-restarted.log");
        self.apiserver = spawn_tied(&mut self.apiserver_cmd, &log);
        let (ca, admin) = (self.dir.path().join("ca.crt"), self.admin.clone());
        self.wait_ready(&ca, &admin);
    }

    /// The process ids of (kube-apiserver, etcd), for CPU accounting.
    pub fn pids(&self) -> (u32, u32) {
        (self.apiserver.id(), self.etcd.id())
    }

    pub async fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config().await).unwrap()
    }

    pub async fn config(&self) -> kube::Config {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.unwrap()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.etcd.kill();
        let _ = self.apiserver.wait();
        let _ = self.etcd.wait();
    }
}

/// Base64 (standard alphabet), as Kubernetes encodes bytes in YAML and JSON.
pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Creates a namespace (if absent) with its `default` ServiceAccount: no controller-manager runs
/// next to the test API server, so nobody else creates it.
pub async fn ensure_namespace(c: &kube::Client, name: &str, labels: serde_json::Value) {
    use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
    use kube::api::{Api, PostParams};
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}})).unwrap();
    let _ = Api::<Namespace>::all(c.clone()).create(&PostParams::default(), &ns).await;
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}})).unwrap();
    let _ = Api::<ServiceAccount>::namespaced(c.clone(), name).create(&PostParams::default(), &sa).await;
}

/// The webhook's TLS endpoint on loopback, with a certificate from `pki`, counting the reviews
/// it receives by the pod's namespace.
pub struct Webhook {
    pub port: u16,
    pub reviews: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl Webhook {
    pub fn reviews_in(&self, namespace: &str) -> usize {
        self.reviews.lock().unwrap().get(namespace).copied().unwrap_or(0)
    }
}

pub async fn serve_webhook(state: std::sync::Arc<pod_template_webhook::server::AppState>, pki: &TestPki) -> Webhook {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use pod_template_webhook::server;
    let reviews: Webhook = Webhook { port: 0, reviews: Default::default() };
    let seen = reviews.reviews.clone();
    let app = server::webhook_router(state, &server::Limits::default()).layer(axum::middleware::from_fn(
        move |req: Request<Body>, next: axum::middleware::Next| {
            let seen = seen.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect().await.unwrap().to_bytes();
                let review: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                let ns = review["request"]["namespace"].as_str().unwrap_or_default().to_owned();
                *seen.lock().unwrap().entry(ns).or_default() += 1;
                next.run(Request::from_parts(parts, Body::from(bytes))).await
            }
        },
    ));
    let port = serve_router(app, pki).await;
    Webhook { port, ..reviews }
}

/// Serves `app` over TLS on loopback with a server certificate from `pki`; returns the port.
pub async fn serve_router(app: axum::Router, pki: &TestPki) -> u16 {
    use pod_template_webhook::{server, tls};
    let leaf = pki.server();
    let cert = tls::load_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes(), "c".as_ref(), "k".as_ref()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(tls::CertResolver::new(cert.key)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let metrics = std::sync::Arc::default();
    tokio::spawn(server::serve_tls(
        listener,
        acceptor,
        app,
        server::Limits::default(),
        metrics,
        std::future::pending(),
    ));
    port
}

/// `helm template ptw charts/pod-template-webhook --namespace NAMESPACE ARGS...` (helm's own
/// directories in a temporary home), parsed into its objects.
pub fn helm_template(namespace: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let home = tempfile::Builder::new().prefix("ptw-helm-home-").tempdir().unwrap();
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/pod-template-webhook");
    let out = Command::new(tool("helm"))
        .args(["template", "ptw"])
        .arg(chart)
        .args(["--namespace", namespace])
        .args(args)
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .env_remove("KUBECONFIG")
        .output()
        .expect("run helm");
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    pod_template_webhook::yaml::documents(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

/// The chart's own MutatingWebhookConfiguration (`helm template` with `sets`), every entry's
/// clientConfig pointed at a webhook on loopback; nothing else changed.
pub fn chart_mutating_webhook(
    port: u16,
    ca_pem: &str,
    sets: &[&str],
) -> k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration {
    let mut args = vec!["--show-only", "templates/mutatingwebhookconfiguration.yaml"];
    for set in sets {
        args.extend(["--set", set]);
    }
    let mut config = helm_template("flyte", &args).pop().expect("the chart renders a MutatingWebhookConfiguration");
    let client = serde_json::json!({"url": format!("https://127.0.0.1:{port}/mutate"), "caBundle": b64(ca_pem)});
    for webhook in config["webhooks"].as_array_mut().expect("webhooks") {
        webhook["clientConfig"] = client.clone();
    }
    serde_json::from_value(config).unwrap()
}

fn kubeconfig_yaml(url: &str, ca: &str, cert: &str, key: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ptw\n  cluster:\n    server: {url}\n    certificate-authority-data: {}\n\
         users:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n\
         contexts:\n- name: ptw\n  context: {{cluster: ptw, user: admin}}\ncurrent-context: ptw\n",
        b64(ca),
        b64(cert),
        b64(key)
    )
}

/// A client of the API server at `url` authenticated by a bearer token only (no client certificate): a
/// ServiceAccount's identity, from the TokenRequest API.
pub async fn token_client(url: &str, ca_pem: &str, token: &str) -> kube::Client {
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ptw\n  cluster:\n    server: {url}\n    certificate-authority-data: {}\n\
         users:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: sa\n  context: {{cluster: ptw, user: sa}}\ncurrent-context: sa\n",
        b64(ca_pem.as_bytes()),
    );
    let kc = kube::config::Kubeconfig::from_yaml(&yaml).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    assert!(config.auth_info.client_certificate_data.is_none());
    kube::Client::try_from(config).unwrap()
}

/// Starts a real API server on a thread of its own, runs `start` there (with a runtime that keeps
/// whatever it spawns alive) and returns what it made. The thread, the API server, etcd and the
/// spawned tasks live until the test process ends; the processes die with it (PDEATHSIG).
pub fn fixture<T: Send + 'static>(
    name: &str,
    start: impl FnOnce(&ApiServer, &tokio::runtime::Runtime) -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let started = Instant::now();
            let api = ApiServer::start();
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            let made = start(&api, &rt);
            eprintln!("[{}] fixture up in {:?}", std::thread::current().name().unwrap_or_default(), started.elapsed());
            tx.send(made).unwrap();
            loop {
                std::thread::park();
            }
        })
        .unwrap();
    rx.recv_timeout(Duration::from_secs(900)).expect("the fixture did not start")
}

/// The mutating webhook configuration the chart installs, pointing at a webhook on loopback.
pub fn mutating_webhook(
    port: u16,
    ca_pem: &str,
) -> k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "pod-template-webhook"},
        "webhooks": [{
            "name": "pod-templates.flyte.org",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/mutate"), "caBundle": b64(ca_pem)},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "objectSelector": {"matchExpressions": [{"key": "flyte.org/environment", "operator": "Exists"}]},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "reinvocationPolicy": "IfNeeded",
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
        }]
    }))
    .unwrap()
}

/// Polls `cond` until it holds; fails naming `what` after `limit`. Returns how long it took.
pub async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// An admin client from a kubeconfig file.
pub async fn kubeconfig_client(path: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
    kube::Client::try_from(config).unwrap()
}

/// A token for ServiceAccount `name` of `namespace` (TokenRequest API), valid for an hour.
pub async fn service_account_token(admin: &kube::Client, namespace: &str, name: &str) -> String {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::api::{Api, PostParams};
    let request: TokenRequest =
        serde_json::from_value(serde_json::json!({"spec": {"audiences": [], "expirationSeconds": 3600}})).unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), namespace)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .and_then(|s| s.token)
        .expect("a token")
}

/// The validating webhook for template sources (`resources`) on loopback, only in namespaces
/// labelled `ptw-validate=true`: other tests store broken templates on purpose.
pub fn validating_webhook(
    port: u16,
    ca_pem: &str,
    resources: &[&str],
) -> k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "pod-template-webhook-validate"},
        "webhooks": [{
            "name": "validate.pod-templates.flyte.org",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/validate"), "caBundle": b64(ca_pem)},
            "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": resources, "scope": "Namespaced"}],
            "objectSelector": {"matchLabels": {"flyte.org/pod-templates": "true"}},
            "namespaceSelector": {"matchLabels": {"ptw-validate": "true"}},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
        }]
    }))
    .unwrap()
}
