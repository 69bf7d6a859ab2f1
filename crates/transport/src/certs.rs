//! The cluster's certificates: one CA per cluster, one certificate per node and one per client,
//! all made with rcgen. Only holders of a certificate signed by the cluster CA can connect
//! (mutual TLS 1.3), a dialer checks that the server's certificate names the node it meant to
//! reach, and an acceptor binds the endpoint a hello claims to the certificate's identity
//! (`verify_claimed_node`): node 0 is the clients' (`client.duplex`), node N ≥ 1 the holder of
//! `node-N.duplex`.
//!
//! Every certificate has an explicit validity (`CA_VALIDITY_DAYS`, `NODE_VALIDITY_DAYS`), so a
//! stolen node key stops working within a year and an operator has a date to plan renewal by.
//! Issuing checks the CA first (`CaSigner`): its certificate is a CA certificate, carries the
//! public key of the CA key, and is valid at the time of issue; a node certificate never outlives
//! its CA, and what is issued is verified to chain to the CA before anyone sees it.
//! The cert directory on disk (`ca.pem`, `ca.key`, `node-N.pem`, `node-N.key`,
//! `client-NAME.pem`, `client-NAME.key`), how it is
//! created, renewed and loaded, and what loading checks, is in `files`.
//! rustls is built with the ring provider only, passed explicitly, so no process-wide provider
//! has to be installed.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use thiserror::Error;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

mod files;

pub use crate::addr::CLIENT_NODE;

pub use files::{
    CA_EXPIRY_WARNING_DAYS, CertDirListing, CertFileSummary, EXPIRY_WARNING_DAYS, ExpiryWarning,
    UtcTime, Validity, ValidityStatus, check_client_expiry, check_expiry, ensure_client_cert,
    ensure_cluster_certs, read_cert_dir, renew_client_cert, renew_node_cert,
};

/// ALPN label of the cluster protocol; versions are negotiated inside, not by ALPN.
pub const ALPN: &[u8] = b"duplex";

/// How long a new cluster CA is valid: ten years, longer than most clusters' hardware lives,
/// because replacing a CA means re-issuing every node certificate at once.
pub const CA_VALIDITY_DAYS: u64 = 3650;

/// How long a new node or client certificate is valid: one year, renewed one at a time; less
/// when the CA expires sooner, since a certificate is no use after its issuer expires.
pub const NODE_VALIDITY_DAYS: u64 = 365;

/// The name (SAN) every client certificate carries, whatever the client's name: an acceptor
/// lets its holder claim a client endpoint `0.k` and nothing else.
pub const CLIENT_SERVER_NAME: &str = "client.duplex";

