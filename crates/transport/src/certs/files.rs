//! A cluster's cert directory on disk: `ca.pem`, `ca.key`, `node-N.pem`, `node-N.key` (keys
//! mode 0600) and `certs.lock`; how it is created, renewed and loaded, and what loading checks.
//!
//! Why it is written the way it is:
//! - The processes of a local cluster start at once and each calls `ensure_cluster_certs`; they
//!   must end with one CA. Creation and renewal hold an exclusive lock (`flock`) on
//!   `certs.lock`, which the kernel releases when its holder dies, so one process creates and
//!   the others, once they hold the lock, find and use what it wrote. The lock file is never
//!   deleted: deleting it would let two processes lock two different files.
//! - Every file is written under a temporary name, synced, given its final name, and then the
//!   directory is synced: a reader, or the next start after a crash, sees the old file or the
//!   new one, never a torn one. CA files take their name with `link`, which fails if the name
//!   exists, so a CA key is never overwritten, even by a process that does not take the lock.
//!   Node files are replaced with `rename` (renewal).
//! - A CA key without its certificate is an error, never a reason to make a new CA: node
//!   certificates that key issued may be in use, and a new CA would cut them off.
//! - Loading refuses a key that group or others may access, a key that is not its
//!   certificate's, and a certificate outside its validity, with errors naming the file and the
//!   dates; it warns when the CA or node certificate expires within `EXPIRY_WARNING_DAYS`.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{CertError, ClusterCa, NodeCredentials, SECS_PER_DAY, parse_certificate, parse_key};

/// How long before a certificate expires loading starts to warn: long enough to renew in an
/// ordinary maintenance window, or to notice a failed automatic renewal and fix it.
pub const EXPIRY_WARNING_DAYS: u64 = 30;

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const LOCK_FILE: &str = "certs.lock";

/// Permission bits of a key file: its owner may read and write it, nobody else anything.
const KEY_MODE: u32 = 0o600;
/// Permission bits of a certificate file: public information.
const CERT_MODE: u32 = 0o644;
/// Permission bits a key file must not have: any access by group or others.
const KEY_FORBIDDEN_MODE_BITS: u32 = 0o077;

fn node_cert_file(node: u16) -> String {
    format!("node-{node}.pem")
}

