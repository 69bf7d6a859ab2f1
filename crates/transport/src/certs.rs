//! The cluster's certificates: one CA per cluster, one certificate per node, both made with
//! rcgen. Only holders of a certificate signed by the cluster CA can connect (mutual TLS 1.3),
//! and a dialer checks that the server's certificate names the node it meant to reach.
//!
//! Every certificate has an explicit validity (`CA_VALIDITY_DAYS`, `NODE_VALIDITY_DAYS`), so a
//! stolen node key stops working within a year and an operator has a date to plan renewal by.
//! Issuing checks the CA first (`CaSigner`): its certificate is a CA certificate, carries the
//! public key of the CA key, and is valid at the time of issue; a node certificate never outlives
//! its CA, and what is issued is verified to chain to the CA before anyone sees it.
//! The cert directory on disk (`ca.pem`, `ca.key`, `node-N.pem`, `node-N.key`), how it is
//! created, renewed and loaded, and what loading checks, is in `files`.
//! rustls is built with the ring provider only, passed explicitly, so no process-wide provider
//! has to be installed.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use thiserror::Error;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer as _, X509Certificate};

mod files;

pub use files::{
    CA_EXPIRY_WARNING_DAYS, CertDirListing, CertFileSummary, EXPIRY_WARNING_DAYS, ExpiryWarning,
    UtcTime, Validity, ValidityStatus, check_expiry, ensure_cluster_certs, read_cert_dir,
    renew_node_cert,
};

/// ALPN label of the cluster protocol; versions are negotiated inside, not by ALPN.
pub const ALPN: &[u8] = b"duplex";

/// How long a new cluster CA is valid: ten years, longer than most clusters' hardware lives,
/// because replacing a CA means re-issuing every node certificate at once.
pub const CA_VALIDITY_DAYS: u64 = 3650;

/// How long a new node certificate is valid: one year, renewed one node at a time; less when the
/// CA expires sooner, since a certificate is no use after its issuer expires.
pub const NODE_VALIDITY_DAYS: u64 = 365;

/// How far before its issue a certificate's validity starts, so that a host whose clock is
/// behind the issuer's by up to this much accepts a new certificate at once.
pub const NOT_BEFORE_BACKDATE_SECS: u64 = 3600;

const SECS_PER_DAY: u64 = 86_400;