/// Longest client name, in bytes (ASCII).
pub const CLIENT_NAME_MAX_BYTES: usize = 32;

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
        "issuing {identity} needs the CA key {key}, which is not there: run this on the host \
         that holds the CA key, or copy it here (mode 0600)"
    )]
    CaKeyNeeded { key: PathBuf, identity: Identity },
    #[error(
        "node 0 is reserved for clients: endpoints 0.k are clients and carry a client \
         certificate (`duplex certs client --name NAME`); number nodes from 1"
    )]
    NodeZeroIsForClients,
    #[error(
        "{name:?} is not a client name: {reason} (a client name is 1 to {CLIENT_NAME_MAX_BYTES} \
         of a-z, 0-9 and '-')"
    )]
    BadClientName { name: String, reason: &'static str },
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

/// A client's name, as its certificate's common name and its files (`client-NAME.pem`) carry it:
/// 1 to `CLIENT_NAME_MAX_BYTES` of `a-z`, `0-9` and `-`, so it is safe in a file name and a log.
/// Only `ClientName::new` makes one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientName(String);

impl ClientName {
    /// Checks `name` (`BadClientName` with the reason).
    pub fn new(name: &str) -> Result<Self, CertError> {
        let bad = |reason| CertError::BadClientName {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(bad("it is empty"));
        }
        if name.len() > CLIENT_NAME_MAX_BYTES {
            return Err(bad("it is too long"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad("it has a character other than a-z, 0-9 and '-'"));
        }
        Ok(ClientName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ClientName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ClientName {
    type Err = CertError;

    fn from_str(name: &str) -> Result<Self, CertError> {
        ClientName::new(name)
    }
}

/// Whom a certificate the cluster CA issued names: a node (SAN `node-N.duplex`, N ≥ 1), which
/// may claim any of its CPUs `N.k`, or a client (SAN `client.duplex`, common name its
/// `ClientName`), which may claim client endpoints `0.k`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Identity {
    Node(u16),
    Client(ClientName),
}

impl Identity {
    /// The name (SAN) the certificate carries and a TLS peer checks.
    pub fn server_name(&self) -> String {
        match self {
            Identity::Node(node) => node_server_name(*node),
            Identity::Client(_) => CLIENT_SERVER_NAME.to_owned(),
        }
    }

    /// How errors name the certificate's holder: `node-N.duplex`, `client NAME`.
    fn certificate_name(&self) -> String {
        match self {
            Identity::Node(node) => node_server_name(*node),
            Identity::Client(name) => format!("client {name}"),
        }
    }

    /// The certificate's common name: the node's server name, or the client's name.
    fn common_name(&self) -> String {
        match self {
            Identity::Node(node) => node_server_name(*node),
            Identity::Client(name) => name.to_string(),
        }
    }

    /// Whether this identity may claim endpoints of `node` in a hello.
    pub fn may_claim(&self, node: u16) -> bool {
        match self {
            Identity::Node(own) => *own == node && node != CLIENT_NODE,
            Identity::Client(_) => node == CLIENT_NODE,
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Node(node) => write!(f, "node {node}"),
            Identity::Client(name) => write!(f, "client {name}"),
        }
    }
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

/// The DNS names (SANs) a DER certificate carries, in its order.
pub fn certificate_dns_names(cert: &[u8]) -> Result<Vec<String>, String> {
    let (_, parsed) =
        X509Certificate::from_der(cert).map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("unparsable subject alternative names: {e}"))?;
    Ok(san
        .into_iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
        .collect())
}

/// Whether `name` is a node certificate's name, `node-N.duplex` for some N.
fn is_node_server_name(name: &str) -> bool {
    name.strip_prefix("node-")
        .and_then(|rest| rest.strip_suffix(".duplex"))
        .is_some_and(|number| !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
}

/// Binds the node a hello claims to the peer's (already chain-verified) certificate, as the
/// acceptor does: a client endpoint (node `CLIENT_NODE`) needs a client certificate (SAN
/// `client.duplex`) that names no node; node N ≥ 1 needs a certificate valid for
/// `node-N.duplex` that is not a client certificate. So a client can never pose as a CPU, nor a
/// CPU as a client. The error says what the certificate is valid for.
pub fn verify_claimed_node(cert: &CertificateDer<'_>, node: u16) -> Result<(), String> {
    let names = certificate_dns_names(cert)?;
    let valid_for = || {
        if names.is_empty() {
            "no name".to_owned()
        } else {
            names.join(", ")
        }
    };
    let is_client = names.iter().any(|n| n == CLIENT_SERVER_NAME);
    let names_a_node = names.iter().any(|n| is_node_server_name(n));
    if node == CLIENT_NODE {
        if !is_client || names_a_node {
            return Err(format!(
                "a client endpoint needs a client certificate ({CLIENT_SERVER_NAME}); this \
                 certificate is valid for {}",
                valid_for()
            ));
        }
        return Ok(());
    }
    let name = node_server_name(node);
    let not_valid = || {
        format!(
            "certificate is not valid for {name}: it is valid for {}",
            valid_for()
        )
    };
    if is_client {
        return Err(not_valid());
    }
    let server_name =
        rustls_pki_types::ServerName::try_from(name.as_str()).map_err(|_| not_valid())?;
    let parsed = rustls::server::ParsedCertificate::try_from(cert)
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    rustls::client::verify_server_name(&parsed, &server_name).map_err(|_| not_valid())
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

/// Checks, as a TLS peer will, that `cert` chains to `ca` at `now` and names `identity`: a node
/// certificate as a dialer checks a server's, a client certificate as an acceptor checks a
/// client's (so its client-auth usage is checked too), then its SAN, that it names no node, and
/// its common name.
fn verify_chain(
    ca: &CertificateDer<'static>,
    cert: &CertificateDer<'_>,
    identity: &Identity,
    now: SystemTime,
) -> Result<(), String> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| format!("the CA certificate is not usable as a root: {e}"))?;
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("the clock says {}, before 1970", files::UtcTime(now)))?;
    let now = UnixTime::since_unix_epoch(secs);
    match identity {
        Identity::Node(node) => {
            if *node == CLIENT_NODE {
                return Err(CertError::NodeZeroIsForClients.to_string());
            }
            let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| e.to_string())?;
            let name = node_server_name(*node);
            let server_name = rustls_pki_types::ServerName::try_from(name.as_str())
                .map_err(|e| format!("{name} is not a DNS name: {e}"))?;
            verifier
                .verify_server_cert(cert, &[], &server_name, &[], now)
                .map_err(|e| e.to_string())?;
        }
        Identity::Client(name) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| e.to_string())?;
            verifier
                .verify_client_cert(cert, &[], now)
                .map_err(|e| e.to_string())?;
            let names = certificate_dns_names(cert)?;
            if !names.iter().any(|n| n == CLIENT_SERVER_NAME)
                || names.iter().any(|n| is_node_server_name(n))
            {
                return Err(format!(
                    "not a client certificate: it is valid for {}, not only {CLIENT_SERVER_NAME}",
                    names.join(", ")
                ));
            }
            let common_name = certificate_common_name(cert)?;
            if common_name != name.as_str() {
                return Err(format!(
                    "it is the certificate of client {common_name:?}, not of {:?}",
                    name.as_str()
                ));
            }
        }
    }
    Ok(())
}

