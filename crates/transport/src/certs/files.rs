//! A cluster's cert directory on disk: `ca.pem`, `ca.key`, `node-N.pem`, `node-N.key`,
//! `client-NAME.pem`, `client-NAME.key` (keys mode 0600) and `certs.lock`; how it is created,
//! renewed and loaded, and what loading checks. A client's pair is treated as a node's in every
//! step below ("a leaf": a node's or a client's certificate with its key).
//!
//! Why it is written the way it is:
//! - The processes of a local cluster start at once and each calls `ensure_cluster_certs`; they
//!   must end with one CA. Creation and renewal hold an exclusive lock (`flock`) on
//!   `certs.lock`, which the kernel releases when its holder dies, so one process creates and
//!   the others, once they hold the lock, find and use what it wrote. Loading, `check_expiry`
//!   and listing hold a shared lock, so they never see a node's new key with its old
//!   certificate. The lock file is never deleted: deleting it would let two processes lock two
//!   different files.
//! - Each step writes a pair (the CA's key and certificate, or a leaf's): both files are first
//!   written under temporary names of the writer's own (`.NAME.PID-RANDOM.tmp`), synced, and
//!   the directory synced; then each takes its name, the key first, with a directory sync after
//!   each. CA files take their name with `link`, which fails if the name exists, so a CA file is
//!   never overwritten, even by a process that does not take the lock; node files with `rename`.
//!   A crash therefore leaves the old pair, the new pair, or the new key with the new
//!   certificate complete under its temporary name.
//! - Creation and renewal, under the lock and before anything else, finish what a crash
//!   interrupted: a `ca.key` without `ca.pem` gets the temporary CA certificate that carries its
//!   public key, and a `node-N.key` or `client-NAME.key` whose certificate is not its own gets
//!   the temporary certificate that is. Then every temporary file is removed.
//! - A CA key without its certificate (and without such a temporary one) is an error, never a
//!   reason to make a new CA: node certificates that key issued may be in use, and a new CA
//!   would cut them off.
//! - Issuing checks the CA first (`ClusterCa::signer`): `ca.pem` is a CA certificate with
//!   `ca.key`'s public key, valid now.
//! - Loading refuses a cert directory that group or others may write, a key that group or
//!   others may access or that another user owns, a file that is not a regular file (opened
//!   without blocking, so a FIFO cannot hang it), a key that is not its certificate's, a
//!   certificate outside its validity, and a node (client) certificate that does not chain to
//!   `ca.pem` or does not name the node (is not that client's client certificate), with errors
//!   naming the file and the dates. Node 0 is the clients': no `node-0` pair is issued or loaded. It logs when each
//!   certificate expires and warns when one expires within its warning period
//!   (`CA_EXPIRY_WARNING_DAYS`, `EXPIRY_WARNING_DAYS`); `check_expiry` repeats that for a
//!   running node.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::OFlag;
use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{
    CLIENT_NODE, CertError, ClientName, ClusterCa, Credentials, Identity, IssuedCert, SECS_PER_DAY,
    parse_certificate, parse_key, verify_chain,
};

/// How long before a node certificate expires loading starts to warn: long enough to renew in
/// an ordinary maintenance window, or to notice a failed automatic renewal and fix it.
pub const EXPIRY_WARNING_DAYS: u64 = 30;

/// How long before the CA certificate expires loading starts to warn: replacing a CA means a
/// new cert directory for every node and a restart of the whole cluster, which takes planning.
pub const CA_EXPIRY_WARNING_DAYS: u64 = 365;

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const LOCK_FILE: &str = "certs.lock";

/// Permission bits of a key file: its owner may read and write it, nobody else anything.
const KEY_MODE: u32 = 0o600;
/// Permission bits of a certificate file: public information.
const CERT_MODE: u32 = 0o644;
/// Permission bits a key file must not have: any access by group or others.
const KEY_FORBIDDEN_MODE_BITS: u32 = 0o077;
/// Permission bits a cert directory must not have: writing by group or others.
const DIR_FORBIDDEN_MODE_BITS: u32 = 0o022;

/// A leaf's file names without their extension: `node-N`, `client-NAME`.
fn leaf_file_stem(identity: &Identity) -> String {
    match identity {
        Identity::Node(node) => format!("node-{node}"),
        Identity::Client(name) => format!("client-{name}"),
    }
}

fn cert_file(identity: &Identity) -> String {
    format!("{}.pem", leaf_file_stem(identity))
}

fn key_file(identity: &Identity) -> String {
    format!("{}.key", leaf_file_stem(identity))
}

/// A point in time shown as a UTC date and time, e.g. `2026-04-20 09:30:00 UTC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcTime(pub SystemTime);

impl fmt::Display for UtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = unix_secs(self.0);
        match OffsetDateTime::from_unix_timestamp(secs) {
            Ok(t) => write!(
                f,
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            ),
            Err(_) => write!(f, "{secs} s since 1970-01-01 UTC"),
        }
    }
}

/// Seconds since the Unix epoch, negative before it, saturated at the ends of `i64`.
fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

