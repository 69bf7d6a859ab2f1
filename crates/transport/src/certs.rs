//! The cluster's certificates: one CA per cluster, one certificate per node, both made with
//! rcgen. Only holders of a certificate signed by the cluster CA can connect (mutual TLS 1.3),
//! and a dialer checks that the server's certificate names the node it meant to reach.
//!
//! Files in a cluster's cert directory: `ca.pem`, `ca.key`, and `node-N.pem` / `node-N.key` for
//! every node. A local cluster creates them at first start with `ensure_cluster_certs`.
//! rustls is built with the ring provider only, passed explicitly, so no process-wide provider
//! has to be installed.

use std::fs;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use thiserror::Error;

/// ALPN label of the cluster protocol; versions are negotiated inside, not by ALPN.
pub const ALPN: &[u8] = b"duplex";

#[derive(Debug, Error)]
pub enum CertError {
    #[error("generating {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("building TLS configuration: {reason}")]
    Tls { reason: String },
}

/// The name a node's certificate carries and a dialer checks.
pub fn node_server_name(node: u16) -> String {
    format!("node-{node}.duplex")
}

fn ca_params() -> Result<CertificateParams, CertError> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|source| CertError::Generate {
            what: "CA parameters".into(),
            source,
        })?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Duplex cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
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
    pub fn generate() -> Result<Self, CertError> {
        let key = KeyPair::generate().map_err(|source| CertError::Generate {
            what: "CA key".into(),
            source,
        })?;
        let cert = ca_params()?
            .self_signed(&key)
            .map_err(|source| CertError::Generate {
                what: "CA certificate".into(),
                source,
            })?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn issue_node(&self, node: u16) -> Result<NodeCert, CertError> {
        let what = |w: &str| format!("{w} of node {node}");
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(|source| CertError::Generate {
            what: "loading the CA key".into(),
            source,
        })?;
        let issuer = Issuer::new(ca_params()?, ca_key);
        let key = KeyPair::generate().map_err(|source| CertError::Generate {
            what: what("key"),
            source,
        })?;
        let mut params =
            CertificateParams::new(vec![node_server_name(node)]).map_err(|source| {
                CertError::Generate {
                    what: what("parameters"),
                    source,
                }
            })?;
        params
            .distinguished_name
            .push(DnType::CommonName, node_server_name(node));
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|source| CertError::Generate {
                what: what("certificate"),
                source,
            })?;
        Ok(NodeCert {
            node,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn write(path: PathBuf, text: &str) -> Result<(), CertError> {
    fs::write(&path, text).map_err(|source| CertError::Write { path, source })
}

fn read(path: PathBuf) -> Result<String, CertError> {
    fs::read_to_string(&path).map_err(|source| CertError::Read { path, source })
}

/// Creates the CA and the certificates of `nodes` in `dir` unless they already exist.
pub fn ensure_cluster_certs(dir: &FsPath, nodes: &[u16]) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca = if dir.join("ca.pem").exists() {
        ClusterCa {
            cert_pem: read(dir.join("ca.pem"))?,
            key_pem: read(dir.join("ca.key"))?,
        }
    } else {
        let ca = ClusterCa::generate()?;
        write(dir.join("ca.key"), &ca.key_pem)?;
        write(dir.join("ca.pem"), &ca.cert_pem)?;
        ca
    };
    for &node in nodes {
        if dir.join(format!("node-{node}.pem")).exists() {
            continue;
        }
        let cert = ca.issue_node(node)?;
        write(dir.join(format!("node-{node}.key")), &cert.key_pem)?;
        write(dir.join(format!("node-{node}.pem")), &cert.cert_pem)?;
    }
    Ok(())
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
    pub fn from_pem(node: u16, ca_pem: &str, cert: &NodeCert) -> Result<Self, CertError> {
        let parse = |what: &str, reason: String| CertError::Parse {
            path: PathBuf::from(what),
            reason,
        };
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| parse("CA certificate", e.to_string()))?;
        let node_cert = CertificateDer::from_pem_slice(cert.cert_pem.as_bytes())
            .map_err(|e| parse("node certificate", e.to_string()))?;
        let key = match PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()) {
            Ok(PrivateKeyDer::Pkcs8(k)) => k,
            Ok(_) => return Err(parse("node key", "expected a PKCS#8 key".into())),
            Err(e) => return Err(parse("node key", e.to_string())),
        };
        Ok(NodeCredentials {
            node,
            ca,
            cert: node_cert,
            key,
        })
    }

    /// Loads node `node`'s credentials from a cert directory made by `ensure_cluster_certs`.
    pub fn load(dir: &FsPath, node: u16) -> Result<Self, CertError> {
        let ca_pem = read(dir.join("ca.pem"))?;
        let cert = NodeCert {
            node,
            cert_pem: read(dir.join(format!("node-{node}.pem")))?,
            key_pem: read(dir.join(format!("node-{node}.key")))?,
        };
        NodeCredentials::from_pem(node, &ca_pem, &cert).map_err(|e| match e {
            CertError::Parse { reason, path } => CertError::Parse {
                path: dir.join(path),
                reason,
            },
            other => other,
        })
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
        quinn_configs(
            &creds,
            QuicTiming {
                idle_timeout_ms: 1000,
                keep_alive_interval_ms: None,
            },
        )
        .expect("configs");
        assert!(matches!(
            NodeCredentials::load(dir.path(), 9),
            Err(CertError::Read { .. })
        ));
    }
}