/// The subject's common name of a DER certificate.
fn certificate_common_name(cert: &[u8]) -> Result<String, String> {
    let (_, parsed) =
        X509Certificate::from_der(cert).map_err(|e| format!("unparsable certificate: {e}"))?;
    let common_name = parsed
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| "its subject has no common name".to_owned())?;
    common_name
        .as_str()
        .map(str::to_owned)
        .map_err(|e| format!("unreadable common name: {e}"))
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

/// A client's certificate and key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub name: ClientName,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A new certificate and key, PEM-encoded, for the identity it was issued to.
#[derive(Debug, Clone)]
struct IssuedCert {
    identity: Identity,
    cert_pem: String,
    key_pem: String,
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
    /// until the CA expires), after the checks of `signer`. Node 0 is the clients'
    /// (`NodeZeroIsForClients`).
    pub fn issue_node(&self, node: u16) -> Result<NodeCert, CertError> {
        self.issue_node_at(node, SystemTime::now())
    }

    /// `issue_node` as of `now`.
    pub fn issue_node_at(&self, node: u16, now: SystemTime) -> Result<NodeCert, CertError> {
        let issued = self
            .signer(now, FsPath::new("CA certificate"), FsPath::new("CA key"))?
            .issue(&Identity::Node(node), now)?;
        Ok(NodeCert {
            node,
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
        })
    }

    /// A new key and client certificate for client `name` (SAN `client.duplex`, common name
    /// `name`, client-auth usage only), valid as a node certificate is, after the checks of
    /// `signer`.
    pub fn issue_client(&self, name: &ClientName) -> Result<ClientCert, CertError> {
        self.issue_client_at(name, SystemTime::now())
    }

