//! The `builtin` certificate mode against the real kube-apiserver: the Secret is created once,
//! the caBundle patched, the API server calls the webhook over the issued certificate, a second
//! replica reuses the same CA, and a renewal is picked up with no failed request.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, PostParams};
use kube::ResourceExt;
use pod_template_webhook::admission::Policy;
use pod_template_webhook::certs::{BuiltinCerts, BuiltinConfig};
use pod_template_webhook::server::{self, AppState, Limits};
use pod_template_webhook::store::Catalog;
use pod_template_webhook::tls;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::json;

fn config(validity: Duration) -> BuiltinConfig {
    BuiltinConfig {
        namespace: "flyte".into(),
        secret: "ptw-certs".into(),
        dns_names: vec!["127.0.0.1".into(), "localhost".into()],
        webhook_configuration: Some("ptw-builtin".into()),
        validity,
        check_every: Duration::from_millis(500),
    }
}

fn secret_pem(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

fn first_der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// The leaf a TLS client that trusts only `ca_pem` is served on `port`.
async fn served_leaf(port: u16, ca_pem: &str) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(first_der(ca_pem)).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("handshake with the CA from the Secret");
    tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

#[test]
fn builtin_certificates_end_to_end() {
    let api = support::ApiServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let admin = api.client().await;
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "flyte"}})).unwrap();
        Api::<Namespace>::all(admin.clone()).create(&PostParams::default(), &ns).await.unwrap();
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
        Api::<ServiceAccount>::namespaced(admin.clone(), "flyte").create(&PostParams::default(), &sa).await.unwrap();

        // Replica A: templates from a fixed index, certificates from the Secret.
        let mut catalog = Catalog::new("flyte");
        catalog.apply("flyte", "cm", Some("1"), &BTreeMap::from([("t".into(), "labels: {mutated: 'yes'}".into())]));
        let state = AppState::new(Arc::new(catalog.index()), Policy::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let webhook: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": "ptw-builtin"},
            "webhooks": [{
                "name": "pod-templates.flyte.org",
                "clientConfig": {"url": format!("https://127.0.0.1:{port}/mutate")},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
                "objectSelector": {"matchExpressions": [{"key": "flyte.org/environment", "operator": "Exists"}]},
                "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Fail", "timeoutSeconds": 5,
            }]
        }))
        .unwrap();
        Api::<MutatingWebhookConfiguration>::all(admin.clone()).create(&PostParams::default(), &webhook).await.unwrap();

        let placeholder = tls::self_signed().unwrap().0;
        let resolver = tls::CertResolver::new(placeholder.key);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(resolver.clone()));
        tokio::spawn(server::serve_tls(
            listener,
            acceptor,
            server::webhook_router(state.clone(), &Limits::default()),
            Limits::default(),
            state.metrics.clone(),
            std::future::pending(),
        ));
        let validity = Duration::from_secs(20);
        let ready_a = Arc::new(AtomicBool::new(false));
        tokio::spawn(BuiltinCerts::new(api.client().await, config(validity), resolver).run(ready_a.clone(), |_| {}));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready_a.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "replica A never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The Secret exists once, and the caBundle is its CA.
        let secrets = Api::<Secret>::namespaced(admin.clone(), "flyte");
        let secret = secrets.get("ptw-certs").await.unwrap();
        let ca = secret_pem(&secret, "ca.crt");
        let bundle =
            Api::<MutatingWebhookConfiguration>::all(admin.clone()).get("ptw-builtin").await.unwrap().webhooks.unwrap()
                [0]
            .client_config
            .ca_bundle
            .clone()
            .unwrap();
        assert_eq!(bundle.0, ca.as_bytes());
        assert_eq!(served_leaf(port, &ca).await, first_der(&secret_pem(&secret, "tls.crt")));

        // The API server calls the webhook over the issued certificate.
        let pods = Api::<Pod>::namespaced(admin.clone(), "flyte");
        let pod = |name: String| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": name, "labels": {"flyte.org/environment": "t"}},
                "spec": {"containers": [{"name": "primary", "image": "x:1"}]}}))
            .unwrap()
        };
        let created = pods.create(&PostParams::default(), &pod("first".into())).await.unwrap();
        assert_eq!(created.labels()["mutated"], "yes");

        // Replica B reuses the Secret: same CA, same pair, nothing rewritten.
        let other = tls::CertResolver::new(tls::self_signed().unwrap().0.key);
        let mut b = BuiltinCerts::new(api.client().await, config(validity), other);
        b.reconcile(&|_| {}).await.unwrap();
        let after_b = secrets.get("ptw-certs").await.unwrap();
        assert_eq!(after_b.resource_version(), secret.resource_version(), "a second replica must not replace the CA");

        // Renewal under a steady stream of pod creations: not one fails.
        let old_leaf = first_der(&secret_pem(&secret, "tls.crt"));
        let started = Instant::now();
        let mut created = 0;
        let renewed_leaf = loop {
            pods.create(&PostParams::default(), &pod(format!("p{created}")))
                .await
                .expect("a pod creation failed during renewal");
            created += 1;
            let current = secrets.get("ptw-certs").await.unwrap();
            let leaf = first_der(&secret_pem(&current, "tls.crt"));
            if leaf != old_leaf && served_leaf(port, &ca).await == leaf {
                assert_eq!(secret_pem(&current, "ca.crt"), ca, "renewal keeps the CA");
                break leaf;
            }
            assert!(started.elapsed() < Duration::from_secs(40), "no renewal picked up within 40 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for i in 0..5 {
            pods.create(&PostParams::default(), &pod(format!("after{i}"))).await.expect("pods after the renewal");
        }
        assert_ne!(renewed_leaf, old_leaf);
        eprintln!("renewed after {:?}; {created} pods created meanwhile, none failed", started.elapsed());

        // Replica C may use the Secret but not patch its webhook configuration: each pass fails
        // with an error naming the configuration, counted as `ca_bundle`, and C never turns ready.
        let other_webhook = json!({"metadata": {"name": "ptw-other"}, "webhooks": webhook.webhooks});
        let mut other_webhook: MutatingWebhookConfiguration = serde_json::from_value(other_webhook).unwrap();
        other_webhook.webhooks.iter_mut().flatten().for_each(|w| w.client_config.ca_bundle = None);
        Api::<MutatingWebhookConfiguration>::all(admin.clone())
            .create(&PostParams::default(), &other_webhook)
            .await
            .unwrap();
        let client = limited_client(&api, &admin).await;
        let cfg = BuiltinConfig { webhook_configuration: Some("ptw-other".into()), ..config(validity) };
        let mut c =
            BuiltinCerts::new(client.clone(), cfg.clone(), tls::CertResolver::new(tls::self_signed().unwrap().0.key));
        let err = c.reconcile(&|_| {}).await.unwrap_err();
        assert_eq!(err.source_label(), "ca_bundle", "{err}");
        let message = err.to_string();
        assert!(message.starts_with("cannot set the caBundle of webhook configuration ptw-other: "), "{message}");
        assert!(message.contains("forbidden"), "{message}");
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = failures.clone();
        let ready_c = Arc::new(AtomicBool::new(false));
        let resolver = tls::CertResolver::new(tls::self_signed().unwrap().0.key);
        let task = tokio::spawn(BuiltinCerts::new(client, cfg, resolver).run(ready_c.clone(), move |event| {
            if let tls::CertEvent::Failed { source } = event {
                seen.lock().unwrap().push(source);
            }
        }));
        // Every pass is counted, not once per change of the error: wait for a second one.
        let deadline = Instant::now() + Duration::from_secs(30);
        while failures.lock().unwrap().len() < 2 {
            assert!(Instant::now() < deadline, "a second failing pass was not counted: {:?}", failures.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        let failures = failures.lock().unwrap().clone();
        assert!(failures.iter().all(|s| *s == "ca_bundle"), "{failures:?}");
        assert!(!ready_c.load(Ordering::Acquire), "not ready while the API server cannot trust the pair");

        // Allowed to patch its configuration (and still forbidden any validating one, which then
        // is none of ours): the pass succeeds and the caBundle is the Secret's CA.
        let patch = json!([{"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
                             "resourceNames": ["ptw-other"], "verbs": ["patch"]}]);
        grant_limited(&admin, "ptw-limited-patch", patch).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = c.reconcile(&|_| {}).await {
            assert!(Instant::now() < deadline, "still failing once allowed: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await; // the authorizer's cache
        }
        let other = Api::<MutatingWebhookConfiguration>::all(admin.clone()).get("ptw-other").await.unwrap();
        let bundle = other.webhooks.unwrap()[0].client_config.ca_bundle.clone().expect("caBundle set");
        assert_eq!(bundle.0, ca.as_bytes());
    });
}

/// A client of ServiceAccount `flyte/limited`, which may read and write Secrets of `flyte` and
/// read mutating webhook configurations, but not patch them.
async fn limited_client(api: &support::ApiServer, admin: &kube::Client) -> kube::Client {
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "limited"}})).unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), "flyte").create(&PostParams::default(), &sa).await.unwrap();
    grant_limited(admin, "ptw-limited", json!([
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "update", "patch"]},
            // As the chart without its validating webhook: no access to validating configurations.
            {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"], "verbs": ["get"]},
        ])).await;
    let token = support::service_account_token(admin, "flyte", "limited").await;
    support::token_client(&api.url, &api.pki.ca_pem, &token).await
}

/// Binds ClusterRole `name` with `rules` to ServiceAccount `flyte/limited`.
async fn grant_limited(admin: &kube::Client, name: &str, rules: serde_json::Value) {
    let role: ClusterRole = serde_json::from_value(json!({"metadata": {"name": name}, "rules": rules})).unwrap();
    Api::<ClusterRole>::all(admin.clone()).create(&PostParams::default(), &role).await.unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": "limited", "namespace": "flyte"}],
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(admin.clone()).create(&PostParams::default(), &binding).await.unwrap();
}
