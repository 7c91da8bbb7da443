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
    on_reload: impl Fn(&LoadedCert) + Send + 'static,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let read = |p: &Path| std::fs::read(p);
        let (Ok(cert), Ok(key)) = (read(&cert_path), read(&key_path)) else { continue };
        let both = [cert.as_slice(), key.as_slice()].concat();
        if both == last {
            continue;
        }
        match load_pem(&cert, &key, &cert_path, &key_path) {
            Ok(loaded) => {
                resolver.set(loaded.key.clone());
                tracing::info!(cert = %cert_path.display(), not_after = loaded.not_after, "serving certificate reloaded");
                on_reload(&loaded);
                last = both;
            }
            // Files are often written one after the other: a mismatch may be half an update.
            Err(e) => tracing::warn!(error = %e, "new certificate files rejected; the last good pair keeps serving"),
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
}