fn from_unix_secs(secs: i64) -> SystemTime {
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

/// When a certificate may be used, as it states: from `not_before` to `not_after`, both
/// included (X.509).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Where `now` falls in a certificate's validity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidityStatus {
    NotYetValid,
    /// Valid, and for more than its warning period.
    Valid {
        remaining_secs: u64,
    },
    /// Valid, but expires within its warning period: time to renew.
    ExpiresSoon {
        remaining_secs: u64,
    },
    Expired,
}

impl Validity {
    /// The validity a DER certificate states.
    pub fn of_certificate(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        Ok(Validity {
            not_before: from_unix_secs(cert.validity().not_before.timestamp()),
            not_after: from_unix_secs(cert.validity().not_after.timestamp()),
        })
    }

    /// Where `now` falls, with a warning period of `warning_days` before expiry.
    pub fn status_at(&self, now: SystemTime, warning_days: u64) -> ValidityStatus {
        if now < self.not_before {
            return ValidityStatus::NotYetValid;
        }
        match self.not_after.duration_since(now) {
            Err(_) => ValidityStatus::Expired,
            Ok(remaining) if remaining.as_secs() <= warning_days.saturating_mul(SECS_PER_DAY) => {
                ValidityStatus::ExpiresSoon {
                    remaining_secs: remaining.as_secs(),
                }
            }
            Ok(remaining) => ValidityStatus::Valid {
                remaining_secs: remaining.as_secs(),
            },
        }
    }
}

/// A certificate that loading accepted but that expires within its warning period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiryWarning {
    pub path: PathBuf,
    pub not_after: SystemTime,
    pub remaining_secs: u64,
    /// The warning period: `CA_EXPIRY_WARNING_DAYS` or `EXPIRY_WARNING_DAYS`.
    pub warning_days: u64,
}

impl fmt::Display for ExpiryWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} expires at {}, in {} days (warning starts {} days before): renew it \
             (docs/transport.md, Certificates)",
            self.path.display(),
            UtcTime(self.not_after),
            self.remaining_secs / SECS_PER_DAY,
            self.warning_days
        )
    }
}

/// One certificate file of a cert directory, as `duplex certs show` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFileSummary {
    pub path: PathBuf,
    /// The subject's distinguished name, e.g. `CN=node-1.duplex`.
    pub subject: String,
    pub validity: Validity,
    /// The warning period: `CA_EXPIRY_WARNING_DAYS` for the CA, else `EXPIRY_WARNING_DAYS`.
    pub warning_days: u64,
}

impl CertFileSummary {
    pub fn status_at(&self, now: SystemTime) -> ValidityStatus {
        self.validity.status_at(now, self.warning_days)
    }
}

/// What `read_cert_dir` found: the certificates it could read, and every problem it found.
#[derive(Debug, Default)]
pub struct CertDirListing {
    /// The CA certificate first, then node certificates by node number, then client
    /// certificates by name.
    pub certs: Vec<CertFileSummary>,
    /// A directory writable by others, a certificate that does not parse, and for each node or
    /// client certificate: its key missing, accessible by others, or not its key, or (when both
    /// are valid now) the certificate not chaining to `ca.pem` or not naming its holder; a
    /// `node-0` pair (node 0 is the clients').
    pub problems: Vec<CertError>,
}

/// The CA certificate and every node and client certificate in `dir`, with the problems found
/// at `now`. Other files are ignored. Fails only when the directory cannot be read or locked.
pub fn read_cert_dir(dir: &Path, now: SystemTime) -> Result<CertDirListing, CertError> {
    let read_err = |error| CertError::Read {
        path: dir.to_path_buf(),
        error,
    };
    let mut listing = CertDirListing::default();
    if let Err(problem) = check_dir(dir) {
        listing.problems.push(problem);
    }
    let _lock = lock_cert_dir(dir, LockMode::Shared)?;
    let mut files: Vec<(Option<Identity>, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == CA_CERT_FILE {
            files.push((None, entry.path()));
        } else if let Some(identity) = identity_of_cert_file(name) {
            files.push((Some(identity), entry.path()));
        }
    }
    // The CA (`None`) sorts first, so leaves can be checked against it; then nodes by number,
    // then clients by name.
    files.sort();
    let mut ca: Option<(CertificateDer<'static>, Validity)> = None;
    for (identity, path) in files {
        let warning_days = match identity {
            None => CA_EXPIRY_WARNING_DAYS,
            Some(_) => EXPIRY_WARNING_DAYS,
        };
        let (der, summary) = match summarize(&path, warning_days) {
            Ok(read) => read,
            Err(problem) => {
                listing.problems.push(problem);
                continue;
            }
        };
        match identity {
            None => ca = Some((der, summary.validity)),
            Some(identity) => {
                if let Err(problem) =
                    check_leaf_pair(dir, &identity, &der, summary.validity, ca.as_ref(), now)
                {
                    listing.problems.push(problem);
                }
            }
        }
        listing.certs.push(summary);
    }
    Ok(listing)
}

/// Whose certificate file `name` is (`node-7.pem`, `client-web-1.pem`), if it is a leaf's.
fn identity_of_cert_file(name: &str) -> Option<Identity> {
    let stem = name.strip_suffix(".pem")?;
    let identity = if let Some(number) = stem.strip_prefix("node-") {
        Identity::Node(number.parse::<u16>().ok()?)
    } else {
        Identity::Client(ClientName::new(stem.strip_prefix("client-")?).ok()?)
    };
    (cert_file(&identity) == name).then_some(identity)
}

fn summarize(
    path: &Path,
    warning_days: u64,
) -> Result<(CertificateDer<'static>, CertFileSummary), CertError> {
    let der = parse_certificate(&read(path)?, path)?;
    let parse_err = |reason: String| CertError::Parse {
        path: path.to_path_buf(),
        reason,
    };
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| parse_err(e.to_string()))?;
    let subject = cert.subject().to_string();
    let validity = Validity::of_certificate(&der).map_err(parse_err)?;
    let summary = CertFileSummary {
        path: path.to_path_buf(),
        subject,
        validity,
        warning_days,
    };
    Ok((der, summary))
}

