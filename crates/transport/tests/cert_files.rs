//! The cluster cert directory through the real file system: one CA however many processes race
//! to create it, a CA key never replaced, files replaced atomically, what a crash leaves
//! finished by the next `ensure`, issuing only under a CA that matches its key and is valid,
//! loading under a shared lock while a renewal runs, the documented validities, and what
//! `Credentials::load_node` refuses or warns about. Kills at every system call of the real
//! binary are in `bin/duplex/tests/certs_cli.rs`.

use std::fs::{self, File};
use std::io::{self, BufRead as _, Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use duplex_transport::certs::{
    CA_EXPIRY_WARNING_DAYS, CertError, ClusterCa, Credentials, check_expiry, ensure_cluster_certs,
    node_server_name, renew_node_cert,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::client::danger::ServerCertVerifier as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer as _, X509Certificate};

const DAY: Duration = Duration::from_secs(86_400);

fn read_cert(path: &Path) -> CertificateDer<'static> {
    let pem = fs::read(path).expect("read certificate");
    CertificateDer::from_pem_slice(&pem).expect("PEM certificate")
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Names in `dir` that start with a dot: temporary files left behind.
fn hidden_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect()
}

/// Checks, as a TLS client would, that node `node`'s certificate chains to `ca` and names it.
fn verify_issued_by(ca: &CertificateDer<'static>, cert: &CertificateDer<'_>, node: u16) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("CA as a root");
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("verifier");
    let name = ServerName::try_from(node_server_name(node)).expect("server name");
    verifier
        .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
        .unwrap_or_else(|e| panic!("node-{node}.pem is not issued by ca.pem: {e}"));
}

#[test]
fn an_existing_ca_key_without_its_certificate_is_an_error_and_is_never_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    ensure_cluster_certs(dir.path(), &[1]).expect("create");
    let ca_key = fs::read(dir.path().join("ca.key")).expect("ca.key");
    ensure_cluster_certs(dir.path(), &[1, 2]).expect("extend");
    assert_eq!(
        fs::read(dir.path().join("ca.key")).expect("ca.key"),
        ca_key,
        "extending keeps the CA key"
    );

    fs::remove_file(dir.path().join("ca.pem")).expect("lose ca.pem");
    let err = ensure_cluster_certs(dir.path(), &[1, 2, 3])
        .expect_err("a CA key without its certificate must not become a new CA");
    let message = err.to_string();
    println!("{message}");
    assert!(
        message.contains(&dir.path().join("ca.key").display().to_string())
            && message.contains(&dir.path().join("ca.pem").display().to_string()),
        "the error names both files: {message}"
    );
    assert_eq!(
        fs::read(dir.path().join("ca.key")).expect("ca.key"),
        ca_key,
        "the CA key is untouched"
    );
    assert!(!dir.path().join("ca.pem").exists(), "no new CA certificate");
    assert!(
        !dir.path().join("node-3.pem").exists(),
        "nothing issued without the CA certificate"
    );
}

#[test]
fn a_half_issued_node_gets_a_new_key_file_and_its_old_one_is_never_rewritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    ensure_cluster_certs(dir.path(), &[1]).expect("create");
    // A crash after the key was written and before the certificate: only the key remains, and
    // a temporary file readable by anyone was left behind.
    fs::remove_file(dir.path().join("node-1.pem")).expect("lose node-1.pem");
    let key_path = dir.path().join("node-1.key");
    let old_key = fs::read(&key_path).expect("key");
    let mut held_by_a_reader = File::open(&key_path).expect("open key");
    let mut stale = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(dir.path().join(".node-1.key.tmp"))
        .expect("stale temporary file");
    stale.write_all(b"half a key").expect("write stale");
    drop(stale);

    ensure_cluster_certs(dir.path(), &[1]).expect("re-issue node 1");

    let mut seen_by_the_reader = Vec::new();
    held_by_a_reader
        .read_to_end(&mut seen_by_the_reader)
        .expect("read held key");
    assert_eq!(
        seen_by_the_reader, old_key,
        "the new key replaced the file's name; the old file was never rewritten in place"
    );
    assert_ne!(fs::read(&key_path).expect("key"), old_key, "a new key");
    assert_eq!(mode_of(&key_path), 0o600);
    assert_eq!(hidden_files(dir.path()), Vec::<String>::new());
    Credentials::load_node(dir.path(), 1).expect("the re-issued pair loads");
}