    /// `issue_client` as of `now`.
    pub fn issue_client_at(
        &self,
        name: &ClientName,
        now: SystemTime,
    ) -> Result<ClientCert, CertError> {
        let issued = self
            .signer(now, FsPath::new("CA certificate"), FsPath::new("CA key"))?
            .issue(&Identity::Client(name.clone()), now)?;
        Ok(ClientCert {
            name: name.clone(),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
        })
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

/// A CA whose certificate and key `ClusterCa::signer` checked: it signs node and client
/// certificates.
struct CaSigner {
    issuer: Issuer<'static, KeyPair>,
    ca: CertificateDer<'static>,
    not_after: SystemTime,
    cert_path: PathBuf,
}

impl CaSigner {
    /// A new key and certificate for `identity`, valid from `now` for `NODE_VALIDITY_DAYS` or
    /// until the CA expires if that is sooner, verified to chain to the CA and name the
    /// identity. A client certificate is for client authentication only.
    fn issue(&self, identity: &Identity, now: SystemTime) -> Result<IssuedCert, CertError> {
        if *identity == Identity::Node(CLIENT_NODE) {
            return Err(CertError::NodeZeroIsForClients);
        }
        let what = |w: &str| format!("{w} of {identity}");
        let key = KeyPair::generate().map_err(|error| CertError::Generate {
            what: what("key"),
            error,
        })?;
        let mut params = CertificateParams::new(vec![identity.server_name()]).map_err(|error| {
            CertError::Generate {
                what: what("parameters"),
                error,
            }
        })?;
        params
            .distinguished_name
            .push(DnType::CommonName, identity.common_name());
        if let Identity::Client(_) = identity {
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        set_validity(&mut params, now, NODE_VALIDITY_DAYS, Some(self.not_after))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|error| CertError::Generate {
                what: what("certificate"),
                error,
            })?;
        verify_chain(&self.ca, cert.der(), identity, now).map_err(|reason| {
            CertError::NotIssuedByCa {
                cert: PathBuf::from(format!("the new certificate of {identity}")),
                ca: self.cert_path.clone(),
                name: identity.certificate_name(),
                reason,
            }
        })?;
        Ok(IssuedCert {
            identity: identity.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// What an endpoint needs for mutual TLS: the cluster CA to trust, and its own identity (a
/// node's or a client's) with its certificate and key. A node loads them with
/// `Credentials::load_node`, a client with `Credentials::load_client`.
#[derive(Debug)]
pub struct Credentials {
    pub identity: Identity,
    pub ca: CertificateDer<'static>,
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

/// The name the testbed and `bin/duplex`'s tests still use for `Credentials`, with `load`,
/// `load_at` and `from_pem` for a node; to go once they call `Credentials::load_node`.
pub type NodeCredentials = Credentials;

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Credentials {
            identity: self.identity.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Credentials {
    /// Node credentials from PEM text; errors name the part (`CA certificate`,
    /// `node certificate`, `node key`). `load_node` reads them from a cert directory with its
    /// checks.
    pub fn from_node_pem(node: u16, ca_pem: &str, cert: &NodeCert) -> Result<Self, CertError> {
        Credentials::from_parts(Identity::Node(node), ca_pem, &cert.cert_pem, &cert.key_pem)
    }

    /// Client credentials from PEM text, as `from_node_pem`.
    pub fn from_client_pem(ca_pem: &str, cert: &ClientCert) -> Result<Self, CertError> {
        Credentials::from_parts(
            Identity::Client(cert.name.clone()),
            ca_pem,
            &cert.cert_pem,
            &cert.key_pem,
        )
    }

    fn from_parts(
        identity: Identity,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, CertError> {
        let part = match identity {
            Identity::Node(_) => "node",
            Identity::Client(_) => "client",
        };
        Ok(Credentials {
            ca: parse_certificate(ca_pem, FsPath::new("CA certificate"))?,
            cert: parse_certificate(cert_pem, FsPath::new(&format!("{part} certificate")))?,
            key: parse_key(key_pem, FsPath::new(&format!("{part} key")))?,
            identity,
        })
    }

    /// `from_node_pem` under its old name.
    pub fn from_pem(node: u16, ca_pem: &str, cert: &NodeCert) -> Result<Self, CertError> {
        Credentials::from_node_pem(node, ca_pem, cert)
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
/// A client's credentials make a client configuration that presents its client certificate;
/// its server configuration is never answered by a node (nodes never dial clients).
pub fn quinn_configs(
    creds: &Credentials,
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
        let creds = Credentials::load_node(dir.path(), 3).expect("load");
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
        assert_eq!(verify_claimed_node(&leaf(3), 3), Ok(()));
        let err = verify_claimed_node(&leaf(3), 2).expect_err("node 3 is not node 2");
        assert!(err.contains("node-2.duplex"), "{err}");
        assert!(matches!(
            Credentials::load_node(dir.path(), 9),
            Err(CertError::Read { .. })
        ));
    }

    fn client(name: &str) -> ClientName {
        ClientName::new(name).expect("client name")
    }

    #[test]
    fn client_names_are_checked() {
        for good in ["a", "web-1", "0", "-", &"x".repeat(CLIENT_NAME_MAX_BYTES)] {
            assert_eq!(ClientName::new(good).expect(good).as_str(), good);
        }
        let too_long = "x".repeat(CLIENT_NAME_MAX_BYTES + 1);
        for (bad, why) in [
            ("", "empty"),
            (too_long.as_str(), "too long"),
            ("Web", "a character"),
            ("a_b", "a character"),
            ("a/b", "a character"),
            ("..", "a character"),
            ("é", "a character"),
            ("a b", "a character"),
        ] {
            match ClientName::new(bad) {
                Err(e @ CertError::BadClientName { .. }) => {
                    let message = e.to_string();
                    assert!(
                        message.contains(why) && message.contains("a-z, 0-9 and '-'"),
                        "{bad:?}: {message}"
                    );
                }
                other => panic!("{bad:?} accepted: {other:?}"),
            }
        }
        assert!("web-2".parse::<ClientName>().is_ok());
    }

    #[test]
    fn client_certificates_are_issued_loaded_and_bound_to_client_endpoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        ensure_cluster_certs(dir.path(), &[1]).expect("nodes");
        let web = client("web-1");
        ensure_client_cert(dir.path(), &web).expect("client");
        let pem = fs::read(dir.path().join("client-web-1.pem")).expect("pem");
        ensure_client_cert(dir.path(), &web).expect("again");
        assert_eq!(
            fs::read(dir.path().join("client-web-1.pem")).expect("pem"),
            pem,
            "an existing client certificate is kept"
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(dir.path().join("client-web-1.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "client key mode {mode:o}");

        let creds = Credentials::load_client(dir.path(), &web).expect("load");
        assert_eq!(creds.identity, Identity::Client(web.clone()));
        assert_eq!(
            certificate_dns_names(&creds.cert).expect("names"),
            [CLIENT_SERVER_NAME]
        );
        assert_eq!(certificate_common_name(&creds.cert).expect("CN"), "web-1");
        let (_, parsed) = X509Certificate::from_der(&creds.cert).expect("parse");
        let usage = parsed
            .extended_key_usage()
            .expect("EKU")
            .expect("an EKU extension")
            .value;
        assert!(usage.client_auth && !usage.server_auth, "{usage:?}");
        quinn_configs(
            &creds,
            QuicTiming {
                idle_timeout_ms: 1000,
                keep_alive_interval_ms: None,
            },
        )
        .expect("configs from client credentials");

        // The acceptor's binding: a client certificate claims client endpoints only, a node
        // certificate never claims one.
        let node_1 = Credentials::load_node(dir.path(), 1).expect("node 1");
        assert_eq!(verify_claimed_node(&creds.cert, CLIENT_NODE), Ok(()));
        let err = verify_claimed_node(&creds.cert, 1).expect_err("a client is not node 1");
        assert!(
            err.contains("not valid for node-1.duplex") && err.contains(CLIENT_SERVER_NAME),
            "{err}"
        );
        let err = verify_claimed_node(&node_1.cert, CLIENT_NODE).expect_err("node 1 is no client");
        assert!(err.contains("valid for node-1.duplex"), "{err}");

        // Another client's files under this client's name are refused.
        let other = client("other");
        assert!(matches!(
            Credentials::load_client(dir.path(), &other),
            Err(CertError::Read { .. })
        ));
        for ext in ["pem", "key"] {
            fs::copy(
                dir.path().join(format!("client-web-1.{ext}")),
                dir.path().join(format!("client-other.{ext}")),
            )
            .expect("copy");
        }
        match Credentials::load_client(dir.path(), &other) {
            Err(CertError::NotIssuedByCa { reason, .. }) => {
                assert!(reason.contains("\"web-1\""), "{reason}");
            }
            other => panic!("another client's certificate: {other:?}"),
        }
        // A node certificate is not a client certificate.
        for ext in ["pem", "key"] {
            fs::copy(
                dir.path().join(format!("node-1.{ext}")),
                dir.path().join(format!("client-other.{ext}")),
            )
            .expect("copy");
        }
        assert!(matches!(
            Credentials::load_client(dir.path(), &other),
            Err(CertError::NotIssuedByCa { .. })
        ));
        fs::remove_file(dir.path().join("client-other.pem")).expect("remove");
        fs::remove_file(dir.path().join("client-other.key")).expect("remove");

        renew_client_cert(dir.path(), &web).expect("renew");
        assert_ne!(
            fs::read(dir.path().join("client-web-1.pem")).expect("pem"),
            pem
        );
        Credentials::load_client(dir.path(), &web).expect("the renewed pair loads");
        assert_eq!(
            check_client_expiry(dir.path(), &web, SystemTime::now()).expect("check"),
            Vec::new()
        );
        let listing = read_cert_dir(dir.path(), SystemTime::now()).expect("list");
        assert!(listing.problems.is_empty(), "{:?}", listing.problems);
        let subjects: Vec<_> = listing.certs.iter().map(|c| c.subject.as_str()).collect();
        assert_eq!(subjects[1..], ["CN=node-1.duplex", "CN=web-1"]);
    }

    #[test]
    fn node_zero_is_reserved_for_clients() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        assert!(matches!(
            ensure_cluster_certs(&certs, &[0, 1]),
            Err(CertError::NodeZeroIsForClients)
        ));
        assert!(!certs.exists(), "nothing written when node 0 is asked for");
        ensure_cluster_certs(&certs, &[1]).expect("nodes from 1");
        for refused in [
            renew_node_cert(&certs, 0).map(|_| ()),
            Credentials::load_node(&certs, 0).map(|_| ()),
        ] {
            assert!(
                matches!(refused, Err(CertError::NodeZeroIsForClients)),
                "{refused:?}"
            );
        }
        let ca = ClusterCa {
            cert_pem: fs::read_to_string(certs.join("ca.pem")).expect("ca"),
            key_pem: fs::read_to_string(certs.join("ca.key")).expect("ca key"),
        };
        assert!(matches!(
            ca.issue_node(0),
            Err(CertError::NodeZeroIsForClients)
        ));

        // A node-0 certificate made before clients had their own (as the testbed's were) is
        // no client certificate: refused for a client endpoint, and listed as a problem.
        let issuer_key = KeyPair::from_pem(&ca.key_pem).expect("CA key");
        let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, issuer_key).expect("issuer");
        let key = KeyPair::generate().expect("key");
        let old = CertificateParams::new(vec![node_server_name(0)])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("sign");
        let err = verify_claimed_node(old.der(), CLIENT_NODE).expect_err("old node-0 cert");
        assert!(err.contains("valid for node-0.duplex"), "{err}");
        fs::write(certs.join("node-0.pem"), old.pem()).expect("write");
        let listing = read_cert_dir(&certs, SystemTime::now()).expect("list");
        assert!(
            listing
                .problems
                .iter()
                .any(|p| matches!(p, CertError::NodeZeroIsForClients)),
            "{:?}",
            listing.problems
        );
    }
}