fn node_key_file(node: u16) -> String {
    format!("node-{node}.key")
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
    /// Valid, and for more than `EXPIRY_WARNING_DAYS`.
    Valid {
        remaining_secs: u64,
    },
    /// Valid, but expires within `EXPIRY_WARNING_DAYS`: time to renew.
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

    pub fn status_at(&self, now: SystemTime) -> ValidityStatus {
        if now < self.not_before {
            return ValidityStatus::NotYetValid;
        }
        match self.not_after.duration_since(now) {
            Err(_) => ValidityStatus::Expired,
            Ok(remaining) if remaining.as_secs() <= EXPIRY_WARNING_DAYS * SECS_PER_DAY => {
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

/// A certificate that loading accepted but that expires within `EXPIRY_WARNING_DAYS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiryWarning {
    pub path: PathBuf,
    pub not_after: SystemTime,
    pub remaining_secs: u64,
}

impl fmt::Display for ExpiryWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} expires at {}, in {} days (warning starts {EXPIRY_WARNING_DAYS} days before): \
             renew it (docs/transport.md, Certificates)",
            self.path.display(),
            UtcTime(self.not_after),
            self.remaining_secs / SECS_PER_DAY
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
}

/// The CA certificate and every node certificate in `dir`, CA first, then by node number.
/// Other files are ignored.
pub fn read_cert_dir(dir: &Path) -> Result<Vec<CertFileSummary>, CertError> {
    let read_err = |error| CertError::Read {
        path: dir.to_path_buf(),
        error,
    };
    let mut files: Vec<(Option<u16>, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == CA_CERT_FILE {
            files.push((None, entry.path()));
        } else if let Some(node) = name
            .strip_prefix("node-")
            .and_then(|rest| rest.strip_suffix(".pem"))
            .and_then(|number| number.parse::<u16>().ok())
            .filter(|node| node_cert_file(*node) == name)
        {
            files.push((Some(node), entry.path()));
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|(_, path)| {
            let der = parse_certificate(&read(&path)?, &path)?;
            let parse_err = |reason: String| CertError::Parse {
                path: path.clone(),
                reason,
            };
            let (_, cert) =
                X509Certificate::from_der(&der).map_err(|e| parse_err(e.to_string()))?;
            let subject = cert.subject().to_string();
            let validity = Validity::of_certificate(&der).map_err(parse_err)?;
            Ok(CertFileSummary {
                path,
                subject,
                validity,
            })
        })
        .collect()
}

/// Creates the CA and the certificates of `nodes` in `dir` unless they already exist. Safe to
/// call from several processes at once: they end with one CA. Never replaces a CA file; a CA
/// key without its certificate is `CertError::CaCertMissing`. The CA key is read only when a
/// node certificate has to be issued, so it may be kept elsewhere once every node has one.
pub fn ensure_cluster_certs(dir: &Path, nodes: &[u16]) -> Result<(), CertError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| sync_dir(parent_dir(dir)))
        .map_err(|error| CertError::Write {
            path: dir.to_path_buf(),
            error,
        })?;
    let _lock = lock_cert_dir(dir)?;
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let (ca_cert_pem, created_ca_key_pem) = match (exists(&ca_cert_path)?, exists(&ca_key_path)?) {
        (true, _) => (read(&ca_cert_path)?, None),
        (false, true) => {
            return Err(CertError::CaCertMissing {
                key: ca_key_path,
                cert: ca_cert_path,
            });
        }
        (false, false) => {
            let ca = ClusterCa::generate()?;
            write_file(&ca_key_path, &ca.key_pem, KEY_MODE, Publish::CreateOnly)?;
            write_file(&ca_cert_path, &ca.cert_pem, CERT_MODE, Publish::CreateOnly)?;
            (ca.cert_pem, Some(ca.key_pem))
        }
    };
    let mut missing = Vec::new();
    for &node in nodes {
        if !exists(&dir.join(node_cert_file(node)))? {
            missing.push(node);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let ca = ClusterCa {
        cert_pem: ca_cert_pem,
        key_pem: match created_ca_key_pem {
            Some(key_pem) => key_pem,
            None => read_secret(&ca_key_path)?,
        },
    };
    for node in missing {
        issue_into(dir, &ca, node)?;
    }
    Ok(())
}

/// Issues `node` a new key and certificate under the CA in `dir`, replacing its old ones (each
/// file atomically; a crash between the two leaves a pair that loading refuses as
/// `KeyMismatch` and that renewing again repairs). A running node keeps its old certificate
/// until it restarts.
pub fn renew_node_cert(dir: &Path, node: u16) -> Result<(), CertError> {
    let _lock = lock_cert_dir(dir)?;
    let ca = ClusterCa {
        cert_pem: read(&dir.join(CA_CERT_FILE))?,
        key_pem: read_secret(&dir.join(CA_KEY_FILE))?,
    };
    issue_into(dir, &ca, node)
}

/// Writes a new key and certificate for `node`, the key first: the certificate's presence is
/// what says the node has been issued.
fn issue_into(dir: &Path, ca: &ClusterCa, node: u16) -> Result<(), CertError> {
    let cert = ca.issue_node(node)?;
    write_file(
        &dir.join(node_key_file(node)),
        &cert.key_pem,
        KEY_MODE,
        Publish::Replace,
    )?;
    write_file(
        &dir.join(node_cert_file(node)),
        &cert.cert_pem,
        CERT_MODE,
        Publish::Replace,
    )
}

impl NodeCredentials {
    /// Loads node `node`'s credentials from a cert directory made by `ensure_cluster_certs`,
    /// with the checks of `load_at` at the current time, and logs its warnings at warn level.
    pub fn load(dir: &Path, node: u16) -> Result<Self, CertError> {
        let (credentials, warnings) = NodeCredentials::load_at(dir, node, SystemTime::now())?;
        for warning in &warnings {
            tracing::warn!(node, "{warning}");
        }
        Ok(credentials)
    }

    /// Loads node `node`'s credentials as they stand at `now`. Refuses a key that group or
    /// others may access, a key that is not the certificate's, and a CA or node certificate
    /// that is not yet or no longer valid; returns a warning for each of the two that expires
    /// within `EXPIRY_WARNING_DAYS`.
    pub fn load_at(
        dir: &Path,
        node: u16,
        now: SystemTime,
    ) -> Result<(Self, Vec<ExpiryWarning>), CertError> {
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(node_cert_file(node));
        let key_path = dir.join(node_key_file(node));
        let ca = parse_certificate(&read(&ca_path)?, &ca_path)?;
        let cert = parse_certificate(&read(&cert_path)?, &cert_path)?;
        let key = parse_key(&read_secret(&key_path)?, &key_path)?;
        check_key_matches(&key, &key_path, &cert, &cert_path)?;
        let mut warnings = Vec::new();
        for (path, der) in [(ca_path, &ca), (cert_path, &cert)] {
            let validity = Validity::of_certificate(der).map_err(|reason| CertError::Parse {
                path: path.clone(),
                reason,
            })?;
            match validity.status_at(now) {
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
                }),
                ValidityStatus::Valid { .. } => {}
            }
        }
        Ok((
            NodeCredentials {
                node,
                ca,
                cert,
                key,
            },
            warnings,
        ))
    }
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
    let (_, parsed) = X509Certificate::from_der(cert).map_err(|e| CertError::Parse {
        path: cert_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if parsed.public_key().subject_public_key.data.as_ref() == key_pair.public_key_raw() {
        Ok(())
    } else {
        Err(CertError::KeyMismatch {
            key: key_path.to_path_buf(),
            cert: cert_path.to_path_buf(),
        })
    }
}

/// Holds the cert directory's lock until dropped; blocks while another process holds it.
fn lock_cert_dir(dir: &Path) -> Result<File, CertError> {
    let path = dir.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(KEY_MODE)
        .open(&path)
        .map_err(|error| CertError::Lock {
            path: path.clone(),
            error,
        })?;
    file.lock()
        .map_err(|error| CertError::Lock { path, error })?;
    Ok(file)
}

/// How a written temporary file takes its final name.
#[derive(Debug, Clone, Copy)]
enum Publish {
    /// `link`: fails if the name exists, so nothing is ever overwritten.
    CreateOnly,
    /// `rename`: atomically replaces whatever has the name.
    Replace,
}

/// Writes `text` to `path` atomically with permission bits `mode`: a temporary file in the same
/// directory, created with `mode` (so a key is never readable by others, not even briefly),
/// synced, published, then the directory synced. Callers hold the directory's lock, so the
/// temporary name is theirs alone; one left by a crash is removed first.
fn write_file(path: &Path, text: &str, mode: u32, publish: Publish) -> Result<(), CertError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |error| CertError::Write { path, error }
    };
    let dir = parent_dir(path);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.tmp"));
    match fs::remove_file(&temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(write_err(&temp)(e)),
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .map_err(write_err(&temp))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err(&temp))?;
    drop(file);
    match publish {
        Publish::CreateOnly => {
            fs::hard_link(&temp, path).map_err(write_err(path))?;
            fs::remove_file(&temp).map_err(write_err(&temp))?;
        }
        Publish::Replace => fs::rename(&temp, path).map_err(write_err(path))?,
    }
    sync_dir(dir).map_err(write_err(dir))
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

fn exists(path: &Path) -> Result<bool, CertError> {
    path.try_exists().map_err(|error| CertError::Read {
        path: path.to_path_buf(),
        error,
    })
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|error| CertError::Read {
        path: path.to_path_buf(),
        error,
    })
}

