//! Transactions: routed by key, within one LSG.

use std::ops::Bound;
use std::sync::Arc;

use duplex_host::{Answer, Session};
use duplex_lsg::LsgId;
use duplex_owner::{ClientReply, Op, OpError};
use duplex_pair::{Receipt, Reply, TxId};
use tracing::{Instrument, debug_span};

use crate::cluster::ClientSession;
use crate::error::{ClientError, show_key};

/// A committed transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub lsg: Option<LsgId>,
    pub tx: Option<TxId>,
    /// How durable the commit is (SPEC §2); `None` for a transaction that did nothing.
    pub receipt: Option<Receipt>,
    /// How many times the commit was sent again (a takeover while it was in flight).
    pub resends: u32,
}

/// One transaction of a [`ClientSession`]. See the crate docs.
#[derive(Debug)]
pub struct Transaction<'a> {
    session: &'a ClientSession,
    lsg: Option<LsgId>,
    tx: Option<TxId>,
    ended: bool,
}

impl<'a> Transaction<'a> {
    pub(crate) fn new(session: &'a ClientSession) -> Self {
        Transaction {
            session,
            lsg: None,
            tx: None,
            ended: false,
        }
    }

    pub fn id(&self) -> Option<TxId> {
        self.tx
    }

    pub fn lsg(&self) -> Option<LsgId> {
        self.lsg
    }

    /// The LSG and volume of `key`, checked against the transaction's LSG.
    fn route(&self, key: &[u8]) -> Result<(LsgId, String), ClientError> {
        let config = self.session.cluster().config();
        let route = config
            .route(key)
            .ok_or_else(|| ClientError::NoVolume { key: show_key(key) })?;
        if let Some(first) = self.lsg
            && first != route.lsg.id
        {
            return Err(ClientError::CrossLsg {
                tx: self.tx,
                first,
                second: route.lsg.id,
                key: show_key(key),
            });
        }
        Ok((route.lsg.id, route.volume.name.clone()))
    }

    /// The session and transaction in `lsg`, beginning it there at its first operation.
    async fn begun(&mut self, lsg: LsgId) -> Result<(Arc<Session>, TxId), ClientError> {
        if self.ended {
            return Err(ClientError::Ended);
        }
        let session = self.session.in_lsg(lsg);
        if let Some(tx) = self.tx {
            return Ok((session, tx));
        }
        let answer = session.request(None, Op::Begin).await?;
        match answer.reply {
            ClientReply::Began(tx) => {
                self.lsg = Some(lsg);
                self.tx = Some(tx);
                Ok((session, tx))
            }
            reply => Err(unexpected("begin", reply)),
        }
    }

    async fn op(
        &mut self,
        key: &[u8],
        what: &str,
        op: impl FnOnce(String) -> Op,
    ) -> Result<ClientReply, ClientError> {
        let (lsg, volume) = self.route(key)?;
        let (session, tx) = self.begun(lsg).await?;
        let span = debug_span!("txn_op", %lsg, %tx, what);
        let answer = session
            .request(Some(tx), op(volume))
            .instrument(span)
            .await?;
        self.check(answer)
    }

