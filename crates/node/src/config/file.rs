//! The file's schema, every value with its position in the text, and the checks that need the
//! whole file. Only [`parse`] turns a file into a [`ClusterConfig`]: the schema types here never
//! leave this module, so nothing routes by an unchecked value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::PathBuf;

use duplex_lsg::LsgId;
use serde::Deserialize;
use toml::Spanned;

use super::{
    ClusterConfig, ConfigError, Cpu, Durability, KeyBound, Lsg, MAX_CPUS_PER_NODE,
    MAX_KEY_BOUND_BYTES, MAX_LSGS, MAX_NODES, MAX_VOLUMES_PER_LSG, Node, Storage, StorageMode,
    Timing, Volume,
};

/// A checked LSG with the spans of its volumes' starts.
type LsgWithSpans = (Lsg, Vec<Range<usize>>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    durability: Durability,
    storage: FileStorage,
    #[serde(default)]
    timing: FileTiming,
    nodes: Spanned<Vec<FileNode>>,
    lsgs: Spanned<Vec<FileLsg>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStorage {
    mode: StorageMode,
    dir: Spanned<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTiming {
    detection_time_ms: Option<Spanned<u64>>,
    checkpoint_interval_ms: Option<Spanned<u64>>,
    lock_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNode {
    id: Spanned<u16>,
    data_dir: Spanned<PathBuf>,
    cpus: Spanned<Vec<FileCpu>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCpu {
    id: Spanned<u16>,
    main: Spanned<SocketAddr>,
    failsafe: Option<Spanned<SocketAddr>>,
    metrics: Option<Spanned<SocketAddr>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLsg {
    id: Spanned<LsgId>,
    home: Spanned<u16>,
    backup: Spanned<u16>,
    volumes: Spanned<Vec<FileVolume>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVolume {
    name: Spanned<String>,
    start: Option<Spanned<KeyBound>>,
    end: Option<Spanned<KeyBound>>,
}

/// Parses `text` and checks every rule; the first error found is returned.
pub(super) fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::from_toml(text, &e))?;
    Checker { text }.check(file)
}

struct Checker<'a> {
    text: &'a str,
}

impl Checker<'_> {
    fn err(&self, span: Range<usize>, problem: impl Into<String>) -> ConfigError {
        ConfigError::at(self.text, span, problem)
    }

    fn line(&self, span: &Range<usize>) -> usize {
        ConfigError::at(self.text, span.clone(), "").line
    }

    /// Records `key` as seen at `span`, or names where it was first seen.
    fn unique<K: Ord>(
        &self,
        seen: &mut BTreeMap<K, Range<usize>>,
        key: K,
        span: Range<usize>,
        what: impl FnOnce() -> String,
    ) -> Result<(), ConfigError> {
        if let Some(first) = seen.get(&key) {
            let line = self.line(first);
            return Err(self.err(span, format!("{}, already used at line {line}", what())));
        }
        seen.insert(key, span);
        Ok(())
    }

    fn count(
        &self,
        span: Range<usize>,
        len: usize,
        max: usize,
        what: impl FnOnce() -> String,
    ) -> Result<(), ConfigError> {
        match len {
            0 => Err(self.err(span, format!("{} has none", what()))),
            n if n > max => Err(self.err(span, format!("{} has {n}, at most {max}", what()))),
            _ => Ok(()),
        }
    }

    fn check(&self, file: FileConfig) -> Result<ClusterConfig, ConfigError> {
        let storage = self.storage(file.storage)?;
        let timing = self.timing(file.timing)?;
        let nodes = self.nodes(file.nodes)?;
        let lsgs = self.lsgs(file.lsgs, &nodes)?;
        let routes = self.routes(&lsgs)?;
        Ok(ClusterConfig {
            durability: file.durability,
            storage,
            timing,
            nodes,
            routes,
            lsgs: lsgs.into_iter().map(|(lsg, _)| lsg).collect(),
        })
    }

    fn storage(&self, s: FileStorage) -> Result<Storage, ConfigError> {
        let span = s.dir.span();
        let dir = s.dir.into_inner();
        if dir.as_os_str().is_empty() {
            return Err(self.err(span, "the storage directory is empty"));
        }
        Ok(Storage { mode: s.mode, dir })
    }

    fn timing(&self, t: FileTiming) -> Result<Timing, ConfigError> {
        let d = Timing::default();
        let knob =
            |v: Option<Spanned<u64>>, default: u64, name: &str, range: RangeInclusive<u64>| {
                let Some(v) = v else { return Ok(default) };
                if range.contains(v.get_ref()) {
                    return Ok(*v.get_ref());
                }
                Err(self.err(
                    v.span(),
                    format!(
                        "{name} = {} is out of range {}..={}",
                        v.get_ref(),
                        range.start(),
                        range.end()
                    ),
                ))
            };
        Ok(Timing {
            detection_time_ms: knob(
                t.detection_time_ms,
                d.detection_time_ms,
                "detection_time_ms",
                Timing::DETECTION_TIME_MS,
            )?,
            checkpoint_interval_ms: knob(
                t.checkpoint_interval_ms,
                d.checkpoint_interval_ms,
                "checkpoint_interval_ms",
                Timing::CHECKPOINT_INTERVAL_MS,
            )?,
            lock_timeout_ms: knob(
                t.lock_timeout_ms,
                d.lock_timeout_ms,
                "lock_timeout_ms",
                Timing::LOCK_TIMEOUT_MS,
            )?,
        })
    }

    fn nodes(&self, nodes: Spanned<Vec<FileNode>>) -> Result<Vec<Node>, ConfigError> {
        let span = nodes.span();
        let nodes = nodes.into_inner();
        self.count(span, nodes.len(), MAX_NODES, || {
            "the cluster's node list".into()
        })?;
        let mut ids = BTreeMap::new();
        let mut dirs = BTreeMap::new();
        let mut addrs = BTreeMap::new();
        let mut out = Vec::with_capacity(nodes.len());
        for node in nodes {
            let id = *node.id.get_ref();
            if id == 0 {
                return Err(self.err(
                    node.id.span(),
                    "node id 0 is reserved for clients: number nodes from 1".to_string(),
                ));
            }
            self.unique(&mut ids, id, node.id.span(), || format!("node id {id}"))?;
            let data_dir = node.data_dir.get_ref().clone();
            if data_dir.as_os_str().is_empty() {
                return Err(self.err(
                    node.data_dir.span(),
                    format!("node {id}'s data_dir is empty"),
                ));
            }
            self.unique(&mut dirs, data_dir.clone(), node.data_dir.span(), || {
                format!("data_dir {}", data_dir.display())
            })?;
            let cpus_span = node.cpus.span();
            let cpus = node.cpus.into_inner();
            self.count(cpus_span, cpus.len(), MAX_CPUS_PER_NODE, || {
                format!("node {id}'s CPU list")
            })?;
            let mut cpu_ids = BTreeMap::new();
            let mut checked = Vec::with_capacity(cpus.len());
            for cpu in cpus {
                let cpu_id = *cpu.id.get_ref();
                self.unique(&mut cpu_ids, cpu_id, cpu.id.span(), || {
                    format!("CPU id {cpu_id} of node {id}")
                })?;
                for addr in std::iter::once(&cpu.main)
                    .chain(cpu.failsafe.as_ref())
                    .chain(cpu.metrics.as_ref())
                {
                    let a = *addr.get_ref();
                    if a.port() == 0 {
                        return Err(self.err(
                            addr.span(),
                            format!("address {a} has port 0, which peers cannot dial"),
                        ));
                    }
                    self.unique(&mut addrs, a, addr.span(), || format!("address {a}"))?;
                }
                checked.push(Cpu {
                    id: cpu_id,
                    main: cpu.main.into_inner(),
                    failsafe: cpu.failsafe.map(Spanned::into_inner),
                    metrics: cpu.metrics.map(Spanned::into_inner),
                });
            }
            out.push(Node {
                id,
                data_dir,
                cpus: checked,
            });
        }
        Ok(out)
    }

    /// The checked LSGs, each with the spans of its volumes (the start bound, or the volume's
    /// name when the start is implicit) for the overlap check.
    fn lsgs(
        &self,
        lsgs: Spanned<Vec<FileLsg>>,
        nodes: &[Node],
    ) -> Result<Vec<LsgWithSpans>, ConfigError> {
        let span = lsgs.span();
        let lsgs = lsgs.into_inner();
        self.count(span, lsgs.len(), MAX_LSGS, || {
            "the cluster's LSG list".into()
        })?;
        let known = |n: &Spanned<u16>, role: &str| {
            if nodes.iter().any(|node| node.id == *n.get_ref()) {
                Ok(*n.get_ref())
            } else {
                Err(self.err(
                    n.span(),
                    format!("{role} node {} is not a node of the cluster", n.get_ref()),
                ))
            }
        };
        let mut ids = BTreeMap::new();
        let mut names = BTreeMap::new();
        let mut out = Vec::with_capacity(lsgs.len());
        for lsg in lsgs {
            let id = *lsg.id.get_ref();
            self.unique(&mut ids, id, lsg.id.span(), || format!("LSG id {id}"))?;
            let home = known(&lsg.home, "home")?;
            let backup = known(&lsg.backup, "backup")?;
            if home == backup {
                return Err(self.err(
                    lsg.backup.span(),
                    format!("LSG {id}'s backup node is its home node {home}: they must differ"),
                ));
            }
            let vols_span = lsg.volumes.span();
            let vols = lsg.volumes.into_inner();
            self.count(vols_span, vols.len(), MAX_VOLUMES_PER_LSG, || {
                format!("LSG {id}'s volume list")
            })?;
            let mut volumes = Vec::with_capacity(vols.len());
            let mut spans = Vec::with_capacity(vols.len());
            for v in vols {
                let name = v.name.get_ref().clone();
                if let Err(e) = duplex_lsg::validate_volume_name(&name) {
                    return Err(self.err(v.name.span(), format!("volume {e}")));
                }
                self.unique(&mut names, name.clone(), v.name.span(), || {
                    format!("volume name {name:?}")
                })?;
                for bound in v.start.iter().chain(&v.end) {
                    let len = bound.get_ref().as_bytes().len();
                    if len > MAX_KEY_BOUND_BYTES {
                        return Err(self.err(
                            bound.span(),
                            format!(
                                "key bound of {len} bytes is longer than {MAX_KEY_BOUND_BYTES}"
                            ),
                        ));
                    }
                }
                let start = v
                    .start
                    .as_ref()
                    .map(|s| s.get_ref().clone())
                    .unwrap_or_default();
                if let Some(end) = &v.end
                    && end.get_ref() <= &start
                {
                    return Err(self.err(
                        end.span(),
                        format!(
                            "volume {name:?} has an empty key range: end {} is not after start {start}",
                            end.get_ref()
                        ),
                    ));
                }
                spans.push(v.start.as_ref().map_or(v.name.span(), |s| s.span()));
                volumes.push(Volume {
                    name,
                    start,
                    end: v.end.map(Spanned::into_inner),
                });
            }
            out.push((
                Lsg {
                    id,
                    home,
                    backup,
                    volumes,
                },
                spans,
            ));
        }
        Ok(out)
    }

    /// Every volume as (LSG index, volume index), sorted by start, after checking that no two
    /// ranges of the cluster overlap. Sorted by start (then file order), a range overlaps an
    /// earlier one exactly when it starts before the furthest end seen so far.
    fn routes(
        &self,
        lsgs: &[(Lsg, Vec<Range<usize>>)],
    ) -> Result<Vec<(usize, usize)>, ConfigError> {
        let mut all: Vec<(Range<usize>, (usize, usize))> = lsgs
            .iter()
            .enumerate()
            .flat_map(|(l, (_, spans))| {
                spans
                    .iter()
                    .enumerate()
                    .map(move |(v, span)| (span.clone(), (l, v)))
            })
            .collect();
        let volume = |(l, v): (usize, usize)| (&lsgs[l].0, &lsgs[l].0.volumes[v]);
        all.sort_by(|a, b| {
            volume(a.1)
                .1
                .start
                .cmp(&volume(b.1).1.start)
                .then(a.1.cmp(&b.1))
        });
        let mut furthest: Option<(usize, usize)> = None;
        for (span, at) in &all {
            let (lsg, v) = volume(*at);
            if let Some(prev) = furthest {
                let (prev_lsg, pv) = volume(prev);
                if pv.end.as_ref().is_none_or(|end| v.start < *end) {
                    let whose = if prev_lsg.id == lsg.id {
                        "of the same LSG".to_string()
                    } else {
                        format!("of LSG {}", prev_lsg.id)
                    };
                    return Err(self.err(
                        span.clone(),
                        format!(
                            "key range of volume {:?} (LSG {}) overlaps volume {:?} {whose} (line {})",
                            v.name,
                            lsg.id,
                            pv.name,
                            self.line(&lsgs[prev.0].1[prev.1])
                        ),
                    ));
                }
            }
            let further = match (&furthest.map(|p| volume(p).1), &v.end) {
                (None, _) => true,
                (Some(p), end) => match (&p.end, end) {
                    (Some(pe), Some(e)) => e > pe,
                    (Some(_), None) => true,
                    (None, _) => false,
                },
            };
            if further {
                furthest = Some(*at);
            }
        }
        Ok(all.into_iter().map(|(_, at)| at).collect())
    }
}