/// When set, the `racer` test is one of the processes racing to create a cert directory here.
const RACE_DIR_ENV: &str = "DUPLEX_TEST_CERTS_RACE_DIR";
const RACERS: usize = 8;
/// Rounds of the race, each in a fresh directory: one round shows a lost race only some of the
/// time (without the lock, about 4 rounds in 10 on a 2-core machine), so several are run.
const RACE_ROUNDS: usize = 10;
/// How long the whole race test (every round) may take.
const RACE_TIMEOUT: Duration = Duration::from_secs(120);
const RACE_NODES: [u16; 3] = [1, 2, 3];

/// One racing process: says it is ready, waits for `go` on stdin, ensures the cluster certs,
/// loads node 1's credentials and prints the CA it loaded. Does nothing in an ordinary test run.
#[test]
fn racer() {
    let Some(dir) = std::env::var_os(RACE_DIR_ENV) else {
        return;
    };
    println!("racer-ready");
    let mut go = String::new();
    io::stdin().lock().read_line(&mut go).expect("wait for go");
    ensure_cluster_certs(Path::new(&dir), &RACE_NODES).expect("ensure");
    let credentials = Credentials::load_node(Path::new(&dir), 1).expect("load");
    let hex: String = credentials.ca.iter().map(|b| format!("{b:02x}")).collect();
    println!("racer-ca {hex}");
}

/// A racing process, killed and reaped however the test ends.
struct Racer {
    child: Child,
    /// Its stdout, line by line.
    stdout: mpsc::Receiver<String>,
}

impl Racer {
    fn spawn(dir: &Path) -> Racer {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "racer", "--nocapture", "--test-threads=1"])
            .env(RACE_DIR_ENV, dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn racer");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Racer { child, stdout: rx }
    }

    /// The next line of its stdout, or `None` at its end; panics after `deadline`.
    fn line(&self, deadline: Instant) -> Option<String> {
        match self
            .stdout
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the race took over {RACE_TIMEOUT:?}"),
        }
    }

    /// Returns once the racer says it is ready for `go`.
    fn ready(&self, deadline: Instant) {
        while let Some(line) = self.line(deadline) {
            if line.contains("racer-ready") {
                return;
            }
        }
        panic!("racer ended before it was ready");
    }

    /// The CA this racer loaded, as DER.
    fn finish(&mut self, deadline: Instant) -> Vec<u8> {
        let mut text = String::new();
        while let Some(line) = self.line(deadline) {
            text.push_str(&line);
            text.push('\n');
        }
        let status = self.child.wait().expect("reap racer");
        assert!(status.success(), "racer failed: {status}\n{text}");
        // The harness prints `test racer ... ` before the test's own output, on the same line.
        let hex = text
            .lines()
            .find_map(|line| line.split_once("racer-ca ").map(|(_, hex)| hex.trim()))
            .unwrap_or_else(|| panic!("no racer-ca line in:\n{text}"));
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect()
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn processes_racing_to_create_the_cert_directory_end_with_one_ca() {
    let deadline = Instant::now() + RACE_TIMEOUT;
    for round in 0..RACE_ROUNDS {
        race_once(round, deadline);
    }
}

fn race_once(round: usize, deadline: Instant) {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let mut racers: Vec<Racer> = (0..RACERS).map(|_| Racer::spawn(&certs)).collect();
    // Release them together once every racer has said it is waiting.
    for racer in &racers {
        racer.ready(deadline);
    }
    for racer in &mut racers {
        let mut stdin = racer.child.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("go");
    }
    let loaded: Vec<Vec<u8>> = racers
        .iter_mut()
        .map(|racer| racer.finish(deadline))
        .collect();

    let ca = read_cert(&certs.join("ca.pem"));
    for (i, racer_ca) in loaded.iter().enumerate() {
        assert_eq!(
            racer_ca.as_slice(),
            ca.as_ref(),
            "round {round}: racer {i} loaded another CA"
        );
    }
    for node in RACE_NODES {
        verify_issued_by(
            &ca,
            &read_cert(&certs.join(format!("node-{node}.pem"))),
            node,
        );
        Credentials::load_node(&certs, node).expect("node credentials");
    }
    // ca.key is ca.pem's key: what it signs now chains to ca.pem.
    ensure_cluster_certs(&certs, &[4]).expect("issue node 4");
    verify_issued_by(&ca, &read_cert(&certs.join("node-4.pem")), 4);
    assert_eq!(hidden_files(&certs), Vec::<String>::new());
}

/// A certificate's validity as its bytes state it.
fn validity_of(path: &Path) -> (SystemTime, SystemTime) {
    let der = read_cert(path);
    let (_, cert) = X509Certificate::from_der(&der).expect("X.509");
    let at = |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs());
    (
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    )
}