    fn check(&mut self, answer: Answer) -> Result<ClientReply, ClientError> {
        match answer.reply {
            ClientReply::Error(OpError::Aborted { tx, reason }) => {
                self.ended = true;
                Err(ClientError::Aborted { tx, reason })
            }
            ClientReply::Error(OpError::UnknownTransaction { tx }) => {
                self.ended = true;
                Err(ClientError::Refused(OpError::UnknownTransaction { tx }))
            }
            ClientReply::Error(e) => Err(ClientError::Refused(e)),
            reply => Ok(reply),
        }
    }

    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        let k = key.to_vec();
        match self
            .op(key, "get", |volume| Op::Get { volume, key: k })
            .await?
        {
            ClientReply::Value(v) => Ok(v),
            reply => Err(unexpected("get", reply)),
        }
    }

    pub async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        let (k, v) = (key.to_vec(), value.to_vec());
        match self
            .op(key, "put", |volume| Op::Put {
                volume,
                key: k,
                value: v,
            })
            .await?
        {
            ClientReply::Written => Ok(()),
            reply => Err(unexpected("put", reply)),
        }
    }

    pub async fn delete(&mut self, key: &[u8]) -> Result<(), ClientError> {
        let k = key.to_vec();
        match self
            .op(key, "delete", |volume| Op::Delete { volume, key: k })
            .await?
        {
            ClientReply::Written => Ok(()),
            reply => Err(unexpected("delete", reply)),
        }
    }

    /// Rows with keys in `[start, end)` (`end` `None`: to the end of the key space), at most
    /// `limit`, in key order, across the volumes of the transaction's LSG.
    pub async fn scan(
        &mut self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: u32,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ClientError> {
        let mut rows = Vec::new();
        let mut from = start.to_vec();
        let volumes = self
            .session
            .cluster()
            .config()
            .lsgs()
            .iter()
            .map(|l| l.volumes.len())
            .sum::<usize>();
        for _ in 0..volumes.max(1) {
            if end.is_some_and(|e| from.as_slice() >= e) || rows.len() >= limit as usize {
                break;
            }
            let config = self.session.cluster().config();
            let Some(route) = config.route(&from) else {
                break;
            };
            let volume_end = route.volume.end.as_ref().map(|b| b.as_bytes().to_vec());
            let to = match (end, &volume_end) {
                (Some(e), Some(v)) => Some(if e <= v.as_slice() {
                    e.to_vec()
                } else {
                    v.clone()
                }),
                (Some(e), None) => Some(e.to_vec()),
                (None, v) => v.clone(),
            };
            let left = limit - rows.len() as u32;
            let (s, t) = (from.clone(), to.clone());
            let reply = self
                .op(&from, "scan", |volume| Op::Scan {
                    volume,
                    start: Bound::Included(s),
                    end: t.map_or(Bound::Unbounded, Bound::Excluded),
                    limit: left,
                })
                .await?;
            match reply {
                ClientReply::Rows(r) => rows.extend(r),
                reply => return Err(unexpected("scan", reply)),
            }
            match volume_end {
                Some(v) if end.is_none_or(|e| e > v.as_slice()) => from = v,
                _ => break,
            }
        }
        Ok(rows)
    }

    /// Commits; the receipt says how durable the commit is. A transaction that did nothing
    /// commits without a request.
    pub async fn commit(mut self) -> Result<Committed, ClientError> {
        let (Some(lsg), Some(tx)) = (self.lsg, self.tx) else {
            self.ended = true;
            return Ok(Committed {
                lsg: None,
                tx: None,
                receipt: None,
                resends: 0,
            });
        };
        if self.ended {
            return Err(ClientError::Ended);
        }
        let session = self.session.in_lsg(lsg);
        let answer = session.request(Some(tx), Op::Commit).await?;
        self.ended = true;
        let resends = answer.resends;
        match self.check(answer)? {
            ClientReply::Outcome(Reply::Committed(receipt)) => Ok(Committed {
                lsg: Some(lsg),
                tx: Some(tx),
                receipt: Some(receipt),
                resends,
            }),
            ClientReply::Outcome(Reply::Aborted(reason)) => {
                Err(ClientError::Aborted { tx, reason })
            }
            reply => Err(unexpected("commit", reply)),
        }
    }

    /// Aborts (a transaction that did nothing ends without a request).
    pub async fn abort(mut self) -> Result<(), ClientError> {
        let (Some(lsg), Some(tx)) = (self.lsg, self.tx) else {
            return Ok(());
        };
        if self.ended {
            return Ok(());
        }
        self.ended = true;
        let session = self.session.in_lsg(lsg);
        let answer = session.request(Some(tx), Op::Abort).await?;
        match answer.reply {
            ClientReply::Outcome(_) | ClientReply::Error(OpError::UnknownTransaction { .. }) => {
                Ok(())
            }
            ClientReply::Error(e) => Err(ClientError::Refused(e)),
            reply => Err(unexpected("abort", reply)),
        }
    }
}

fn unexpected(request: &str, reply: ClientReply) -> ClientError {
    ClientError::Unexpected {
        request: request.to_string(),
        reply,
    }
}
