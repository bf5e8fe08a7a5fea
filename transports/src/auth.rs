//! Peer authentication for the encrypted transports: each side has a certificate and key
//! (`ferry keygen` makes a self-signed pair) and pins the SHA-256 fingerprints of the peers
//! it accepts. No certificate authority is involved: the destination accepts only a source
//! whose certificate it pinned and the source only the destination it meant, and each side
//! proves it holds the key of its certificate in the TLS 1.3 handshake.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// A SHA-256 certificate fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(cert: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, cert);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }

    /// Parses 64 hex digits, optionally prefixed with `sha256:` and split by colons.
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        let t = s.trim();
        let t = t.strip_prefix("sha256:").unwrap_or(t);
        let hex: String = t.chars().filter(|c| *c != ':').collect();
        let bad = || AuthError::BadFingerprint(s.to_string());
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Loading or using authentication material failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("writing {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds no certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// A fingerprint is not 64 hex digits.
    #[error("bad fingerprint {0:?} (expected sha256: and 64 hex digits)")]
    BadFingerprint(String),
    /// No peer is pinned.
    #[error("no peer fingerprint pinned (--peer or the auth file's peers)")]
    NoPeers,
    /// The auth file is malformed.
    #[error("{path}: {what}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// rustls refused the material.
    #[error("TLS setup")]
    Tls(#[source] rustls::Error),
}

/// This side's certificate and key, and the peers it accepts.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Certificate chain (the first is ours).
    pub certs: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: Arc<PrivateKeyDer<'static>>,
    /// Fingerprints of the peers accepted.
    pub peers: Vec<Fingerprint>,
}

impl Identity {
    /// Loads a certificate and key from PEM files and pins `peers`.
    pub fn load(cert: &Path, key: &Path, peers: Vec<Fingerprint>) -> Result<Self, AuthError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| AuthError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(cert)?;
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AuthError::Pem {
                path: cert.to_path_buf(),
                what: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(AuthError::Pem {
                path: cert.to_path_buf(),
                what: "no certificate in it".into(),
            });
        }
        let key_pem = read(key)?;
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| AuthError::Pem {
            path: key.to_path_buf(),
            what: format!("no private key in it ({e})"),
        })?;
        if peers.is_empty() {
            return Err(AuthError::NoPeers);
        }
        Ok(Self {
            certs,
            key: Arc::new(key_der),
            peers,
        })
    }

    /// Loads an auth file: TOML with `cert`, `key` (paths relative to the file) and
    /// `peers` (fingerprints).
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            cert: PathBuf,
            key: PathBuf,
            peers: Vec<String>,
        }
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let f: File = toml::from_str(&text).map_err(|e| AuthError::Config {
            path: path.to_path_buf(),
            what: e.message().to_string(),
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let peers = f
            .peers
            .iter()
            .map(|p| Fingerprint::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        Self::load(&dir.join(&f.cert), &dir.join(&f.key), peers)
    }

    /// This side's own fingerprint (what the peer pins).
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.certs[0])
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn verifier(&self) -> Arc<Pinned> {
        Arc::new(Pinned {
            peers: self.peers.clone(),
            provider: Self::provider(),
        })
    }

    /// A TLS 1.3 client configuration presenting our certificate and accepting only a
    /// pinned server.
    pub fn client_config(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, AuthError> {
        let mut c = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(AuthError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(self.verifier())
            .with_client_auth_cert(self.certs.clone(), self.key.clone_key())
            .map_err(AuthError::Tls)?;
        c.alpn_protocols = vec![alpn.to_vec()];
        Ok(c)
    }

    /// A TLS 1.3 server configuration requiring a pinned client certificate.
    pub fn server_config(&self, alpn: &[u8]) -> Result<rustls::ServerConfig, AuthError> {
        let mut c = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(AuthError::Tls)?
            .with_client_cert_verifier(self.verifier())
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .map_err(AuthError::Tls)?;
        c.alpn_protocols = vec![alpn.to_vec()];
        Ok(c)
    }
}

/// A new self-signed certificate and key, as PEM text: (certificate, key).
pub fn generate(name: &str) -> Result<(String, String, Fingerprint), AuthError> {
    let ck =
        rcgen::generate_simple_self_signed(vec![name.to_string()]).map_err(|e| AuthError::Pem {
            path: PathBuf::from(name),
            what: format!("generating a key: {e}"),
        })?;
    let fp = Fingerprint::of(ck.cert.der());
    Ok((ck.cert.pem(), ck.key_pair.serialize_pem(), fp))
}

/// A new certificate and key written to `dir` as `NAME.crt` and `NAME.key` (mode 0600):
/// (certificate path, key path, fingerprint).
pub fn generate_files(
    dir: &Path,
    name: &str,
) -> Result<(PathBuf, PathBuf, Fingerprint), AuthError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (cert, key, fp) = generate(name)?;
    let key_path = dir.join(format!("{name}.key"));
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AuthError::Write { path, source }
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)
        .and_then(|mut f| f.write_all(key.as_bytes()))
        .map_err(write_err(&key_path))?;
    let cert_path = dir.join(format!("{name}.crt"));
    std::fs::write(&cert_path, cert).map_err(write_err(&cert_path))?;
    Ok((cert_path, key_path, fp))
}

/// Accepts exactly the pinned certificates; TLS signatures are still checked against them.
#[derive(Debug)]
struct Pinned {
    peers: Vec<Fingerprint>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let fp = Fingerprint::of(cert);
        if self.peers.contains(&fp) {
            Ok(())
        } else {
            tracing::warn!("peer certificate {fp} is not pinned");
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_auth_file_names_cert_key_and_peers_relative_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, fp) = generate("me").unwrap();
        std::fs::write(dir.path().join("me.crt"), cert).unwrap();
        std::fs::write(dir.path().join("me.key"), key).unwrap();
        let f = dir.path().join("auth.toml");
        std::fs::write(
            &f,
            format!("cert = \"me.crt\"\nkey = \"me.key\"\npeers = [\"{fp}\"]\n"),
        )
        .unwrap();
        let id = Identity::from_file(&f).unwrap();
        assert_eq!(id.fingerprint(), fp);
        assert_eq!(id.peers, vec![fp]);
        std::fs::write(&f, "cert = \"me.crt\"\nkey = \"me.key\"\npeers = []\n").unwrap();
        assert!(matches!(Identity::from_file(&f), Err(AuthError::NoPeers)));
        std::fs::write(&f, "cert = \"me.crt\"\nkye = 1\n").unwrap();
        let e = Identity::from_file(&f).unwrap_err();
        assert!(e.to_string().contains("auth.toml"), "{e}");
        std::fs::write(&f, "cert = \"me.key\"\nkey = \"me.crt\"\npeers = []\n").unwrap();
        assert!(Identity::from_file(&f).is_err());
    }

    #[test]
    fn fingerprints_parse_in_every_spelling() {
        let (_, _, fp) = generate("ferry").unwrap();
        let s = fp.to_string();
        assert_eq!(Fingerprint::parse(&s).unwrap(), fp);
        assert_eq!(Fingerprint::parse(&s["sha256:".len()..]).unwrap(), fp);
        let colons: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(Fingerprint::parse(&colons.join(":")).unwrap(), fp);
        for bad in ["", "sha256:12", &"zz".repeat(32), &"é".repeat(32)] {
            assert!(Fingerprint::parse(bad).is_err(), "{bad}");
        }
    }
}