#[test]
fn certificates_are_valid_ten_years_for_the_ca_and_one_year_for_a_node_from_an_hour_before_issue() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Certificates carry whole seconds.
    let before = SystemTime::now() - Duration::from_secs(1);
    ensure_cluster_certs(dir.path(), &[1]).expect("create");
    let after = SystemTime::now();
    let backdate = Duration::from_secs(3600);
    for (file, days) in [("ca.pem", 3650), ("node-1.pem", 365)] {
        let (not_before, not_after) = validity_of(&dir.path().join(file));
        assert!(
            before - backdate <= not_before && not_before <= after - backdate,
            "{file}: not before {not_before:?}, issued between {before:?} and {after:?}"
        );
        assert!(
            before + DAY * days <= not_after && not_after <= after + DAY * days,
            "{file}: not after {not_after:?}, expected {days} days after issue"
        );
    }
}

/// Writes a cert directory for node 1 with a CA and a node certificate of the given validities,
/// made with rcgen as another issuer would.
fn write_cert_dir(
    dir: &Path,
    ca_validity: (SystemTime, SystemTime),
    node: (SystemTime, SystemTime),
) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ca_params.not_before = OffsetDateTime::from(ca_validity.0);
    ca_params.not_after = OffsetDateTime::from(ca_validity.1);
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("node key");
    let mut params = CertificateParams::new(vec![node_server_name(1)]).expect("node params");
    params.not_before = OffsetDateTime::from(node.0);
    params.not_after = OffsetDateTime::from(node.1);
    let cert = params.signed_by(&key, &issuer).expect("node certificate");
    fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write ca.pem");
    fs::write(dir.join("node-1.pem"), cert.pem()).expect("write node-1.pem");
    let _ = fs::remove_file(dir.join("node-1.key"));
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join("node-1.key"))
        .and_then(|mut f| f.write_all(key.serialize_pem().as_bytes()))
        .expect("write node-1.key");
}

fn date(t: SystemTime) -> String {
    OffsetDateTime::from(t).date().to_string()
}

#[test]
fn loading_refuses_a_certificate_outside_its_validity_naming_the_file_and_the_dates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = SystemTime::now();
    let ca_fine = (now - DAY * 100, now + DAY * 3000);
    let cases = [
        (
            "expired node",
            ca_fine,
            (now - DAY * 400, now - DAY),
            "node-1.pem",
            now - DAY,
        ),
        (
            "future node",
            ca_fine,
            (now + DAY, now + DAY * 365),
            "node-1.pem",
            now + DAY,
        ),
        (
            "expired CA",
            (now - DAY * 4000, now - DAY * 2),
            (now - DAY, now + DAY * 300),
            "ca.pem",
            now - DAY * 2,
        ),
    ];
    for (case, ca, node, file, named_date) in cases {
        write_cert_dir(dir.path(), ca, node);
        let err = Credentials::load_node(dir.path(), 1)
            .err()
            .unwrap_or_else(|| panic!("{case}: loaded"));
        let message = err.to_string();
        println!("{case}: {message}");
        assert!(
            message.contains(&dir.path().join(file).display().to_string())
                && message.contains(&date(named_date)),
            "{case}: the error names {file} and {}: {message}",
            date(named_date)
        );
    }
}

