//! `duplex certs …`: create a cluster's cert directory, issue clients their certificates, show
//! what is in it and when each certificate expires, and renew a node's or a client's
//! certificate before it does.
//!
//! An operator's view of `duplex_transport::certs`: what a node checks when it loads its
//! credentials (and warns about from `EXPIRY_WARNING_DAYS`, for the CA
//! `CA_EXPIRY_WARNING_DAYS`, before expiry), `show` lets an operator check for every
//! certificate at once.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Subcommand};
use duplex_transport::certs::{
    CertFileSummary, ClientName, UtcTime, ValidityStatus, ensure_client_cert, ensure_cluster_certs,
    read_cert_dir, renew_client_cert, renew_node_cert,
};

const SECS_PER_DAY: u64 = 86_400;

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create the cluster CA and the certificates of the given nodes unless they exist, after
    /// finishing what a crash interrupted.
    Ensure {
        #[arg(long)]
        dir: PathBuf,
        /// Node numbers, comma-separated: `--nodes 1,2,3`. Nodes are numbered from 1; node 0 is
        /// the clients' (see `client`).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<u16>,
    },
    /// Issue a client its certificate (client-NAME.pem, client-NAME.key) under the cluster CA
    /// unless it exists, creating the CA if there is none. A client endpoint 0.k presents it;
    /// it cannot claim a CPU.
    Client {
        #[arg(long)]
        dir: PathBuf,
        /// The client's name: 1 to 32 of a-z, 0-9 and '-'.
        #[arg(long)]
        name: ClientName,
    },
    /// List the CA and node certificates with their validity and how long each has left, and
    /// the problems found (a file that does not parse, a node key that is missing, exposed or
    /// not its certificate's, a certificate not issued by ca.pem); fails if there are any.
    Show {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node (`--node N`) or a client (`--client NAME`) a new key and certificate under
    /// the existing CA, replacing its old ones.
    #[command(group(ArgGroup::new("holder").required(true).args(["node", "client"])))]
    Renew {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: Option<u16>,
        #[arg(long)]
        client: Option<ClientName>,
    },
}

pub fn run(command: CertsCommand) -> Result<()> {
    match command {
        CertsCommand::Ensure { dir, nodes } => {
            ensure_cluster_certs(&dir, &nodes)
                .with_context(|| format!("creating certificates in {}", dir.display()))?;
            show(&dir).map(|_| ())
        }
        CertsCommand::Show { dir } => {
            let problems = show(&dir)?;
            if problems > 0 {
                bail!("{problems} problem(s) in {} (listed above)", dir.display());
            }
            Ok(())
        }
        CertsCommand::Client { dir, name } => {
            ensure_client_cert(&dir, &name).with_context(|| {
                format!("issuing client {name}'s certificate in {}", dir.display())
            })?;
            show(&dir).map(|_| ())
        }
        CertsCommand::Renew { dir, node, client } => {
            match (node, client) {
                (Some(node), _) => {
                    renew_node_cert(&dir, node)
                        .with_context(|| format!("renewing node {node}'s certificate"))?;
                    println!(
                        "renewed node {node}; restart its processes to use the new certificate"
                    );
                }
                (None, Some(name)) => {
                    renew_client_cert(&dir, &name)
                        .with_context(|| format!("renewing client {name}'s certificate"))?;
                    println!("renewed client {name}; restart it to use the new certificate");
                }
                (None, None) => bail!("renew needs --node N or --client NAME"),
            }
            show(&dir).map(|_| ())
        }
    }
}

fn status(cert: &CertFileSummary, now: SystemTime) -> String {
    match cert.status_at(now) {
        ValidityStatus::NotYetValid => "NOT YET VALID: check this host's clock".into(),
        ValidityStatus::Valid { remaining_secs } => {
            format!("valid, {} days left", remaining_secs / SECS_PER_DAY)
        }
        ValidityStatus::ExpiresSoon { remaining_secs } => format!(
            "EXPIRES in {} days (warned from {}): renew",
            remaining_secs / SECS_PER_DAY,
            cert.warning_days
        ),
        ValidityStatus::Expired => "EXPIRED: renew".into(),
    }
}

/// Prints the table of `dir`'s certificates, then each problem found as a `problem:` line on
/// stderr; returns how many problems. After `ensure` or `renew` the problems are warnings: the
/// certificates they wrote are in place.
fn show(dir: &Path) -> Result<usize> {
    let now = SystemTime::now();
    let listing = read_cert_dir(dir, now)
        .with_context(|| format!("reading certificates in {}", dir.display()))?;
    let rows: Vec<[String; 5]> = listing
        .certs
        .iter()
        .map(|cert| {
            [
                cert.path
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                cert.subject.clone(),
                UtcTime(cert.validity.not_before).to_string(),
                UtcTime(cert.validity.not_after).to_string(),
                status(cert, now),
            ]
        })
        .collect();
    let header = ["file", "subject", "not before", "not after", "status"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    println!("certificates in {} at {}", dir.display(), UtcTime(now));
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    for problem in &listing.problems {
        eprintln!("problem: {problem}");
    }
    Ok(listing.problems.len())
}