/// `show`'s checks of a node or client certificate: it is not node 0's, its key is there,
/// private and its own, and (when it and the CA are valid at `now`) it chains to the CA and
/// names its holder.
fn check_leaf_pair(
    dir: &Path,
    identity: &Identity,
    cert: &CertificateDer<'static>,
    validity: Validity,
    ca: Option<&(CertificateDer<'static>, Validity)>,
    now: SystemTime,
) -> Result<(), CertError> {
    if *identity == Identity::Node(CLIENT_NODE) {
        return Err(CertError::NodeZeroIsForClients);
    }
    let cert_path = dir.join(cert_file(identity));
    let key_path = dir.join(key_file(identity));
    let key = parse_key(&read_secret(&key_path)?, &key_path)?;
    check_key_matches(&key, &key_path, cert, &cert_path)?;
    let valid_now = |v: Validity| v.not_before <= now && now <= v.not_after;
    match ca {
        Some((ca, ca_validity)) if valid_now(*ca_validity) && valid_now(validity) => {
            verify_chain(ca, cert, identity, now).map_err(|reason| CertError::NotIssuedByCa {
                cert: cert_path,
                ca: dir.join(CA_CERT_FILE),
                name: identity.certificate_name(),
                reason,
            })
        }
        _ => Ok(()),
    }
}

/// Creates the CA and the certificates of `nodes` in `dir` unless they already exist, after
/// finishing what a crash interrupted. Safe to call from several processes at once: they end
/// with one CA. Never replaces a CA file; a CA key without its certificate is
/// `CertError::CaCertMissing`. The CA key is read only when a node certificate has to be
/// issued, so it may be kept elsewhere once every node has one. Node 0 is the clients'
/// (`NodeZeroIsForClients`, before anything is written): use `ensure_client_cert`.
pub fn ensure_cluster_certs(dir: &Path, nodes: &[u16]) -> Result<(), CertError> {
    if nodes.contains(&CLIENT_NODE) {
        return Err(CertError::NodeZeroIsForClients);
    }
    let leaves: Vec<Identity> = nodes.iter().map(|node| Identity::Node(*node)).collect();
    ensure_certs(dir, &leaves)
}

/// Creates the CA (if there is none yet) and client `name`'s certificate
/// (`client-NAME.pem`, `client-NAME.key`) in `dir` unless it exists, as `ensure_cluster_certs`
/// does for nodes, with the same lock and crash safety.
pub fn ensure_client_cert(dir: &Path, name: &ClientName) -> Result<(), CertError> {
    ensure_certs(dir, &[Identity::Client(name.clone())])
}

/// `ensure_cluster_certs` for any leaves.
fn ensure_certs(dir: &Path, leaves: &[Identity]) -> Result<(), CertError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|error| CertError::Write {
            path: dir.to_path_buf(),
            error,
        })?;
    let parent = parent_dir(dir);
    sync_dir(parent).map_err(|error| CertError::Write {
        path: parent.to_path_buf(),
        error,
    })?;
    check_dir(dir)?;
    let _lock = lock_cert_dir(dir, LockMode::Exclusive)?;
    finish_interrupted(dir)?;
    let now = SystemTime::now();
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let (ca_cert_pem, created_ca_key_pem) = match (exists(&ca_cert_path)?, exists(&ca_key_path)?) {
        (true, _) => {
            let pem = read(&ca_cert_path)?;
            parse_certificate(&pem, &ca_cert_path)?;
            (pem, None)
        }
        (false, true) => {
            return Err(CertError::CaCertMissing {
                key: ca_key_path,
                cert: ca_cert_path,
            });
        }
        (false, false) => {
            let ca = ClusterCa::generate_at(now)?;
            publish_ca(dir, &ca)?;
            (ca.cert_pem, Some(ca.key_pem))
        }
    };
    let mut missing = Vec::new();
    for identity in leaves {
        if !exists(&dir.join(cert_file(identity)))? {
            missing.push(identity);
        }
    }
    let Some(&first) = missing.first() else {
        return Ok(());
    };
    let ca = ClusterCa {
        cert_pem: ca_cert_pem,
        key_pem: match created_ca_key_pem {
            Some(key_pem) => key_pem,
            None => read_ca_key(&ca_key_path, first)?,
        },
    };
    let signer = ca.signer(now, &ca_cert_path, &ca_key_path)?;
    for identity in missing {
        publish_leaf(dir, &signer.issue(identity, now)?)?;
    }
    Ok(())
}