/// Everything written by the tracing subscriber installed for one call.
#[derive(Debug, Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("capture").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `Credentials::load_node` of node 1, and what it logged.
fn load_logged(dir: &Path) -> (Result<Credentials, CertError>, String) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let result = tracing::subscriber::with_default(subscriber, || Credentials::load_node(dir, 1));
    let log = String::from_utf8_lossy(&captured.0.lock().expect("capture")).into_owned();
    (result, log)
}

#[test]
fn loading_warns_when_a_certificate_expires_within_30_days() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = SystemTime::now();
    let ca = (now - DAY, now + DAY * 3000);

    write_cert_dir(dir.path(), ca, (now - DAY, now + DAY * 31));
    let (loaded, log) = load_logged(dir.path());
    loaded.expect("31 days left loads");
    println!("{log}");
    assert!(
        !log.contains("WARN"),
        "no warning 31 days before expiry: {log}"
    );
    assert!(
        log.contains(" INFO ")
            && log.contains(&dir.path().join("node-1.pem").display().to_string())
            && log.contains(&date(now + DAY * 31))
            && log.contains(&date(now + DAY * 3000)),
        "loading logs when the node certificate and the CA expire: {log}"
    );

    write_cert_dir(dir.path(), ca, (now - DAY, now + DAY * 29));
    let (loaded, log) = load_logged(dir.path());
    loaded.expect("29 days left still loads");
    println!("{log}");
    assert!(
        log.contains("WARN")
            && log.contains(&dir.path().join("node-1.pem").display().to_string())
            && log.contains(&date(now + DAY * 29)),
        "a warning naming the file and the date: {log}"
    );
}

#[test]
fn keys_accessible_by_group_or_others_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    ensure_cluster_certs(dir.path(), &[1]).expect("create");
    let key = dir.path().join("node-1.key");
    for mode in [0o640, 0o604, 0o644, 0o660, 0o602] {
        set_mode(&key, mode);
        let err = Credentials::load_node(dir.path(), 1)
            .err()
            .unwrap_or_else(|| panic!("a key with mode {mode:04o} loaded"));
        let message = err.to_string();
        assert!(
            message.contains(&key.display().to_string())
                && message.contains(&format!("{mode:04o}")),
            "the error names the key and its mode: {message}"
        );
    }
    for mode in [0o600, 0o400] {
        set_mode(&key, mode);
        Credentials::load_node(dir.path(), 1).expect("an owner-only key loads");
    }

    // The CA key too, when issuing needs it.
    let ca_key = dir.path().join("ca.key");
    set_mode(&ca_key, 0o644);
    let err = ensure_cluster_certs(dir.path(), &[1, 2]).expect_err("a readable CA key is refused");
    let message = err.to_string();
    println!("{message}");
    assert!(message.contains(&ca_key.display().to_string()), "{message}");
    assert!(!dir.path().join("node-2.pem").exists());
}

#[test]
fn a_key_that_is_not_its_certificates_is_refused_at_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    ensure_cluster_certs(dir.path(), &[1, 2]).expect("create");
    fs::copy(dir.path().join("node-2.key"), dir.path().join("node-1.key")).expect("swap key");
    let err = Credentials::load_node(dir.path(), 1)
        .expect_err("node 2's key with node 1's certificate is refused");
    let message = err.to_string();
    println!("{message}");
    assert!(
        message.contains(&dir.path().join("node-1.key").display().to_string())
            && message.contains(&dir.path().join("node-1.pem").display().to_string()),
        "{message}"
    );
}

/// Writes `ca`'s certificate and key to `dir` as `ca.pem` and `ca.key` (mode 0600).
fn write_ca(dir: &Path, ca: &ClusterCa) {
    fs::write(dir.join("ca.pem"), &ca.cert_pem).expect("write ca.pem");
    write_key(&dir.join("ca.key"), &ca.key_pem);
}

/// Writes a private key file with mode 0600, replacing any.
fn write_key(path: &Path, pem: &str) {
    let _ = fs::remove_file(path);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .expect("write key");
}

fn ca_of(dir: &Path) -> ClusterCa {
    ClusterCa {
        cert_pem: fs::read_to_string(dir.join("ca.pem")).expect("ca.pem"),
        key_pem: fs::read_to_string(dir.join("ca.key")).expect("ca.key"),
    }
}

