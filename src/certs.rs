//! The `builtin` certificate mode: the webhook keeps its own CA and serving certificate in a
//! Secret (created if absent, so every replica agrees on one CA), patches the caBundle of its
//! webhook configurations, renews the serving certificate before it expires, and serves whatever
//! pair the Secret holds — so a renewal by one replica reaches all of them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::json;

use crate::supervise::LogOnChange;
use crate::tls::{self, CertEvent, CertResolver, LoadedCert};

#[derive(Debug, Clone)]
pub struct BuiltinConfig {
    /// Namespace of the Secret (the webhook's own).
    pub namespace: String,
    pub secret: String,
    /// Subject alternative names of the serving certificate (`<svc>.<ns>.svc`, …).
    pub dns_names: Vec<String>,
    /// Mutating (and, if present, validating) webhook configuration whose caBundle we own.
    pub webhook_configuration: Option<String>,
    /// Lifetime of a serving certificate; renewed when less than a third remains.
    pub validity: Duration,
    /// How often the Secret and the caBundle are checked.
    pub check_every: Duration,
}

/// Causes are in the messages and are not also `source`s, so a chain prints each once.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("Kubernetes API: {0}")]
    Api(kube::Error),
    #[error("Secret {0} lacks key {1}")]
    MissingKey(String, &'static str),
    #[error("certificate generation: {0}")]
    Generate(rcgen::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The pair is served, but the API server cannot trust it until the caBundle is set.
    #[error("cannot set the caBundle of webhook configuration {configuration}: {error}")]
    CaBundle { configuration: String, error: kube::Error },
}

impl CertError {
    /// The `source` label of `certificate_errors_total`.
    pub fn source_label(&self) -> &'static str {
        match self {
            CertError::CaBundle { .. } => "ca_bundle",
            _ => "secret",
        }
    }
}

impl From<kube::Error> for CertError {
    fn from(e: kube::Error) -> Self {
        CertError::Api(e)
    }
}

impl From<rcgen::Error> for CertError {
    fn from(e: rcgen::Error) -> Self {
        CertError::Generate(e)
    }
}

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn validity_window(params: &mut CertificateParams, validity: Duration) {
    // Back-dated to tolerate clock skew between nodes (less for the short lifetimes of tests).
    let start = SystemTime::now() - Duration::from_secs(300).min(validity / 4);
    params.not_before = start.into();
    params.not_after = (start + validity).into();
}

fn new_ca() -> Result<(String, String), CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, "pod-template-webhook CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity_window(&mut params, CA_VALIDITY);
    Ok((params.self_signed(&key)?.pem(), key.serialize_pem()))
}

fn new_serving(ca_pem: &str, ca_key_pem: &str, cfg: &BuiltinConfig) -> Result<(String, String), CertError> {
    let issuer = Issuer::from_ca_cert_pem(ca_pem, KeyPair::from_pem(ca_key_pem)?)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(cfg.dns_names.clone())?;
    params
        .distinguished_name
        .push(DnType::CommonName, cfg.dns_names.first().map_or("pod-template-webhook", String::as_str));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity_window(&mut params, cfg.validity);
    Ok((params.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
}

fn field(secret: &Secret, key: &'static str) -> Result<String, CertError> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .ok_or_else(|| CertError::MissingKey(secret.name_any(), key))
}

fn secret_data(pairs: [(&str, &str); 4]) -> BTreeMap<String, ByteString> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec()))).collect()
}

/// Keeps the serving certificate and the caBundle current.
pub struct BuiltinCerts {
    cfg: BuiltinConfig,
    secrets: Api<Secret>,
    client: Client,
    resolver: Arc<CertResolver>,
    served: Option<String>,
}

impl BuiltinCerts {
    pub fn new(client: Client, cfg: BuiltinConfig, resolver: Arc<CertResolver>) -> Self {
        let secrets = Api::namespaced(client.clone(), &cfg.namespace);
        BuiltinCerts { cfg, secrets, client, resolver, served: None }
    }