/// Issues `node` a new key and certificate under the CA in `dir`, replacing its old pair, after
/// finishing what a crash interrupted. A crash part way leaves the old pair or the new key with
/// the new certificate under a temporary name; the next `ensure_cluster_certs` or renewal
/// finishes it. A running node keeps its old certificate until it restarts.
pub fn renew_node_cert(dir: &Path, node: u16) -> Result<(), CertError> {
    if node == CLIENT_NODE {
        return Err(CertError::NodeZeroIsForClients);
    }
    renew_cert(dir, &Identity::Node(node))
}

/// `renew_node_cert` for client `name`.
pub fn renew_client_cert(dir: &Path, name: &ClientName) -> Result<(), CertError> {
    renew_cert(dir, &Identity::Client(name.clone()))
}

fn renew_cert(dir: &Path, identity: &Identity) -> Result<(), CertError> {
    check_dir(dir)?;
    let _lock = lock_cert_dir(dir, LockMode::Exclusive)?;
    finish_interrupted(dir)?;
    let now = SystemTime::now();
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca = ClusterCa {
        cert_pem: read(&ca_cert_path)?,
        key_pem: read_ca_key(&ca_key_path, identity)?,
    };
    let cert = ca
        .signer(now, &ca_cert_path, &ca_key_path)?
        .issue(identity, now)?;
    publish_leaf(dir, &cert)
}

/// The CA key, needed to issue `identity`.
fn read_ca_key(path: &Path, identity: &Identity) -> Result<String, CertError> {
    read_secret(path).map_err(|e| match e {
        CertError::Read { path, error } if error.kind() == io::ErrorKind::NotFound => {
            CertError::CaKeyNeeded {
                key: path,
                identity: identity.clone(),
            }
        }
        other => other,
    })
}

impl Credentials {
    /// Loads node `node`'s credentials from a cert directory made by `ensure_cluster_certs`,
    /// with the checks of `load_node_at` at the current time; logs when the CA and node
    /// certificates expire (info) and its warnings (warn). A running node re-checks with
    /// `check_expiry`.
    pub fn load_node(dir: &Path, node: u16) -> Result<Self, CertError> {
        Credentials::load_logged(dir, Identity::Node(node))
    }

    /// Loads client `name`'s credentials from a cert directory made by `ensure_client_cert`, as
    /// `load_node` does a node's. A client re-checks with `check_client_expiry`.
    pub fn load_client(dir: &Path, name: &ClientName) -> Result<Self, CertError> {
        Credentials::load_logged(dir, Identity::Client(name.clone()))
    }

    /// Loads node `node`'s credentials as they stand at `now`, under a shared lock on the cert
    /// directory. Refuses a directory that group or others may write, a key that group or
    /// others may access or that another user owns, a key that is not the certificate's, a CA
    /// or node certificate that is not yet or no longer valid, and a node certificate that
    /// does not chain to the CA or does not name node `node`; returns a warning for each of the
    /// two certificates that expires within its warning period. Node 0 is the clients'
    /// (`NodeZeroIsForClients`).
    pub fn load_node_at(
        dir: &Path,
        node: u16,
        now: SystemTime,
    ) -> Result<(Self, Vec<ExpiryWarning>), CertError> {
        Credentials::load_identity_at(dir, Identity::Node(node), now)
    }

    /// `load_node_at` for client `name`: its certificate must chain to the CA and be a client
    /// certificate (SAN `client.duplex`, client-auth usage) with common name `name`.
    pub fn load_client_at(
        dir: &Path,
        name: &ClientName,
        now: SystemTime,
    ) -> Result<(Self, Vec<ExpiryWarning>), CertError> {
        Credentials::load_identity_at(dir, Identity::Client(name.clone()), now)
    }

    /// `load_node` under its old name.
    pub fn load(dir: &Path, node: u16) -> Result<Self, CertError> {
        Credentials::load_node(dir, node)
    }

    /// `load_node_at` under its old name.
    pub fn load_at(
        dir: &Path,
        node: u16,
        now: SystemTime,
    ) -> Result<(Self, Vec<ExpiryWarning>), CertError> {
        Credentials::load_node_at(dir, node, now)
    }

    fn load_logged(dir: &Path, identity: Identity) -> Result<Self, CertError> {
        let (credentials, warnings) =
            Credentials::load_identity_at(dir, identity, SystemTime::now())?;
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(cert_file(&credentials.identity));
        let not_after = |path: &Path, der: &[u8]| {
            Validity::of_certificate(der)
                .map(|validity| UtcTime(validity.not_after))
                .map_err(|reason| CertError::Parse {
                    path: path.to_path_buf(),
                    reason,
                })
        };
        let identity = credentials.identity.to_string();
        tracing::info!(
            %identity,
            "loaded {}: it expires at {}, the CA {} at {}",
            cert_path.display(),
            not_after(&cert_path, &credentials.cert)?,
            ca_path.display(),
            not_after(&ca_path, &credentials.ca)?,
        );
        for warning in &warnings {
            tracing::warn!(%identity, "{warning}");
        }
        Ok(credentials)
    }