/// Reads a private key, refusing it if group or others may access it. The mode is checked on
/// the opened file, so it is the mode of the bytes read.
fn read_secret(path: &Path) -> Result<String, CertError> {
    let read_err = |error| CertError::Read {
        path: path.to_path_buf(),
        error,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o7777;
    if mode & KEY_FORBIDDEN_MODE_BITS != 0 {
        return Err(CertError::KeyAccessibleByOthers {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read_err)?;
    Ok(text)
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
            assert_eq!(validity.status_at(now), expected, "at {}", UtcTime(now));
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
            NodeCredentials::load_at(dir.path(), 1, issued + DAY * 334).expect("31 days left");
        assert_eq!(warnings, Vec::new());
        let (_, warnings) =
            NodeCredentials::load_at(dir.path(), 1, issued + DAY * 336).expect("29 days left");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].path, node_cert);
        // 29 days less the moments between `issued` and the issue, in whole days.
        assert!(
            (28..=29).contains(&(warnings[0].remaining_secs / SECS_PER_DAY)),
            "{}",
            warnings[0]
        );
        match NodeCredentials::load_at(dir.path(), 1, issued + DAY * 366) {
            Err(CertError::Expired { path, .. }) => assert_eq!(path, node_cert),
            other => panic!("a year and a day later: {other:?}"),
        }
        match NodeCredentials::load_at(dir.path(), 1, issued - DAY) {
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
        let listed = read_cert_dir(dir.path()).expect("list");
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
        NodeCredentials::load(dir.path(), 1).expect("the renewed pair loads");

        fs::remove_file(dir.path().join("ca.key")).expect("CA key kept elsewhere");
        match renew_node_cert(dir.path(), 1) {
            Err(CertError::Read { path, .. }) => assert_eq!(path, dir.path().join("ca.key")),
            other => panic!("renewing without the CA key: {other:?}"),
        }
        ensure_cluster_certs(dir.path(), &[1])
            .expect("nothing to issue, so the CA key is not needed");
    }
}