#[test]
fn issuing_refuses_a_ca_pem_that_is_not_ca_keys_and_loading_refuses_a_foreign_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
    ensure_cluster_certs(&ours, &[1]).expect("our cluster");
    ensure_cluster_certs(&theirs, &[1]).expect("another cluster");
    let ours_file = |name: &str| ours.join(name);
    fs::copy(theirs.join("ca.pem"), ours_file("ca.pem")).expect("another cluster's ca.pem");

    let mismatch = |result: Result<(), CertError>, what: &str| match result {
        Err(CertError::CaKeyMismatch { key, cert }) => {
            assert_eq!(
                (key, cert),
                (ours_file("ca.key"), ours_file("ca.pem")),
                "{what}"
            );
        }
        other => panic!("{what} under another cluster's ca.pem: {other:?}"),
    };
    mismatch(renew_node_cert(&ours, 1), "renewing");
    mismatch(ensure_cluster_certs(&ours, &[1, 2]), "issuing");
    assert!(!ours_file("node-2.pem").exists(), "nothing issued");
    match Credentials::load_node(&ours, 1) {
        Err(e @ CertError::NotIssuedByCa { .. }) => {
            let message = e.to_string();
            println!("{message}");
            assert!(
                message.contains(&ours_file("node-1.pem").display().to_string())
                    && message.contains(&ours_file("ca.pem").display().to_string()),
                "{message}"
            );
        }
        other => panic!("loading a node certificate another CA did not issue: {other:?}"),
    }

    fs::write(ours_file("ca.pem"), "garbage").expect("garbage ca.pem");
    match ensure_cluster_certs(&ours, &[1, 2]) {
        Err(CertError::Parse { path, .. }) => assert_eq!(path, ours_file("ca.pem")),
        other => panic!("issuing under a garbage ca.pem: {other:?}"),
    }

    // A node's pair in the CA's place: the key matches, but it is no CA.
    fs::copy(ours_file("node-1.pem"), ours_file("ca.pem")).expect("node cert as ca.pem");
    write_key(
        &ours_file("ca.key"),
        &fs::read_to_string(ours_file("node-1.key")).expect("node key"),
    );
    match ensure_cluster_certs(&ours, &[2]) {
        Err(CertError::NotCa { path }) => assert_eq!(path, ours_file("ca.pem")),
        other => panic!("issuing under a node certificate: {other:?}"),
    }
    assert!(!ours_file("node-2.pem").exists(), "nothing issued");
}

#[test]
fn loading_refuses_a_node_certificate_that_names_another_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    ensure_cluster_certs(dir.path(), &[1, 2]).expect("create");
    fs::copy(dir.path().join("node-2.pem"), dir.path().join("node-1.pem")).expect("copy");
    fs::copy(dir.path().join("node-2.key"), dir.path().join("node-1.key")).expect("copy");
    match Credentials::load_node(dir.path(), 1) {
        Err(CertError::NotIssuedByCa { name, .. }) => assert_eq!(name, "node-1.duplex"),
        other => panic!("node 2's pair loaded as node 1: {other:?}"),
    }
}