    fn load_identity_at(
        dir: &Path,
        identity: Identity,
        now: SystemTime,
    ) -> Result<(Self, Vec<ExpiryWarning>), CertError> {
        if identity == Identity::Node(CLIENT_NODE) {
            return Err(CertError::NodeZeroIsForClients);
        }
        check_dir(dir)?;
        let _lock = lock_cert_dir(dir, LockMode::Shared)?;
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(cert_file(&identity));
        let key_path = dir.join(key_file(&identity));
        let ca = parse_certificate(&read(&ca_path)?, &ca_path)?;
        let cert = parse_certificate(&read(&cert_path)?, &cert_path)?;
        let key = parse_key(&read_secret(&key_path)?, &key_path)?;
        check_key_matches(&key, &key_path, &cert, &cert_path)?;
        let warnings = check_validity(
            [
                (&ca_path, &ca, CA_EXPIRY_WARNING_DAYS),
                (&cert_path, &cert, EXPIRY_WARNING_DAYS),
            ],
            now,
        )?;
        verify_chain(&ca, &cert, &identity, now).map_err(|reason| CertError::NotIssuedByCa {
            cert: cert_path,
            ca: ca_path,
            name: identity.certificate_name(),
            reason,
        })?;
        Ok((
            Credentials {
                identity,
                ca,
                cert,
                key,
            },
            warnings,
        ))
    }
}

/// Re-checks, at `now`, the CA certificate and node `node`'s certificate in `dir`, as `load`
/// does at startup: for a running node to call periodically (daily is plenty), logging the
/// warnings at warn level and an error at error level. Returns a warning for each certificate
/// that expires within its warning period, and `Expired` or `NotYetValid` for one outside its
/// validity. It reads the files: after a renewal that the node has not yet restarted to use, it
/// reports on the new certificate, not the one in use.
pub fn check_expiry(
    dir: &Path,
    node: u16,
    now: SystemTime,
) -> Result<Vec<ExpiryWarning>, CertError> {
    check_expiry_of(dir, &Identity::Node(node), now)
}

/// `check_expiry` for client `name`'s certificate.
pub fn check_client_expiry(
    dir: &Path,
    name: &ClientName,
    now: SystemTime,
) -> Result<Vec<ExpiryWarning>, CertError> {
    check_expiry_of(dir, &Identity::Client(name.clone()), now)
}

fn check_expiry_of(
    dir: &Path,
    identity: &Identity,
    now: SystemTime,
) -> Result<Vec<ExpiryWarning>, CertError> {
    let _lock = lock_cert_dir(dir, LockMode::Shared)?;
    let ca_path = dir.join(CA_CERT_FILE);
    let cert_path = dir.join(cert_file(identity));
    let ca = parse_certificate(&read(&ca_path)?, &ca_path)?;
    let cert = parse_certificate(&read(&cert_path)?, &cert_path)?;
    check_validity(
        [
            (&ca_path, &ca, CA_EXPIRY_WARNING_DAYS),
            (&cert_path, &cert, EXPIRY_WARNING_DAYS),
        ],
        now,
    )
}