/// What went wrong with a certificate or a cert directory, naming the file. The underlying error
/// (OS, rcgen) is part of the message, not a separate cause, so it is printed once.
#[derive(Debug, Error)]
pub enum CertError {
    #[error("generating {what}: {error}")]
    Generate { what: String, error: rcgen::Error },
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("writing {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("parsing {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("building TLS configuration: {reason}")]
    Tls { reason: String },
    #[error("locking {path}: {error}")]
    Lock {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{key} exists but {cert} does not: refusing to make a new CA over an existing CA key \
         (node certificates it issued may be in use); restore {cert} from a backup, or move \
         {key} aside to start a new CA and re-issue every node certificate"
    )]
    CaCertMissing { key: PathBuf, cert: PathBuf },
    #[error(
        "{path} has mode {mode:04o}: a private key must not be accessible by group or others \
         (expected 0600 or 0400); run `chmod 600 {path}`"
    )]
    KeyAccessibleByOthers { path: PathBuf, mode: u32 },
    #[error(
        "{key} is not the key of {cert}: was a renewal interrupted? run `duplex certs ensure` \
         (it finishes an interrupted renewal) or `duplex certs renew` for this node"
    )]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error(
        "{cert} is not the certificate of the CA key {key}: ca.pem belongs to another CA; \
         restore this CA's ca.pem, or issue nowhere until they match"
    )]
    CaKeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{path} is not a CA certificate (its basic constraints do not say CA)")]
    NotCa { path: PathBuf },
    #[error("{cert} is not a certificate for {name} issued by {ca}: {reason}")]
    NotIssuedByCa {
        cert: PathBuf,
        ca: PathBuf,
        name: String,
        reason: String,
    },
    #[error(
        "issuing node {node} needs the CA key {key}, which is not there: run this on the host \
         that holds the CA key, or copy it here (mode 0600)"
    )]
    CaKeyNeeded { key: PathBuf, node: u16 },
    #[error(
        "{path} has mode {mode:04o}: a cert directory must not be writable by group or others \
         (they could replace a certificate or key); run `chmod go-w {path}`"
    )]
    DirWritableByOthers { path: PathBuf, mode: u32 },
    #[error(
        "{path} is owned by uid {owner}, not by this process's user (uid {user}): a private key \
         must belong to the user that uses it; run `chown {user} {path}`"
    )]
    KeyNotOwnedByUser {
        path: PathBuf,
        owner: u32,
        user: u32,
    },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "{path} is not valid yet (valid {} to {}) and the clock says {}: check this host's clock",
        UtcTime(validity.not_before), UtcTime(validity.not_after), UtcTime(*now)
    )]
    NotYetValid {
        path: PathBuf,
        validity: Validity,
        now: SystemTime,
    },
    #[error(
        "{path} expired at {} (valid {} to {}) and the clock says {}: renew it (docs/transport.md, \
         Certificates)",
        UtcTime(validity.not_after), UtcTime(validity.not_before), UtcTime(validity.not_after),
        UtcTime(*now)
    )]
    Expired {
        path: PathBuf,
        validity: Validity,
        now: SystemTime,
    },
    #[error("the clock says {}, which a certificate's validity cannot carry", UtcTime(*now))]
    ClockOutOfRange { now: SystemTime },
}

/// The name a node's certificate carries and a dialer checks.
pub fn node_server_name(node: u16) -> String {
    format!("node-{node}.duplex")
}

/// The CA's common name: "Duplex cluster CA" and a fingerprint of its public key, so that two
/// clusters' CAs never share a name and a refusal's log says which issuer was unknown. Derived
/// from the key, so re-loading the CA from its files gives the same issuer name.
fn ca_common_name(key: &KeyPair) -> String {
    // FNV-1a: a name tag, not a security property (the signature is).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.public_key_raw() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("Duplex cluster CA {h:016x}")
}

/// Checks that a peer's (already chain-verified) certificate names `node`, i.e. carries the SAN
/// `node_server_name(node)`. The acceptor uses it to bind a hello's claimed node to the
/// certificate that authenticated the connection.
pub fn verify_node_certificate(cert: &CertificateDer<'_>, node: u16) -> Result<(), String> {
    let name = node_server_name(node);
    let server_name = rustls_pki_types::ServerName::try_from(name.as_str())
        .map_err(|e| format!("{name} is not a DNS name: {e}"))?;
    let parsed = rustls::server::ParsedCertificate::try_from(cert)
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    rustls::client::verify_server_name(&parsed, &server_name)
        .map_err(|e| format!("certificate is not valid for {name}: {e}"))
}

fn ca_params(key: &KeyPair) -> Result<CertificateParams, CertError> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|error| CertError::Generate {
            what: "CA parameters".into(),
            error,
        })?;
    params
        .distinguished_name
        .push(DnType::CommonName, ca_common_name(key));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Sets `params`' validity: from `NOT_BEFORE_BACKDATE_SECS` before `now` to `days` after it,
/// or to `cap` if that is sooner.
fn set_validity(
    params: &mut CertificateParams,
    now: SystemTime,
    days: u64,
    cap: Option<SystemTime>,
) -> Result<(), CertError> {
    let out_of_range = || CertError::ClockOutOfRange { now };
    let at = |t: Option<SystemTime>| {
        let secs = t?.duration_since(UNIX_EPOCH).ok()?.as_secs();
        OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()
    };
    params.not_before = at(now.checked_sub(Duration::from_secs(NOT_BEFORE_BACKDATE_SECS)))
        .ok_or_else(out_of_range)?;
    let not_after = days
        .checked_mul(SECS_PER_DAY)
        .and_then(|secs| now.checked_add(Duration::from_secs(secs)))
        .map(|t| cap.map_or(t, |cap| t.min(cap)));
    params.not_after = at(not_after).ok_or_else(out_of_range)?;
    Ok(())
}