#[test]
fn a_ca_key_whose_certificate_was_left_under_its_temporary_name_is_finished_never_replaced() {
    for temp_name in [".ca.pem.4242-00c0ffee.tmp", ".ca.pem.tmp"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::generate().expect("CA");
        // A crash after `link(ca.key)`: the key and a second link to it, its certificate only
        // under its temporary name.
        write_ca(dir.path(), &ca);
        fs::rename(dir.path().join("ca.pem"), dir.path().join(temp_name)).expect("unpublish");
        fs::hard_link(
            dir.path().join("ca.key"),
            dir.path().join(".ca.key.4242-0badcafe.tmp"),
        )
        .expect("second link");
        ensure_cluster_certs(dir.path(), &[1]).expect("finish the CA and issue node 1");
        assert_eq!(
            fs::read_to_string(dir.path().join("ca.pem")).expect("ca.pem"),
            ca.cert_pem,
            "{temp_name}: the CA's own certificate, not a new CA"
        );
        assert_eq!(ca_of(dir.path()).key_pem, ca.key_pem);
        assert_eq!(hidden_files(dir.path()), Vec::<String>::new());
        verify_issued_by(
            &read_cert(&dir.path().join("ca.pem")),
            &read_cert(&dir.path().join("node-1.pem")),
            1,
        );
    }

    // Another CA's certificate under the temporary name is not this key's: still an error.
    let dir = tempfile::tempdir().expect("tempdir");
    write_ca(dir.path(), &ClusterCa::generate().expect("CA"));
    fs::remove_file(dir.path().join("ca.pem")).expect("lose ca.pem");
    let other = ClusterCa::generate().expect("another CA");
    fs::write(dir.path().join(".ca.pem.1-ab.tmp"), &other.cert_pem).expect("temp");
    assert!(matches!(
        ensure_cluster_certs(dir.path(), &[1]),
        Err(CertError::CaCertMissing { .. })
    ));
    assert!(!dir.path().join("ca.pem").exists());
}

#[test]
fn a_renewal_interrupted_between_its_two_renames_is_finished_by_ensure() {
    let dir = tempfile::tempdir().expect("tempdir");
    ensure_cluster_certs(dir.path(), &[1]).expect("create");
    let new = ca_of(dir.path()).issue_node(1).expect("new pair");
    // The new key took its name; the new certificate is still under its temporary one.
    write_key(&dir.path().join("node-1.key"), &new.key_pem);
    fs::write(
        dir.path().join(".node-1.pem.77-1234abcd.tmp"),
        &new.cert_pem,
    )
    .expect("temp");
    assert!(matches!(
        Credentials::load_node(dir.path(), 1),
        Err(CertError::KeyMismatch { .. })
    ));

    ensure_cluster_certs(dir.path(), &[1]).expect("finish the renewal");
    assert_eq!(
        fs::read_to_string(dir.path().join("node-1.pem")).expect("node-1.pem"),
        new.cert_pem
    );
    assert_eq!(hidden_files(dir.path()), Vec::<String>::new());
    Credentials::load_node(dir.path(), 1).expect("the finished pair loads");
}

#[test]
fn loading_while_a_node_is_renewed_always_finds_a_matching_pair() {
    const RENEWALS: usize = 40;
    const LOADS_MAX: usize = 100_000;
    let dir = tempfile::tempdir().expect("tempdir");
    ensure_cluster_certs(dir.path(), &[1]).expect("create");
    let renewed = AtomicBool::new(false);
    let loads = std::thread::scope(|scope| {
        let renewer = scope.spawn(|| {
            let result = (0..RENEWALS).try_for_each(|_| renew_node_cert(dir.path(), 1));
            renewed.store(true, Ordering::Release);
            result
        });
        let mut loads = 0;
        while !renewed.load(Ordering::Acquire) && loads < LOADS_MAX {
            if let Err(e) = Credentials::load_node_at(dir.path(), 1, SystemTime::now()) {
                panic!("load {loads} during a renewal: {e}");
            }
            loads += 1;
        }
        renewer.join().expect("renewer").expect("renewals");
        loads
    });
    println!("{loads} loads during {RENEWALS} renewals");
}

