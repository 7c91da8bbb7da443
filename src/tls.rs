//! Serving certificates: loaded from PEM files and reloaded when they change (also when a Secret
//! volume swaps its `..data` symlink), keeping the last good pair; or generated self-signed for
//! local use. TLS 1.2 and 1.3 only, ALPN `h2` then `http/1.1`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::ring::default_provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::supervise::LogOnChange;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The cause is in the message and is not also a `source` (a field named `source` would be),
    /// so a chain (`{:#}`, logs) prints it once.
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found")]
    NoKey { path: PathBuf },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("certificate and key do not form a usable pair: {0}")]
    Pair(String),
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
}

/// What a certificate source tells its owner (metrics, readiness).
#[derive(Clone, Copy)]
pub enum CertEvent<'a> {
    /// A new pair is served.
    Loaded(&'a LoadedCert),
    /// A check failed; the last good pair keeps serving. `source`: `files`, `secret`, `ca_bundle`.
    Failed { source: &'static str },
}

/// A certificate chain and key, with the leaf's expiry for metrics.
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// Seconds since the epoch after which the leaf is no longer valid (0 when unknown).
    pub not_after: i64,
}

/// Parses a PEM chain and a PEM private key.
pub fn load_pem(cert_pem: &[u8], key_pem: &[u8], cert_path: &Path, key_path: &Path) -> Result<LoadedCert, TlsError> {
    let pem_err = |path: &Path, e: pem::Error| TlsError::Pem { path: path.to_owned(), message: e.to_string() };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem).collect::<Result<_, _>>().map_err(|e| pem_err(cert_path, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_path.to_owned() });
    }
    // The first PKCS#8, PKCS#1 or SEC1 key; other sections are skipped.
    let key = match PrivateKeyDer::from_pem_slice(key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => return Err(TlsError::NoKey { path: key_path.to_owned() }),
        Err(e) => return Err(pem_err(key_path, e)),
    };
    let not_after = not_after(&chain[0]).unwrap_or(0);
    let certified =
        CertifiedKey::from_der(chain, key, &default_provider()).map_err(|e| TlsError::Pair(e.to_string()))?;
    Ok(LoadedCert { key: Arc::new(certified), not_after })
}

/// Reads and parses the pair from files.
pub fn load_files(cert_path: &Path, key_path: &Path) -> Result<(LoadedCert, Vec<u8>), TlsError> {
    let read = |p: &Path| std::fs::read(p).map_err(|error| TlsError::Read { path: p.to_owned(), error });
    let (cert, key) = (read(cert_path)?, read(key_path)?);
    let loaded = load_pem(&cert, &key, cert_path, key_path)?;
    Ok((loaded, [cert, key].concat()))
}

/// A self-signed certificate for `localhost`, `127.0.0.1` and `::1`, for local use only.
pub fn self_signed() -> Result<(LoadedCert, String), TlsError> {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    let generated = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let cert_pem = generated.cert.pem();
    let key_pem = generated.signing_key.serialize_pem();
    let loaded = load_pem(cert_pem.as_bytes(), key_pem.as_bytes(), Path::new("<generated>"), Path::new("<generated>"))?;
    Ok((loaded, cert_pem))
}

/// The certificate's notAfter, in seconds since the epoch.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// The certificate every new handshake gets; swapped atomically on reload.
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertResolver")
    }
}

