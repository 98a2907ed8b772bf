//! TLS, on every port of the mesh (the `[connections.tls]` settings):
//! servers present `cert` and, under mutual TLS, take only clients whose
//! certificates `ca` signed; clients check servers against `ca` and,
//! under mutual TLS, present `cert` themselves. rustls on ring, TLS 1.2
//! and 1.3, ALPN h2 (what grpcurl and every gRPC client ask for).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The `[connections.tls]` settings; all empty: plaintext.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// The PEM certificate chain this process serves with (and, under
    /// mutual TLS, shows as a client). Set, the ports speak TLS only.
    pub cert: PathBuf,
    /// The PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA certificates the peers' certificates are checked against.
    /// Set, this process calls others over TLS.
    pub ca: PathBuf,
    /// Servers take only clients with a certificate `ca` signed, and
    /// clients show `cert`.
    pub mutual: bool,
    /// The name servers' certificates are checked for, instead of the
    /// address dialled (when every instance shares one certificate).
    pub server_name: String,
}

/// TLS settings that cannot be used; the message names the file or the
/// setting at fault.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

impl Tls {
    /// Whether this process serves over TLS.
    pub fn serves(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }

    /// Whether this process calls over TLS.
    pub fn calls(&self) -> bool {
        !self.ca.as_os_str().is_empty()
    }

    /// The scheme of a URI this process dials.
    pub fn scheme(&self) -> &'static str {
        if self.calls() { "https" } else { "http" }
    }

    /// The environment that gives a process of this binary these settings
    /// (its `SHOP_MESH__CONNECTIONS__TLS__*` variables), for the processes
    /// a harness starts and the shell `up` prints them for.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> =
            [("CERT", &self.cert), ("KEY", &self.key), ("CA", &self.ca)]
                .into_iter()
                .filter(|(_, path)| !path.as_os_str().is_empty())
                .map(|(key, path)| {
                    (
                        format!("SHOP_MESH__CONNECTIONS__TLS__{key}"),
                        path.display().to_string(),
                    )
                })
                .collect();
        if self.mutual {
            env.push(("SHOP_MESH__CONNECTIONS__TLS__MUTUAL".into(), "true".into()));
        }
        if !self.server_name.is_empty() {
            env.push((
                "SHOP_MESH__CONNECTIONS__TLS__SERVER_NAME".into(),
                self.server_name.clone(),
            ));
        }
        env
    }

    /// What accepts TLS on a server's connections, or None for plaintext.
    pub fn acceptor(&self) -> Result<Option<TlsAcceptor>, TlsError> {
        if !self.serves() {
            if self.mutual {
                return Err(TlsError(
                    "mutual TLS needs this process's certificate: set cert and key".into(),
                ));
            }
            if self.calls() {
                return Err(TlsError(
                    "ca is set but cert is not: this role would call over TLS and serve plaintext; set cert and key".into(),
                ));
            }
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsError(err.to_string()))?;
        let builder = if self.mutual {
            let roots = Arc::new(self.roots()?.1);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|err| TlsError(format!("ca {}: {err}", self.ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(self.chain()?.1, self.private_key()?.1)
            .map_err(|err| {
                TlsError(format!(
                    "cert {} and key {} do not go together: {err}",
                    self.cert.display(),
                    self.key.display()
                ))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(TlsAcceptor::from(Arc::new(config))))
    }

    /// How a client of the mesh checks servers (and shows itself), or None
    /// for plaintext.
    pub fn client(&self) -> Result<Option<Dialer>, TlsError> {
        if !self.calls() {
            if self.mutual {
                return Err(TlsError(
                    "mutual TLS needs the CA that signs the servers' certificates: set ca".into(),
                ));
            }
            return Ok(None);
        }
        // Read and checked here, once, so a bad file is named at start-up
        // rather than at the first call.
        let (ca, _) = self.roots()?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if self.mutual {
            let ((cert, _), (key, _)) = (self.chain()?, self.private_key()?);
            config = config.identity(Identity::from_pem(cert, key));
        }
        let named = !self.server_name.is_empty();
        if named {
            config = config.domain_name(self.server_name.clone());
        }
        // A handshake with a peer that accepted the connection but says
        // nothing (a hung process) must not hold a caller forever.
        config = config.timeout(HANDSHAKE_TIMEOUT);
        Ok(Some(Dialer { config, named }))
    }

    /// The CA file, and the roots it holds.
    fn roots(&self) -> Result<(Vec<u8>, RootCertStore), TlsError> {
        if !self.calls() {
            return Err(TlsError(
                "mutual TLS needs the CA that signs the clients' certificates: set ca".into(),
            ));
        }
        let (pem, certs) = certificates("ca", &self.ca)?;
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|err| TlsError(format!("ca {}: {err}", self.ca.display())))?;
        }
        Ok((pem, roots))
    }

    /// The certificate file, and the chain it holds.
    fn chain(&self) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), TlsError> {
        certificates("cert", &self.cert)
    }

    /// The key file, and the key it holds.
    fn private_key(&self) -> Result<(Vec<u8>, PrivateKeyDer<'static>), TlsError> {
        if self.key.as_os_str().is_empty() {
            return Err(TlsError("cert is set but key is not".into()));
        }
        let pem = read("key", &self.key)?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|err| {
            TlsError(format!(
                "key {}: no PEM private key: {err}",
                self.key.display()
            ))
        })?;
        Ok((pem, key))
    }
}

/// The longest a client's TLS handshake may take.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A client's TLS settings, read once, for each peer it dials.
#[derive(Debug, Clone)]
pub struct Dialer {
    config: ClientTlsConfig,
    /// Whether `server_name` names every peer.
    named: bool,
}

impl Dialer {
    /// The settings for a peer dialled at `host` (a name, an IPv4 address,
    /// or an IPv6 one with or without brackets): its certificate is checked
    /// for that host, unless `server_name` was set. (tonic would take the
    /// URI's host, which for IPv6 keeps its brackets, a name rustls cannot
    /// read.)
    pub fn for_host(&self, host: &str) -> ClientTlsConfig {
        if self.named {
            return self.config.clone();
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.config.clone().domain_name(host)
    }
}

/// The file at `path`, and the PEM certificates in it: at least one.
fn certificates(
    setting: &str,
    path: &Path,
) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), TlsError> {
    let bad = |err: String| TlsError(format!("{setting} {}: {err}", path.display()));
    let pem = read(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| bad(err.to_string()))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok((pem, certs))
}

fn read(setting: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|err| TlsError(format!("{setting} {}: {err}", path.display())))
}