/// Refuses a certificate outside its validity at `now`; a warning for one within its warning
/// period.
fn check_validity<const N: usize>(
    certs: [(&PathBuf, &CertificateDer<'_>, u64); N],
    now: SystemTime,
) -> Result<Vec<ExpiryWarning>, CertError> {
    let mut warnings = Vec::new();
    for (path, der, warning_days) in certs {
        let path = path.clone();
        let validity = Validity::of_certificate(der).map_err(|reason| CertError::Parse {
            path: path.clone(),
            reason,
        })?;
        match validity.status_at(now, warning_days) {
            ValidityStatus::NotYetValid => {
                return Err(CertError::NotYetValid {
                    path,
                    validity,
                    now,
                });
            }
            ValidityStatus::Expired => {
                return Err(CertError::Expired {
                    path,
                    validity,
                    now,
                });
            }
            ValidityStatus::ExpiresSoon { remaining_secs } => warnings.push(ExpiryWarning {
                path,
                not_after: validity.not_after,
                remaining_secs,
                warning_days,
            }),
            ValidityStatus::Valid { .. } => {}
        }
    }
    Ok(warnings)
}

/// Checks that `key` is the private key of the public key `cert` carries.
fn check_key_matches(
    key: &PrivatePkcs8KeyDer<'_>,
    key_path: &Path,
    cert: &CertificateDer<'_>,
    cert_path: &Path,
) -> Result<(), CertError> {
    let key_pair = KeyPair::try_from(key.secret_pkcs8_der()).map_err(|e| CertError::Parse {
        path: key_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let public_key = certificate_public_key(cert).map_err(|reason| CertError::Parse {
        path: cert_path.to_path_buf(),
        reason,
    })?;
    if public_key == key_pair.public_key_raw() {
        Ok(())
    } else {
        Err(CertError::KeyMismatch {
            key: key_path.to_path_buf(),
            cert: cert_path.to_path_buf(),
        })
    }
}

/// The public key a DER certificate carries.
fn certificate_public_key(der: &[u8]) -> Result<Vec<u8>, String> {
    let (_, parsed) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    Ok(parsed.public_key().subject_public_key.data.to_vec())
}

/// The public key of the certificate in the file at `path`, if it holds one.
fn certificate_file_public_key(path: &Path) -> Option<Vec<u8>> {
    let der = parse_certificate(&read(path).ok()?, path).ok()?;
    certificate_public_key(&der).ok()
}

/// The public key of the private key in the file at `path`.
fn key_file_public_key(path: &Path) -> Result<Vec<u8>, CertError> {
    let key = KeyPair::from_pem(&read_secret(path)?).map_err(|e| CertError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(key.public_key_raw().to_vec())
}

/// Refuses a cert directory that group or others may write: they could swap a certificate or
/// a key under a node.
fn check_dir(dir: &Path) -> Result<(), CertError> {
    let metadata = fs::metadata(dir).map_err(|error| CertError::Read {
        path: dir.to_path_buf(),
        error,
    })?;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & DIR_FORBIDDEN_MODE_BITS != 0 {
        return Err(CertError::DirWritableByOthers {
            path: dir.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Which lock `lock_cert_dir` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockMode {
    /// Creation and renewal: one holder, no shared holders. Creates `certs.lock`.
    Exclusive,
    /// Loading and listing: any number of holders, no exclusive holder. Opens `certs.lock`
    /// read-only, and takes no lock if there is none (a directory made by hand or copied).
    Shared,
}

/// Holds the cert directory's lock until dropped; blocks while another process holds it in a
/// conflicting mode, after logging that it waits.
fn lock_cert_dir(dir: &Path, mode: LockMode) -> Result<Option<File>, CertError> {
    let path = dir.join(LOCK_FILE);
    let lock_err = |path: &Path| {
        let path = path.to_path_buf();
        move |error| CertError::Lock { path, error }
    };
    let file = match mode {
        LockMode::Exclusive => fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(KEY_MODE)
            .open(&path),
        LockMode::Shared => match File::open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            opened => opened,
        },
    }
    .map_err(lock_err(&path))?;
    let attempt = match mode {
        LockMode::Exclusive => file.try_lock(),
        LockMode::Shared => file.try_lock_shared(),
    };
    match attempt {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            tracing::warn!(
                "waiting for {} held by another process (creating or renewing certificates)",
                path.display()
            );
            match mode {
                LockMode::Exclusive => file.lock(),
                LockMode::Shared => file.lock_shared(),
            }
            .map_err(lock_err(&path))?;
        }
        Err(fs::TryLockError::Error(error)) => return Err(lock_err(&path)(error)),
    }
    Ok(Some(file))
}

/// A file written and synced under a temporary name of its writer's own, not yet published.
#[derive(Debug)]
struct Staged {
    temp: PathBuf,
    path: PathBuf,
}

/// Writes `text` to a new temporary file for `dir/name`, created with permission bits `mode`
/// (so a key is never readable by others, not even briefly), and syncs it. The name carries the
/// process id and a random number, so no two writers share one.
fn stage(dir: &Path, name: &str, text: &str, mode: u32) -> Result<Staged, CertError> {
    let temp = dir.join(format!(
        ".{name}.{}-{:016x}{TEMP_SUFFIX}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let write_err = |error| CertError::Write {
        path: temp.clone(),
        error,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .map_err(write_err)?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err)?;
    Ok(Staged {
        temp,
        path: dir.join(name),
    })
}

const TEMP_SUFFIX: &str = ".tmp";

/// Publishes a new CA: both files staged and the directory synced, then the key linked to
/// `ca.key` and the certificate to `ca.pem` (`link` fails if the name exists), each followed
/// by a directory sync, then the temporary names removed.
fn publish_ca(dir: &Path, ca: &ClusterCa) -> Result<(), CertError> {
    let key = stage(dir, CA_KEY_FILE, &ca.key_pem, KEY_MODE)?;
    let cert = stage(dir, CA_CERT_FILE, &ca.cert_pem, CERT_MODE)?;
    sync_cert_dir(dir)?;
    for staged in [&key, &cert] {
        fs::hard_link(&staged.temp, &staged.path).map_err(|error| CertError::Write {
            path: staged.path.clone(),
            error,
        })?;
        sync_cert_dir(dir)?;
    }
    for staged in [&key, &cert] {
        fs::remove_file(&staged.temp).map_err(|error| CertError::Write {
            path: staged.temp.clone(),
            error,
        })?;
    }
    sync_cert_dir(dir)
}

/// Publishes a leaf's pair: both files staged and the directory synced, then the key renamed
/// over `node-N.key` (`client-NAME.key`) and the certificate over `node-N.pem`
/// (`client-NAME.pem`), each followed by a directory sync.
fn publish_leaf(dir: &Path, cert: &IssuedCert) -> Result<(), CertError> {
    let key = stage(dir, &key_file(&cert.identity), &cert.key_pem, KEY_MODE)?;
    let cert = stage(dir, &cert_file(&cert.identity), &cert.cert_pem, CERT_MODE)?;
    sync_cert_dir(dir)?;
    for staged in [key, cert] {
        fs::rename(&staged.temp, &staged.path).map_err(|error| CertError::Write {
            path: staged.path.clone(),
            error,
        })?;
        sync_cert_dir(dir)?;
    }
    Ok(())
}

/// The temporary files in `dir`, each with the name it was written for.
fn temp_files(dir: &Path) -> Result<Vec<(PathBuf, String)>, CertError> {
    let read_err = |error| CertError::Read {
        path: dir.to_path_buf(),
        error,
    };
    let mut temps = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        if !entry.file_type().map_err(read_err)?.is_file() {
            continue;
        }
        let name = entry.file_name();
        let Some(inner) = name
            .to_str()
            .and_then(|name| name.strip_prefix('.'))
            .and_then(|name| name.strip_suffix(TEMP_SUFFIX))
        else {
            continue;
        };
        // `NAME.PID-RANDOM`; an older version wrote `.NAME.tmp`.
        let target = match inner.rsplit_once('.') {
            Some((target, unique))
                if unique.contains('-')
                    && unique.chars().all(|c| c == '-' || c.is_ascii_hexdigit()) =>
            {
                target
            }
            _ => inner,
        };
        temps.push((entry.path(), target.to_owned()));
    }
    temps.sort();
    Ok(temps)
}

/// Under the exclusive lock: finishes what a crash interrupted, then removes every temporary
/// file. A `ca.key` without `ca.pem` gets the temporary `ca.pem` that carries its public key
/// (never a new CA); a `node-N.key` (`client-NAME.key`) whose certificate is missing or not its
/// own gets the temporary certificate that is.
fn finish_interrupted(dir: &Path) -> Result<(), CertError> {
    let temps = temp_files(dir)?;
    if temps.is_empty() {
        return Ok(());
    }
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    if !exists(&ca_cert_path)? && exists(&ca_key_path)? {
        let key_public = key_file_public_key(&ca_key_path)?;
        if let Some((temp, _)) = temps.iter().find(|(temp, target)| {
            target == CA_CERT_FILE
                && certificate_file_public_key(temp).as_ref() == Some(&key_public)
        }) {
            fs::hard_link(temp, &ca_cert_path).map_err(|error| CertError::Write {
                path: ca_cert_path.clone(),
                error,
            })?;
            sync_cert_dir(dir)?;
            tracing::warn!(
                "finished creating the CA that a crash interrupted: {} is now {}",
                temp.display(),
                ca_cert_path.display()
            );
        }
    }
    for (temp, target) in &temps {
        let Some(identity) = identity_of_cert_file(target) else {
            continue;
        };
        let key_path = dir.join(key_file(&identity));
        let cert_path = dir.join(target);
        if !exists(&key_path)? {
            continue;
        }
        let key_public = Some(key_file_public_key(&key_path)?);
        if certificate_file_public_key(&cert_path) != key_public
            && certificate_file_public_key(temp) == key_public
        {
            fs::rename(temp, &cert_path).map_err(|error| CertError::Write {
                path: cert_path.clone(),
                error,
            })?;
            sync_cert_dir(dir)?;
            tracing::warn!(
                "finished issuing {identity} the pair that a crash interrupted: {} is now {}",
                temp.display(),
                cert_path.display()
            );
        }
    }
    for (temp, _) in &temps {
        match fs::remove_file(temp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(CertError::Write {
                    path: temp.clone(),
                    error: e,
                });
            }
            _ => {}
        }
    }
    sync_cert_dir(dir)
}

/// The directory holding `path`: `.` for a bare name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Makes the names created, linked, renamed or removed in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `sync_dir` of the cert directory, its error naming it.
fn sync_cert_dir(dir: &Path) -> Result<(), CertError> {
    sync_dir(dir).map_err(|error| CertError::Write {
        path: dir.to_path_buf(),
        error,
    })
}

fn exists(path: &Path) -> Result<bool, CertError> {
    path.try_exists().map_err(|error| CertError::Read {
        path: path.to_path_buf(),
        error,
    })
}

/// Opens `path` for reading without blocking (a FIFO in its place returns at once) and refuses
/// anything but a regular file.
fn open_regular(path: &Path) -> Result<(File, fs::Metadata), CertError> {
    let read_err = |error| CertError::Read {
        path: path.to_path_buf(),
        error,
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(read_err)?;
    let metadata = file.metadata().map_err(read_err)?;
    if !metadata.is_file() {
        return Err(CertError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    Ok((file, metadata))
}

fn read(path: &Path) -> Result<String, CertError> {
    let (file, _) = open_regular(path)?;
    read_text(file, path)
}

fn read_text(mut file: File, path: &Path) -> Result<String, CertError> {
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|error| CertError::Read {
            path: path.to_path_buf(),
            error,
        })?;
    Ok(text)
}

/// Reads a private key, refusing it if group or others may access it or another user owns it.
/// Mode and owner are checked on the opened file, so they are those of the bytes read.
fn read_secret(path: &Path) -> Result<String, CertError> {
    let (file, metadata) = open_regular(path)?;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & KEY_FORBIDDEN_MODE_BITS != 0 {
        return Err(CertError::KeyAccessibleByOthers {
            path: path.to_path_buf(),
            mode,
        });
    }
    let user = nix::unistd::geteuid().as_raw();
    if metadata.uid() != user {
        return Err(CertError::KeyNotOwnedByUser {
            path: path.to_path_buf(),
            owner: metadata.uid(),
            user,
        });
    }
    read_text(file, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(SECS_PER_DAY);

    #[test]
    fn validity_status_at_its_edges() {
        let not_before = UNIX_EPOCH + DAY * 20_000;
        let validity = Validity {
            not_before,
            not_after: not_before + DAY * 100,
        };
        let warn_from = validity.not_after - DAY * EXPIRY_WARNING_DAYS as u32;
        let second = Duration::from_secs(1);
        let cases = [
            (not_before - second, ValidityStatus::NotYetValid),
            (
                not_before,
                ValidityStatus::Valid {
                    remaining_secs: 100 * SECS_PER_DAY,
                },
            ),
            (
                warn_from - second,
                ValidityStatus::Valid {
                    remaining_secs: EXPIRY_WARNING_DAYS * SECS_PER_DAY + 1,
                },
            ),
            (
                warn_from,
                ValidityStatus::ExpiresSoon {
                    remaining_secs: EXPIRY_WARNING_DAYS * SECS_PER_DAY,
                },
            ),
            (
                validity.not_after,
                ValidityStatus::ExpiresSoon { remaining_secs: 0 },
            ),
            (validity.not_after + second, ValidityStatus::Expired),
        ];
        for (now, expected) in cases {
            assert_eq!(
                validity.status_at(now, EXPIRY_WARNING_DAYS),
                expected,
                "at {}",
                UtcTime(now)
            );
        }
    }

    #[test]
    fn utc_time_shows_a_date_and_time() {
        assert_eq!(
            UtcTime(UNIX_EPOCH + Duration::from_secs(1_700_000_000)).to_string(),
            "2023-11-14 22:13:20 UTC"
        );
        assert_eq!(
            UtcTime(UNIX_EPOCH - DAY).to_string(),
            "1969-12-31 00:00:00 UTC"
        );
    }

    #[test]
    fn loading_at_a_later_time_warns_then_refuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let issued = SystemTime::now();
        ensure_cluster_certs(dir.path(), &[1]).expect("create");
        let node_cert = dir.path().join("node-1.pem");
        let (_, warnings) =
            Credentials::load_node_at(dir.path(), 1, issued + DAY * 334).expect("31 days left");
        assert_eq!(warnings, Vec::new());
        let (_, warnings) =
            Credentials::load_node_at(dir.path(), 1, issued + DAY * 336).expect("29 days left");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].path, node_cert);
        // 29 days less the moments between `issued` and the issue, in whole days.
        assert!(
            (28..=29).contains(&(warnings[0].remaining_secs / SECS_PER_DAY)),
            "{}",
            warnings[0]
        );
        match Credentials::load_node_at(dir.path(), 1, issued + DAY * 366) {
            Err(CertError::Expired { path, .. }) => assert_eq!(path, node_cert),
            other => panic!("a year and a day later: {other:?}"),
        }
        match Credentials::load_node_at(dir.path(), 1, issued - DAY) {
            Err(CertError::NotYetValid { path, .. }) => {
                assert_eq!(path, dir.path().join("ca.pem"));
            }
            other => panic!("a day before issue: {other:?}"),
        }
    }

    #[test]
    fn a_cert_dir_lists_the_ca_then_nodes_by_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        ensure_cluster_certs(dir.path(), &[10, 2, 1]).expect("create");
        fs::write(dir.path().join("node-x.pem"), "not a node").expect("write");
        fs::write(dir.path().join("node-01.pem"), "not a node either").expect("write");
        let listing = read_cert_dir(dir.path(), SystemTime::now()).expect("list");
        assert!(listing.problems.is_empty(), "{:?}", listing.problems);
        let listed = listing.certs;
        let names: Vec<_> = listed
            .iter()
            .map(|c| {
                c.path
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, ["ca.pem", "node-1.pem", "node-2.pem", "node-10.pem"]);
        assert!(listed[0].subject.starts_with("CN=Duplex cluster CA "));
        assert_eq!(listed[3].subject, "CN=node-10.duplex");
    }

    #[test]
    fn renewing_replaces_a_node_certificate_under_the_same_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        ensure_cluster_certs(dir.path(), &[1]).expect("create");
        let read = |name: &str| fs::read(dir.path().join(name)).expect("read");
        let (ca, cert, key) = (read("ca.pem"), read("node-1.pem"), read("node-1.key"));
        renew_node_cert(dir.path(), 1).expect("renew");
        assert_eq!(read("ca.pem"), ca);
        assert_ne!(read("node-1.pem"), cert);
        assert_ne!(read("node-1.key"), key);
        Credentials::load_node(dir.path(), 1).expect("the renewed pair loads");

        fs::remove_file(dir.path().join("ca.key")).expect("CA key kept elsewhere");
        match renew_node_cert(dir.path(), 1) {
            Err(CertError::CaKeyNeeded { key, identity }) => {
                assert_eq!(
                    (key, identity),
                    (dir.path().join("ca.key"), Identity::Node(1))
                );
            }
            other => panic!("renewing without the CA key: {other:?}"),
        }
        ensure_cluster_certs(dir.path(), &[1])
            .expect("nothing to issue, so the CA key is not needed");
    }
}