    /// Runs forever: one pass now, then every `check_every`. `ready` turns true after the first
    /// pass that serves the Secret's pair with the caBundle in place.
    /// A failure is logged once per change of its message and counted on every pass.
    pub async fn run(mut self, ready: Arc<AtomicBool>, on_event: impl Fn(CertEvent<'_>) + Send + 'static) {
        let mut log = LogOnChange::default();
        loop {
            match self.reconcile(&|c| on_event(CertEvent::Loaded(c))).await {
                Ok(()) => {
                    ready.store(true, Ordering::Release);
                    if log.succeeded() {
                        tracing::info!(secret = %self.cfg.secret, "builtin certificates: recovered");
                    }
                }
                Err(e) => {
                    if log.failed(&e) {
                        tracing::warn!(error = %e, secret = %self.cfg.secret, "builtin certificates: retrying");
                    }
                    on_event(CertEvent::Failed { source: e.source_label() });
                }
            }
            tokio::time::sleep(self.cfg.check_every).await;
        }
    }

    /// One pass: make sure the Secret exists and is fresh, serve its pair, patch the caBundle.
    pub async fn reconcile(&mut self, on_loaded: &impl Fn(&LoadedCert)) -> Result<(), CertError> {
        let secret = self.ensure_secret().await?;
        let (cert, key) = (field(&secret, TLS_CERT)?, field(&secret, TLS_KEY)?);
        if self.served.as_deref() != Some(cert.as_str()) {
            let loaded = tls::load_pem(cert.as_bytes(), key.as_bytes(), "tls.crt".as_ref(), "tls.key".as_ref())?;
            self.resolver.set(loaded.key.clone());
            on_loaded(&loaded);
            tracing::info!(secret = %self.cfg.secret, not_after = loaded.not_after, "serving the certificate from the Secret");
            self.served = Some(cert);
        }
        self.patch_ca_bundle(&field(&secret, CA_CERT)?).await
    }

    /// The Secret's owner: the webhook configuration it serves. The process creates the Secret,
    /// so Helm does not own it; with this owner reference, deleting the configuration (`helm
    /// uninstall`) lets the garbage collector delete the Secret too.
    /// None, with a line saying why, when the configuration cannot be read or does not exist:
    /// the Secret then has no owner (and outlives an uninstall) until a later check sets it.
    async fn owner(&self) -> Option<OwnerReference> {
        let name = self.cfg.webhook_configuration.as_ref()?;
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let config = match api.get_opt(name).await {
            Ok(Some(config)) => config,
            Ok(None) => {
                tracing::warn!(configuration = %name, secret = %self.cfg.secret, "the webhook configuration does not exist: the Secret gets no owner for now");
                return None;
            }
            Err(e) => {
                tracing::warn!(configuration = %name, secret = %self.cfg.secret, error = %e, "cannot read the webhook configuration: the Secret gets no owner for now");
                return None;
            }
        };
        Some(OwnerReference {
            api_version: "admissionregistration.k8s.io/v1".into(),
            kind: "MutatingWebhookConfiguration".into(),
            name: name.clone(),
            uid: config.metadata.uid?,
            ..Default::default()
        })
    }

    /// The Secret, created if absent and renewed if its serving certificate is due; owned by the
    /// webhook configuration (also a Secret made before owners were set gets one).
    async fn ensure_secret(&self) -> Result<Secret, CertError> {
        let secret = self.ensure_secret_data().await?;
        let Some(owner) = self.owner().await else { return Ok(secret) };
        let owned = secret.metadata.owner_references.iter().flatten().any(|o| o.uid == owner.uid);
        if owned {
            return Ok(secret);
        }
        let patch = json!({"metadata": {"ownerReferences": [owner]}});
        match self.secrets.patch(&self.cfg.secret, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(patched) => {
                tracing::info!(secret = %self.cfg.secret, owner = %owner.name, "the Secret is owned by the webhook configuration");
                Ok(patched)
            }
            Err(e) => {
                tracing::warn!(secret = %self.cfg.secret, error = %e, "cannot set the Secret's owner");
                Ok(secret)
            }
        }
    }

    async fn ensure_secret_data(&self) -> Result<Secret, CertError> {
        let name = &self.cfg.secret;
        let Some(secret) = self.secrets.get_opt(name).await? else {
            let (ca, ca_key) = new_ca()?;
            let (cert, key) = new_serving(&ca, &ca_key, &self.cfg)?;
            let secret = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.clone()),
                    owner_references: self.owner().await.map(|o| vec![o]),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(secret_data([(CA_CERT, &ca), (CA_KEY, &ca_key), (TLS_CERT, &cert), (TLS_KEY, &key)])),
                ..Default::default()
            };
            return match self.secrets.create(&PostParams::default(), &secret).await {
                Ok(created) => {
                    tracing::info!(secret = %name, "created the webhook CA and serving certificate");
                    Ok(created)
                }
                // Another replica won the race: use its CA.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(self.secrets.get(name).await?),
                Err(e) => Err(e.into()),
            };
        };
        let cert = field(&secret, TLS_CERT)?;
        let expires = CertificateDer::pem_slice_iter(cert.as_bytes()).flatten().next().and_then(|c| tls::not_after(&c));
        match expires {
            Some(expires) if expires - now() > self.cfg.validity.as_secs() as i64 / 3 => return Ok(secret),
            Some(_) => {}
            // Renewed below like an expiring one, but not without a word: someone wrote it.
            None => tracing::warn!(secret = %name, "the stored serving certificate does not parse; issuing a new one"),
        }
        let (ca, ca_key) = (field(&secret, CA_CERT)?, field(&secret, CA_KEY)?);
        let (cert, key) = new_serving(&ca, &ca_key, &self.cfg)?;
        let mut renewed = secret.clone();
        renewed.data = Some(secret_data([(CA_CERT, &ca), (CA_KEY, &ca_key), (TLS_CERT, &cert), (TLS_KEY, &key)]));
        // replace() carries the resourceVersion: of two replicas renewing at once, one wins.
        match self.secrets.replace(name, &PostParams::default(), &renewed).await {
            Ok(stored) => {
                tracing::info!(secret = %name, "renewed the serving certificate");
                Ok(stored)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(self.secrets.get(name).await?),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets the caBundle of every webhook of the configuration(s), when it differs.
    /// A configuration that does not exist is no error (the validating one is optional, and
    /// forbidden when the chart does not enable it); any other failure is.
    async fn patch_ca_bundle(&self, ca_pem: &str) -> Result<(), CertError> {
        let Some(name) = &self.cfg.webhook_configuration else { return Ok(()) };
        let failed = |error| CertError::CaBundle { configuration: name.clone(), error };
        let mutating: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        if let Some(config) = mutating.get_opt(name).await.map_err(failed)? {
            let bundles =
                config.webhooks.iter().flatten().map(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()));
            patch_if_needed(&mutating, name, bundles.collect(), ca_pem).await.map_err(failed)?;
        }
        let validating: Api<ValidatingWebhookConfiguration> = Api::all(self.client.clone());
        // The chart grants access to the validating configuration only when it enables it:
        // forbidden means there is none of ours.
        let config = match validating.get_opt(name).await {
            Err(kube::Error::Api(e)) if e.code == 403 => None,
            other => other.map_err(failed)?,
        };
        if let Some(config) = config {
            let bundles =
                config.webhooks.iter().flatten().map(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()));
            patch_if_needed(&validating, name, bundles.collect(), ca_pem).await.map_err(failed)?;
        }
        Ok(())
    }
}