impl CertResolver {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(CertResolver { current: ArcSwap::new(key) })
    }

    pub fn set(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The server's rustls configuration: TLS 1.2+, ALPN h2 and http/1.1, certificate from `resolver`.
pub fn server_config(resolver: Arc<CertResolver>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Re-reads the files every `every`; a changed, valid pair replaces the served one, a broken one
/// is logged and the last good pair stays. Polling the paths (rather than inotify) also sees a
/// Secret volume's `..data` symlink swap, which changes no watched inode of the files' names.
pub async fn watch_files(
    cert_path: PathBuf,
    key_path: PathBuf,
    mut last: Vec<u8>,
    resolver: Arc<CertResolver>,
    every: Duration,
    on_event: impl Fn(CertEvent<'_>) + Send + 'static,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut log = LogOnChange::default();
    loop {
        tick.tick().await;
        let read = |path: &Path| std::fs::read(path).map_err(|error| TlsError::Read { path: path.to_owned(), error });
        let loaded = read(&cert_path).and_then(|cert| Ok((cert, read(&key_path)?))).and_then(|(cert, key)| {
            let both = [cert.as_slice(), key.as_slice()].concat();
            if both == last {
                return Ok(None);
            }
            Ok(Some((load_pem(&cert, &key, &cert_path, &key_path)?, both)))
        });
        match loaded {
            Ok(unchanged_or_new) => {
                if log.succeeded() {
                    tracing::info!(cert = %cert_path.display(), "certificate files usable again");
                }
                if let Some((loaded, both)) = unchanged_or_new {
                    resolver.set(loaded.key.clone());
                    tracing::info!(cert = %cert_path.display(), not_after = loaded.not_after, "serving certificate reloaded");
                    on_event(CertEvent::Loaded(&loaded));
                    last = both;
                }
            }
            // Files are often written one after the other: a mismatch may be half an update.
            // Logged once per change; every failed check is counted.
            Err(e) => {
                if log.failed(&e) {
                    tracing::warn!(error = %e, "certificate files unreadable or invalid; the last good pair keeps serving");
                }
                on_event(CertEvent::Failed { source: "files" });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_file_names_its_cause_once() {
        let Err(err) = load_files(Path::new("/nonexistent/tls.crt"), Path::new("/nonexistent/tls.key")) else {
            panic!("read a file that does not exist")
        };
        assert!(std::error::Error::source(&err).is_none(), "the cause is in the message, not also a source");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(chain.matches("No such file or directory").count(), 1, "{chain}");
        assert!(chain.starts_with("cannot read /nonexistent/tls.crt: "), "{chain}");
    }

    #[test]
    fn self_signed_loads_and_has_an_expiry_in_the_future() {
        let (loaded, pem) = self_signed().unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE"));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!(loaded.not_after > now, "{} <= {now}", loaded.not_after);
    }

    #[test]
    fn mismatched_or_missing_pem_is_a_clear_error() {
        let gen = || rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        let (one, two) = (gen(), gen());
        let err = load_pem(
            one.cert.pem().as_bytes(),
            two.signing_key.serialize_pem().as_bytes(),
            Path::new("c"),
            Path::new("k"),
        );
        assert!(matches!(err, Err(TlsError::Pair(_))), "a key that does not match the certificate is refused");
        let err = load_pem(b"junk", b"junk", Path::new("c.pem"), Path::new("k.pem")).err().unwrap().to_string();
        assert_eq!(err, "c.pem: no PEM certificate found");
        // Parsed with rustls-pki-types' PemObject: a key file without a key, a broken section,
        // a key after other sections (a combined file).
        let cert = one.cert.pem();
        let err = load_pem(cert.as_bytes(), cert.as_bytes(), Path::new("c.pem"), Path::new("k.pem")).err().unwrap();
        assert_eq!(err.to_string(), "k.pem: no PEM private key found");
        let broken = "-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n";
        let err = load_pem(cert.as_bytes(), broken.as_bytes(), Path::new("c.pem"), Path::new("k.pem")).err().unwrap();
        assert!(matches!(&err, TlsError::Pem { .. }), "{err}");
        let combined = format!("{cert}{}", one.signing_key.serialize_pem());
        assert!(load_pem(combined.as_bytes(), combined.as_bytes(), Path::new("c"), Path::new("k")).is_ok());
    }

    #[tokio::test]
    async fn unreadable_files_are_counted_until_a_good_pair_appears() {
        use std::sync::Mutex;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let resolver = CertResolver::new(self_signed().unwrap().0.key);
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let watcher = tokio::spawn(watch_files(
            cert.clone(),
            key.clone(),
            Vec::new(),
            resolver,
            Duration::from_millis(10),
            move |e| {
                seen.lock().unwrap().push(match e {
                    CertEvent::Loaded(_) => "loaded",
                    CertEvent::Failed { source } => source,
                })
            },
        ));
        /// Waits (bounded) until the events seen satisfy `done`.
        async fn wait(events: &Mutex<Vec<&'static str>>, done: impl Fn(&[&str]) -> bool) {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !done(&events.lock().unwrap()) {
                assert!(std::time::Instant::now() < deadline, "not within 10 s: {:?}", events.lock().unwrap());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // Every check of missing files counts (not once per change of the error).
        wait(&events, |e| e.len() >= 3).await;
        assert!(events.lock().unwrap().iter().all(|e| *e == "files"));

        // A good pair: loaded once, then quiet until the files change again.
        let pair = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        std::fs::write(&cert, pair.cert.pem()).unwrap();
        std::fs::write(&key, pair.signing_key.serialize_pem()).unwrap();
        wait(&events, |e| e.last() == Some(&"loaded")).await;
        let loaded_at = events.lock().unwrap().len();
        // The next event is the one the next change causes: the checks in between said nothing.
        std::fs::remove_file(&key).unwrap();
        wait(&events, |e| e.len() > loaded_at).await;
        let after = events.lock().unwrap()[loaded_at - 1..].to_vec();
        assert_eq!(after[..2], ["loaded", "files"], "the good pair loaded once, then nothing until the change");
        watcher.abort();
    }
}