#[test]
fn issuing_respects_the_cas_validity_and_the_ca_warns_a_year_ahead() {
    let now = SystemTime::now();
    // A CA made 3640 days ago expires in 10 days: node 1's certificate ends with it.
    let dir = tempfile::tempdir().expect("tempdir");
    write_ca(
        dir.path(),
        &ClusterCa::generate_at(now - DAY * 3640).expect("old CA"),
    );
    ensure_cluster_certs(dir.path(), &[1]).expect("issue under a CA with 10 days left");
    let ca_not_after = validity_of(&dir.path().join("ca.pem")).1;
    assert_eq!(validity_of(&dir.path().join("node-1.pem")).1, ca_not_after);

    let (_, warnings) = Credentials::load_node_at(dir.path(), 1, now).expect("load");
    let warned: Vec<_> = warnings
        .iter()
        .map(|w| (w.path.clone(), w.warning_days))
        .collect();
    assert_eq!(
        warned,
        [
            (dir.path().join("ca.pem"), CA_EXPIRY_WARNING_DAYS),
            (dir.path().join("node-1.pem"), 30)
        ]
    );
    assert_eq!(
        check_expiry(dir.path(), 1, now).expect("check"),
        warnings,
        "a running node's re-check finds what loading found"
    );
    match check_expiry(dir.path(), 1, now + DAY * 11) {
        Err(CertError::Expired { path, .. }) => assert_eq!(path, dir.path().join("ca.pem")),
        other => panic!("re-checking after the CA expired: {other:?}"),
    }
    // A CA with 300 days left: only the CA warns.
    let dir = tempfile::tempdir().expect("tempdir");
    write_ca(
        dir.path(),
        &ClusterCa::generate_at(now - DAY * 3350).expect("CA"),
    );
    ensure_cluster_certs(dir.path(), &[1]).expect("issue");
    let warnings = check_expiry(dir.path(), 1, now).expect("check");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].path, dir.path().join("ca.pem"));

    for (case, made, refusal) in [
        ("expired", now - DAY * 3651, "Expired"),
        ("not yet valid", now + DAY * 2, "NotYetValid"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        write_ca(dir.path(), &ClusterCa::generate_at(made).expect("CA"));
        let err = ensure_cluster_certs(dir.path(), &[1])
            .expect_err(&format!("issuing under an {case} CA"));
        let path = match &err {
            CertError::Expired { path, .. } | CertError::NotYetValid { path, .. } => path,
            other => panic!("{case}: {other:?}"),
        };
        assert!(format!("{err:?}").starts_with(refusal), "{case}: {err:?}");
        assert_eq!(path, &dir.path().join("ca.pem"));
        assert!(
            !dir.path().join("node-1.pem").exists(),
            "{case}: nothing issued"
        );
    }
}

#[test]
fn a_cert_dir_writable_by_others_a_key_of_another_user_and_a_fifo_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    ensure_cluster_certs(dir.path(), &[1, 2]).expect("create");
    for mode in [0o770, 0o702, 0o1777] {
        set_mode(dir.path(), mode);
        for (what, result) in [
            ("load", Credentials::load_node(dir.path(), 1).map(|_| ())),
            ("ensure", ensure_cluster_certs(dir.path(), &[3])),
            ("renew", renew_node_cert(dir.path(), 1)),
        ] {
            match result {
                Err(CertError::DirWritableByOthers { path, mode: found }) => {
                    assert_eq!((path.as_path(), found), (dir.path(), mode), "{what}");
                }
                other => panic!("{what} in a directory of mode {mode:04o}: {other:?}"),
            }
        }
    }
    set_mode(dir.path(), 0o750);
    Credentials::load_node(dir.path(), 1).expect("group may read and enter");

    // A FIFO where the key should be: refused at once instead of blocking the open.
    let key = dir.path().join("node-1.key");
    fs::remove_file(&key).expect("remove key");
    nix::unistd::mkfifo(
        &key,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .expect("mkfifo");
    let loader = {
        let dir = dir.path().to_path_buf();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(Credentials::load_node(&dir, 1).map(|_| ()));
        });
        rx
    };
    match loader.recv_timeout(Duration::from_secs(30)) {
        Ok(Err(CertError::NotAFile { path })) => assert_eq!(path, key),
        Ok(other) => panic!("loading a FIFO key: {other:?}"),
        Err(_) => {
            // Unblock the loader so the test process can end.
            let _ = File::options().write(true).open(&key);
            panic!("loading a FIFO key blocked");
        }
    }

    // A key another user owns (needs root to make one).
    if nix::unistd::geteuid().is_root() {
        let key = dir.path().join("node-2.key");
        std::os::unix::fs::chown(&key, Some(65534), None).expect("chown");
        match Credentials::load_node(dir.path(), 2) {
            Err(CertError::KeyNotOwnedByUser { path, owner, user }) => {
                assert_eq!((path, owner, user), (key, 65534, 0));
            }
            other => panic!("loading another user's key: {other:?}"),
        }
    } else {
        println!("not root: the owner check is not exercised");
    }
}