async fn patch_if_needed<K>(
    api: &Api<K>,
    name: &str,
    bundles: Vec<Option<&[u8]>>,
    ca_pem: &str,
) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let want = ca_pem.as_bytes();
    let ops: Vec<_> = bundles
        .iter()
        .enumerate()
        .filter(|(_, have)| **have != Some(want))
        .map(|(i, _)| json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": ByteString(want.to_vec())}))
        .collect();
    if ops.is_empty() {
        return Ok(());
    }
    let patch: json_patch::Patch = serde_json::from_value(json!(ops)).expect("valid JSON patch");
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch)).await?;
    tracing::info!(configuration = %name, webhooks = ops.len(), "caBundle patched");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_named_once() {
        for err in [
            CertError::from(kube::Error::SerdeError(serde_json::from_str::<u8>("x").unwrap_err())),
            CertError::from(rcgen::Error::CouldNotParseCertificate),
        ] {
            assert!(std::error::Error::source(&err).is_none(), "{err}");
            let chain = format!("{:#}", anyhow::Error::from(err));
            let cause = chain.rsplit(": ").next().unwrap();
            assert_eq!(chain.matches(cause).count(), 1, "{chain}");
        }
    }

    fn cfg() -> BuiltinConfig {
        BuiltinConfig {
            namespace: "flyte".into(),
            secret: "s".into(),
            dns_names: vec!["svc.flyte.svc".into(), "127.0.0.1".into()],
            webhook_configuration: None,
            validity: Duration::from_secs(3600),
            check_every: Duration::from_secs(1),
        }
    }

    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn serving_certificates_chain_to_the_stored_ca() {
        let (ca, ca_key) = new_ca().unwrap();
        let (cert, key) = new_serving(&ca, &ca_key, &cfg()).unwrap();
        let loaded = tls::load_pem(cert.as_bytes(), key.as_bytes(), "c".as_ref(), "k".as_ref()).unwrap();
        let remaining = loaded.not_after - now();
        assert!((3000..=3600).contains(&remaining), "{remaining}");
        // Verify the chain with rustls' own verifier.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let leaf = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        for name in ["svc.flyte.svc", "127.0.0.1"] {
            let server_name = rustls_pki_types::ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&leaf, &[], &server_name, &[], rustls_pki_types::UnixTime::now())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