/// Checks, as a TLS peer will, that `cert` chains to `ca` at `now` and names node `node`.
fn verify_chain(
    ca: &CertificateDer<'static>,
    cert: &CertificateDer<'_>,
    node: u16,
    now: SystemTime,
) -> Result<(), String> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| format!("the CA certificate is not usable as a root: {e}"))?;
    let verifier = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let name = node_server_name(node);
    let server_name = rustls_pki_types::ServerName::try_from(name.as_str())
        .map_err(|e| format!("{name} is not a DNS name: {e}"))?;
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("the clock says {}, before 1970", files::UtcTime(now)))?;
    verifier
        .verify_server_cert(
            cert,
            &[],
            &server_name,
            &[],
            UnixTime::since_unix_epoch(secs),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A cluster CA: its certificate and the key that signs node certificates.
#[derive(Debug, Clone)]
pub struct ClusterCa {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A node's certificate and key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct NodeCert {
    pub node: u16,
    pub cert_pem: String,
    pub key_pem: String,
}

impl ClusterCa {
    /// A new CA, valid for `CA_VALIDITY_DAYS` from now.
    pub fn generate() -> Result<Self, CertError> {
        ClusterCa::generate_at(SystemTime::now())
    }

    /// A new CA, valid for `CA_VALIDITY_DAYS` from `now`.
    pub fn generate_at(now: SystemTime) -> Result<Self, CertError> {
        let key = KeyPair::generate().map_err(|error| CertError::Generate {
            what: "CA key".into(),
            error,
        })?;
        let mut params = ca_params(&key)?;
        set_validity(&mut params, now, CA_VALIDITY_DAYS, None)?;
        let cert = params
            .self_signed(&key)
            .map_err(|error| CertError::Generate {
                what: "CA certificate".into(),
                error,
            })?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A new key and certificate for `node`, valid for `NODE_VALIDITY_DAYS` from now (at most
    /// until the CA expires), after the checks of `signer`.
    pub fn issue_node(&self, node: u16) -> Result<NodeCert, CertError> {
        self.issue_node_at(node, SystemTime::now())
    }

    /// `issue_node` as of `now`.
    pub fn issue_node_at(&self, node: u16, now: SystemTime) -> Result<NodeCert, CertError> {
        self.signer(now, FsPath::new("CA certificate"), FsPath::new("CA key"))?
            .issue(node, now)
    }

    /// The CA ready to sign at `now`, once checked: its certificate (read from `cert_path`) is a
    /// CA certificate, carries the public key of its key (read from `key_path`), and is valid
    /// at `now`. Errors name the two paths.
    fn signer(
        &self,
        now: SystemTime,
        cert_path: &FsPath,
        key_path: &FsPath,
    ) -> Result<CaSigner, CertError> {
        let parse_err = |path: &FsPath| {
            let path = path.to_path_buf();
            move |reason: String| CertError::Parse { path, reason }
        };
        let ca = parse_certificate(&self.cert_pem, cert_path)?;
        let (_, parsed) =
            X509Certificate::from_der(&ca).map_err(|e| parse_err(cert_path)(e.to_string()))?;
        let is_ca = parsed
            .basic_constraints()
            .map_err(|e| parse_err(cert_path)(e.to_string()))?
            .is_some_and(|constraints| constraints.value.ca);
        if !is_ca {
            return Err(CertError::NotCa {
                path: cert_path.to_path_buf(),
            });
        }
        let key =
            KeyPair::from_pem(&self.key_pem).map_err(|e| parse_err(key_path)(e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertError::CaKeyMismatch {
                key: key_path.to_path_buf(),
                cert: cert_path.to_path_buf(),
            });
        }
        let validity = files::Validity::of_certificate(&ca).map_err(parse_err(cert_path))?;
        if now < validity.not_before {
            return Err(CertError::NotYetValid {
                path: cert_path.to_path_buf(),
                validity,
                now,
            });
        }
        if now > validity.not_after {
            return Err(CertError::Expired {
                path: cert_path.to_path_buf(),
                validity,
                now,
            });
        }
        let issuer = Issuer::from_ca_cert_der(&ca, key).map_err(|error| CertError::Generate {
            what: format!("an issuer from {}", cert_path.display()),
            error,
        })?;
        Ok(CaSigner {
            issuer,
            ca,
            not_after: validity.not_after,
            cert_path: cert_path.to_path_buf(),
        })
    }
}

/// A CA whose certificate and key `ClusterCa::signer` checked: it signs node certificates.
struct CaSigner {
    issuer: Issuer<'static, KeyPair>,
    ca: CertificateDer<'static>,
    not_after: SystemTime,
    cert_path: PathBuf,
}

impl CaSigner {
    /// A new key and certificate for `node`, valid from `now` for `NODE_VALIDITY_DAYS` or until
    /// the CA expires if that is sooner, verified to chain to the CA and name the node.
    fn issue(&self, node: u16, now: SystemTime) -> Result<NodeCert, CertError> {
        let what = |w: &str| format!("{w} of node {node}");
        let key = KeyPair::generate().map_err(|error| CertError::Generate {
            what: what("key"),
            error,
        })?;
        let mut params = CertificateParams::new(vec![node_server_name(node)]).map_err(|error| {
            CertError::Generate {
                what: what("parameters"),
                error,
            }
        })?;
        params
            .distinguished_name
            .push(DnType::CommonName, node_server_name(node));
        set_validity(&mut params, now, NODE_VALIDITY_DAYS, Some(self.not_after))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|error| CertError::Generate {
                what: what("certificate"),
                error,
            })?;
        verify_chain(&self.ca, cert.der(), node, now).map_err(|reason| {
            CertError::NotIssuedByCa {
                cert: PathBuf::from(format!("the new certificate of node {node}")),
                ca: self.cert_path.clone(),
                name: node_server_name(node),
                reason,
            }
        })?;
        Ok(NodeCert {
            node,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// What an endpoint needs for mutual TLS: the cluster CA to trust and its own node identity.
#[derive(Debug)]
pub struct NodeCredentials {
    pub node: u16,
    pub ca: CertificateDer<'static>,
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl Clone for NodeCredentials {
    fn clone(&self) -> Self {
        NodeCredentials {
            node: self.node,
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl NodeCredentials {
    /// Credentials from PEM text; errors name the part (`CA certificate`, `node certificate`,
    /// `node key`). `load` reads them from a cert directory with its checks.
    pub fn from_pem(node: u16, ca_pem: &str, cert: &NodeCert) -> Result<Self, CertError> {
        Ok(NodeCredentials {
            node,
            ca: parse_certificate(ca_pem, FsPath::new("CA certificate"))?,
            cert: parse_certificate(&cert.cert_pem, FsPath::new("node certificate"))?,
            key: parse_key(&cert.key_pem, FsPath::new("node key"))?,
        })
    }
}

/// The first certificate of PEM text read from `path`.
fn parse_certificate(pem: &str, path: &FsPath) -> Result<CertificateDer<'static>, CertError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| CertError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The PKCS#8 private key of PEM text read from `path`.
fn parse_key(pem: &str, path: &FsPath) -> Result<PrivatePkcs8KeyDer<'static>, CertError> {
    let parse = |reason: String| CertError::Parse {
        path: path.to_path_buf(),
        reason,
    };
    match PrivateKeyDer::from_pem_slice(pem.as_bytes()) {
        Ok(PrivateKeyDer::Pkcs8(key)) => Ok(key),
        Ok(_) => Err(parse("expected a PKCS#8 key".into())),
        Err(e) => Err(parse(e.to_string())),
    }
}

fn tls_err(e: impl std::fmt::Display) -> CertError {
    CertError::Tls {
        reason: e.to_string(),
    }
}

/// QUIC timing shared by the transport and the bare-quinn baseline of the benchmark.
#[derive(Debug, Clone, Copy)]
pub struct QuicTiming {
    pub idle_timeout_ms: u64,
    pub keep_alive_interval_ms: Option<u64>,
}

/// quinn server and client configurations for mutual TLS 1.3 under the cluster CA, ring only.
pub fn quinn_configs(
    creds: &NodeCredentials,
    timing: QuicTiming,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), CertError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(creds.ca.clone()).map_err(tls_err)?;
    let roots = Arc::new(roots);
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
            .build()
            .map_err(tls_err)?;
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![creds.cert.clone()],
            PrivateKeyDer::Pkcs8(creds.key.clone_key()),
        )
        .map_err(tls_err)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(Arc::clone(&roots))
        .with_client_auth_cert(
            vec![creds.cert.clone()],
            PrivateKeyDer::Pkcs8(creds.key.clone_key()),
        )
        .map_err(tls_err)?;
    client.alpn_protocols = vec![ALPN.to_vec()];

    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(Duration::from_millis(timing.idle_timeout_ms))
        .map_err(tls_err)?;
    transport.max_idle_timeout(Some(idle));
    transport.keep_alive_interval(timing.keep_alive_interval_ms.map(Duration::from_millis));
    let transport = Arc::new(transport);

    let server_crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(tls_err)?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server_config.transport_config(Arc::clone(&transport));
    let client_crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(tls_err)?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_config.transport_config(transport);
    Ok((server_config, client_config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn cluster_certs_are_created_once_and_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        ensure_cluster_certs(dir.path(), &[1, 2]).expect("create");
        let before = fs::read_to_string(dir.path().join("ca.pem")).expect("ca");
        ensure_cluster_certs(dir.path(), &[1, 2, 3]).expect("extend");
        assert_eq!(
            before,
            fs::read_to_string(dir.path().join("ca.pem")).expect("ca")
        );
        let creds = NodeCredentials::load(dir.path(), 3).expect("load");
        let k1 = KeyPair::generate().expect("key");
        let k2 = KeyPair::generate().expect("key");
        assert_ne!(
            ca_common_name(&k1),
            ca_common_name(&k2),
            "each CA has its own name"
        );
        let reloaded = KeyPair::from_pem(&k1.serialize_pem()).expect("reload");
        assert_eq!(
            ca_common_name(&k1),
            ca_common_name(&reloaded),
            "stable across reloads"
        );
        quinn_configs(
            &creds,
            QuicTiming {
                idle_timeout_ms: 1000,
                keep_alive_interval_ms: None,
            },
        )
        .expect("configs");
        use std::os::unix::fs::PermissionsExt as _;
        for key in ["ca.key", "node-1.key"] {
            let mode = fs::metadata(dir.path().join(key))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key} mode {mode:o}");
        }
        let leaf = |node: u16| {
            let pem = fs::read_to_string(dir.path().join(format!("node-{node}.pem"))).expect("pem");
            CertificateDer::from_pem_slice(pem.as_bytes()).expect("der")
        };
        assert_eq!(verify_node_certificate(&leaf(3), 3), Ok(()));
        let err = verify_node_certificate(&leaf(3), 2).expect_err("node 3 is not node 2");
        assert!(err.contains("node-2.duplex"), "{err}");
        assert!(matches!(
            NodeCredentials::load(dir.path(), 9),
            Err(CertError::Read { .. })
        ));
    }
}
