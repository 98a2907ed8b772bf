//! Transactions as typed builders: compares, then the operations for
//! either outcome, so the store's compare-and-swap reads as what it means.

use super::{Kv, LeaseId, header_revision, pb};

/// How a compare relates the key's field to the value given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// The field equals the value.
    Equal,
    /// The field is greater.
    Greater,
    /// The field is less.
    Less,
    /// The field differs.
    NotEqual,
}

impl Cmp {
    fn pb(self) -> i32 {
        use pb::compare::CompareResult as R;
        (match self {
            Cmp::Equal => R::Equal,
            Cmp::Greater => R::Greater,
            Cmp::Less => R::Less,
            Cmp::NotEqual => R::NotEqual,
        }) as i32
    }
}

/// One condition of a transaction, on one key. A key that does not exist
/// has version, create and mod revision 0.
#[derive(Debug, Clone)]
pub struct Compare(pb::Compare);

impl Compare {
    fn new(
        key: impl AsRef<[u8]>,
        cmp: Cmp,
        target: pb::compare::CompareTarget,
        value: pb::compare::TargetUnion,
    ) -> Compare {
        Compare(pb::Compare {
            result: cmp.pb(),
            target: target as i32,
            key: key.as_ref().to_vec(),
            target_union: Some(value),
            range_end: Vec::new(),
        })
    }

    /// On the key's version (changes since creation; 0 when absent).
    pub fn version(key: impl AsRef<[u8]>, cmp: Cmp, version: i64) -> Compare {
        use pb::compare::{CompareTarget, TargetUnion};
        Self::new(
            key,
            cmp,
            CompareTarget::Version,
            TargetUnion::Version(version),
        )
    }

    /// On the revision that created the key.
    pub fn create_revision(key: impl AsRef<[u8]>, cmp: Cmp, revision: i64) -> Compare {
        use pb::compare::{CompareTarget, TargetUnion};
        Self::new(
            key,
            cmp,
            CompareTarget::Create,
            TargetUnion::CreateRevision(revision),
        )
    }

    /// On the revision of the key's last change: the compare of a
    /// compare-and-swap against a value read before.
    pub fn mod_revision(key: impl AsRef<[u8]>, cmp: Cmp, revision: i64) -> Compare {
        use pb::compare::{CompareTarget, TargetUnion};
        Self::new(
            key,
            cmp,
            CompareTarget::Mod,
            TargetUnion::ModRevision(revision),
        )
    }

    /// On the lease the key is attached to (None: no lease).
    pub fn lease(key: impl AsRef<[u8]>, cmp: Cmp, lease: Option<LeaseId>) -> Compare {
        use pb::compare::{CompareTarget, TargetUnion};
        Self::new(
            key,
            cmp,
            CompareTarget::Lease,
            TargetUnion::Lease(lease.map_or(0, |l| l.0)),
        )
    }

    /// Holds when the key does not exist.
    pub fn absent(key: impl AsRef<[u8]>) -> Compare {
        Self::create_revision(key, Cmp::Equal, 0)
    }

    /// Holds when the key exists.
    pub fn present(key: impl AsRef<[u8]>) -> Compare {
        Self::create_revision(key, Cmp::Greater, 0)
    }

    /// Holds when no key starts with `prefix`: etcd compares a range key
    /// by key and, for an empty range, against a key that does not exist,
    /// whose version is 0.
    pub fn none_under(prefix: impl AsRef<[u8]>) -> Compare {
        let prefix = prefix.as_ref();
        let mut compare = Self::version(prefix, Cmp::Less, 1);
        compare.0.range_end = super::prefix_end(prefix);
        compare
    }
}

/// One operation of a transaction.
#[derive(Debug, Clone)]
pub struct Op(pb::RequestOp);

impl Op {
    fn of(request: pb::request_op::Request) -> Op {
        Op(pb::RequestOp {
            request: Some(request),
        })
    }

    /// Reads the key.
    pub fn get(key: impl AsRef<[u8]>) -> Op {
        Self::of(pb::request_op::Request::RequestRange(pb::RangeRequest {
            key: key.as_ref().to_vec(),
            ..Default::default()
        }))
    }

    /// Sets the key, attached to `lease` if given.
    pub fn put(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>, lease: Option<LeaseId>) -> Op {
        Self::of(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
            lease: lease.map_or(0, |l| l.0),
            prev_kv: false,
        }))
    }

    /// Deletes the key.
    pub fn delete(key: impl AsRef<[u8]>) -> Op {
        Self::of(pb::request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key: key.as_ref().to_vec(),
                ..Default::default()
            },
        ))
    }

    /// Deletes every key under `prefix`.
    pub fn delete_prefix(prefix: impl AsRef<[u8]>) -> Op {
        let prefix = prefix.as_ref();
        Self::of(pb::request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key: prefix.to_vec(),
                range_end: super::prefix_end(prefix),
                ..Default::default()
            },
        ))
    }

    /// The key (or the first key of the range) the operation is on.
    pub fn key(&self) -> &[u8] {
        use pb::request_op::Request;
        match &self.0.request {
            Some(Request::RequestRange(r)) => &r.key,
            Some(Request::RequestPut(r)) => &r.key,
            Some(Request::RequestDeleteRange(r)) => &r.key,
            None => &[],
        }
    }
}

/// A transaction: `if compares { success } else { failure }`, applied as
/// one revision. At most [`super::MAX_TXN_OPS`] operations in either
/// branch; a key may be written only once in a branch.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    compares: Vec<pb::Compare>,
    success: Vec<pb::RequestOp>,
    failure: Vec<pb::RequestOp>,
}

impl Txn {
    /// An empty transaction: no compares (so it succeeds), no operations.
    pub fn new() -> Txn {
        Txn::default()
    }

    /// Adds conditions; all must hold.
    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Txn {
        self.compares.extend(compares.into_iter().map(|c| c.0));
        self
    }

    /// Adds operations run when every condition holds.
    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Txn {
        self.success.extend(ops.into_iter().map(|o| o.0));
        self
    }

    /// Adds operations run when a condition fails.
    pub fn or_else(mut self, ops: impl IntoIterator<Item = Op>) -> Txn {
        self.failure.extend(ops.into_iter().map(|o| o.0));
        self
    }

    pub(super) fn into_pb(self) -> pb::TxnRequest {
        pb::TxnRequest {
            compare: self.compares,
            success: self.success,
            failure: self.failure,
        }
    }
}

/// What one operation of a transaction gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// A read: the keys found.
    Get(Vec<Kv>),
    /// A put.
    Put,
    /// A delete: how many keys it deleted.
    Delete(i64),
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether the conditions held (so the success branch ran).
    pub succeeded: bool,
    /// The store's revision after it: the transaction's own when it
    /// wrote anything.
    pub revision: i64,
    /// The results of the branch that ran, in order.
    pub results: Vec<OpResult>,
}

impl TxnResult {
    pub(super) fn from_pb(response: pb::TxnResponse) -> TxnResult {
        use pb::response_op::Response;
        TxnResult {
            succeeded: response.succeeded,
            revision: header_revision(response.header.as_ref()),
            results: response
                .responses
                .into_iter()
                .filter_map(|r| r.response)
                .map(|r| match r {
                    Response::ResponseRange(range) => {
                        OpResult::Get(range.kvs.into_iter().map(Kv::from_pb).collect())
                    }
                    Response::ResponsePut(_) => OpResult::Put,
                    Response::ResponseDeleteRange(delete) => OpResult::Delete(delete.deleted),
                })
                .collect(),
        }
    }
}
