//! TLS for the DICOM TLS listener, HTTPS and C-MOVE sub-operations to TLS peers (rustls on aws-lc).
//!
//! - this file: [`Certificates`], the `[tls]` files made into rustls configurations, read again on
//!   SIGHUP and when a file's modification time changes (a file that does not load keeps the
//!   previous configuration in service and logs an error);
//! - [`subject`]: a certificate's subject as an RFC 4514 string (a DIMSE peer's identity);
//! - [`relay`]: a TLS connection handed to code that speaks to a `TcpStream` (dicom-ul).
//!
//! Protocols and cipher suites follow BCP 195 (RFC 9325), as PS3.15 B.9 and B.11 ask: TLS 1.3 and
//! 1.2, ECDHE key exchange and AEAD ciphers (AES-GCM, ChaCha20-Poly1305) only.

pub mod relay;
pub mod subject;

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls::crypto::aws_lc_rs::{self, cipher_suite};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::TlsConfig;

/// TLS 1.3 and 1.2 (BCP 195 / RFC 8996: nothing older).
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// rustls on aws-lc with the cipher suites of BCP 195 (RFC 9325 4.2): the TLS 1.3 suites, and for
/// TLS 1.2 ECDHE key exchange with AEAD ciphers only.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        ..aws_lc_rs::default_provider()
    })
}

/// One loaded set of configurations: all come from the same reading of the files.
struct Loaded {
    dimse: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    stamps: Vec<Option<SystemTime>>,
}

/// The gateway's certificate in service, and what to read again when it changes.
pub struct Certificates {
    settings: TlsConfig,
    current: RwLock<Arc<Loaded>>,
}

impl Certificates {
    /// Reads the `[tls]` files; an error names the file that does not load.
    pub fn load(settings: &TlsConfig) -> anyhow::Result<Arc<Certificates>> {
        let loaded = load(settings)?;
        Ok(Arc::new(Certificates {
            settings: settings.clone(),
            current: RwLock::new(Arc::new(loaded)),
        }))
    }

    fn current(&self) -> Arc<Loaded> {
        self.current.read().expect("not poisoned").clone()
    }

    /// Accepts DICOM TLS connections (client certificates checked against `client_ca` when set).
    pub fn dimse_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current().dimse.clone())
    }

    /// Accepts HTTPS connections, offering HTTP/2 and HTTP/1.1 by ALPN.
    pub fn http_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current().http.clone())
    }

    /// Connects to TLS peers (their certificate checked against `ca`, ours presented when asked).
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.current().client.clone())
    }

    /// Reads the files again if `force` or if one of them changed since the last reading. Returns
    /// whether a new certificate is in service; a failure leaves the previous one in service.
    pub fn reload(&self, force: bool) -> anyhow::Result<bool> {
        if !force && stamps(&self.settings) == self.current().stamps {
            return Ok(false);
        }
        let loaded = load(&self.settings)?;
        *self.current.write().expect("not poisoned") = Arc::new(loaded);
        Ok(true)
    }

    /// Reloads on SIGHUP and, every `reload_check_secs`, when a file changed, until `shutdown`.
    pub async fn watch(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => signal,
            Err(e) => {
                tracing::error!(error = %e, "no SIGHUP handler: certificates reload only when their files change");
                return;
            }
        };
        let check = Duration::from_secs(self.settings.reload_check_secs);
        // With checks off the interval still exists, but its ticks are never awaited.
        let mut ticks = tokio::time::interval(check.max(Duration::from_secs(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let force = tokio::select! {
                _ = hangup.recv() => true,
                _ = ticks.tick(), if !check.is_zero() => false,
                _ = crate::dimse::stopped(&mut shutdown) => return,
            };
            // Reading the files is blocking I/O (a stat every check; a hung network mount would
            // hold a runtime thread): on a blocking thread.
            let this = self.clone();
            let reloaded = tokio::task::spawn_blocking(move || this.reload(force))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("reload task failed: {e}")));
            match reloaded {
                Ok(true) => tracing::info!(cert = %self.settings.cert, "TLS certificate reloaded"),
                Ok(false) => {}
                Err(e) => tracing::error!(
                    error = %format!("{e:#}"),
                    "TLS certificate not reloaded: the previous one stays in service"
                ),
            }
        }
    }
}

/// The modification times of the files (None where a file cannot be read).
fn stamps(settings: &TlsConfig) -> Vec<Option<SystemTime>> {
    [
        &settings.cert,
        &settings.key,
        &settings.client_ca,
        &settings.ca,
    ]
    .iter()
    .map(|path| {
        std::fs::metadata(path.as_str())
            .and_then(|m| m.modified())
            .ok()
    })
    .collect()
}

fn load(settings: &TlsConfig) -> anyhow::Result<Loaded> {
    // Read first, so that a file replaced while it is read is noticed at the next check.
    let stamps = stamps(settings);
    let provider = provider();
    let chain = certificates(&settings.cert)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key)
        .with_context(|| format!("reading the private key in {}", settings.key))?;
    let server = |alpn: Vec<Vec<u8>>, client_ca: &str| -> anyhow::Result<Arc<ServerConfig>> {
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(VERSIONS)?;
        let builder = if client_ca.is_empty() {
            builder.with_no_client_auth()
        } else {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots(client_ca)?, provider.clone())
                    .build()
                    .with_context(|| format!("tls.client_ca {client_ca}"))?;
            builder.with_client_cert_verifier(verifier)
        };
        let mut config = builder
            .with_single_cert(chain.clone(), key.clone_key())
            .with_context(|| format!("tls.cert {} with tls.key {}", settings.cert, settings.key))?;
        config.alpn_protocols = alpn;
        Ok(Arc::new(config))
    };
    let dimse = server(Vec::new(), &settings.client_ca)?;
    let http = server(vec![b"h2".to_vec(), b"http/1.1".to_vec()], "")?;
    let ca = if settings.ca.is_empty() {
        &settings.client_ca
    } else {
        &settings.ca
    };
    let client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)?
        .with_root_certificates(if ca.is_empty() {
            Arc::new(RootCertStore::empty())
        } else {
            roots(ca)?
        })
        .with_client_auth_cert(chain, key)
        .context("our certificate as a TLS client")?;
    Ok(Loaded {
        dimse,
        http,
        client: Arc::new(client),
        stamps,
    })
}

fn certificates(path: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {path}"))?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in {path}");
    Ok(chain)
}

fn roots(path: &str) -> anyhow::Result<Arc<RootCertStore>> {
    let mut store = RootCertStore::empty();
    for cert in certificates(path)? {
        store
            .add(cert)
            .with_context(|| format!("a CA certificate in {path}"))?;
    }
    Ok(Arc::new(store))
}
