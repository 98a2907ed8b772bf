//! The key the registry signs service identities with (see
//! [`crate::auth::identity`]): made at the first start and kept where the
//! rest of what must last is, in the data dir (readable by the registry's
//! user only) or, on a cluster, in etcd, where the first node to start
//! puts it and every node reads it, so an identity one node made is
//! accepted with the key any node hands out.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use super::Registry;
use crate::auth::identity::{PublicKey, Signer};
use crate::etcd::{self, Compare, Op, Txn};
use crate::registry::cluster::Node;
use crate::registry::persist;

/// The file the key is kept in, in the data dir.
pub const IDENTITY_KEY_FILE: &str = "identity.key";

/// Its key on a cluster, under the prefix.
const IDENTITY_KEY: &str = "identity-key";

impl Registry {
    /// An identity of `service` of `namespace` for `audience`, good for
    /// `registry.auth.identity_ttl`; the caller's right to it is checked
    /// before. Answers its text and when it expires.
    pub fn issue_identity(&self, namespace: &str, service: &str, audience: &str) -> (String, u64) {
        let ttl = self.inner.config.auth.identity_ttl;
        self.inner.signer.issue(namespace, service, audience, ttl)
    }

    /// The public key identities are checked with.
    pub fn identity_key(&self) -> PublicKey {
        self.inner.signer.public()
    }
}

/// The key kept in `dir`, made and written there (mode 0600) if there is
/// none. A file that holds no key is an error, never replaced: identities
/// made with the key it held would stop being accepted.
pub(super) fn load_or_create(dir: &Path) -> Result<Signer, persist::Error> {
    let path = dir.join(IDENTITY_KEY_FILE);
    let unreadable = |reason: String| persist::Error::Unreadable {
        path: path.clone(),
        reason,
    };
    let io = |error: std::io::Error| persist::Error::Io {
        dir: dir.to_path_buf(),
        error,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let pkcs8 = B64
                .decode(text.trim())
                .map_err(|err| unreadable(format!("not a key: {err}")))?;
            Signer::from_pkcs8(&pkcs8).map_err(|err| unreadable(format!("not a key: {err}")))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let signer = Signer::generate();
            let tmp = dir.join(format!("{IDENTITY_KEY_FILE}.tmp"));
            crate::auth::write_private(&tmp, &B64.encode(signer.pkcs8())).map_err(io)?;
            crate::auth::publish(&tmp, &path).map_err(io)?;
            tracing::info!(file = %path.display(), key = %signer.public().id, "made the key service identities are signed with");
            Ok(signer)
        }
        Err(err) => Err(io(err)),
    }
}

/// The cluster's key: put by the first node that starts, read by all.
pub(super) async fn from_etcd(node: &Node) -> Result<Signer, etcd::Error> {
    let key = format!("{}/{IDENTITY_KEY}", node.prefix);
    let made = Signer::generate();
    node.etcd
        .txn(Txn::new().when([Compare::absent(&key)]).and_then([Op::put(
            &key,
            B64.encode(made.pkcs8()),
            None,
        )]))
        .await?;
    let failed = |message: String| etcd::Error {
        endpoints: node.etcd.endpoints().into(),
        op: "read the identity key",
        kind: etcd::ErrorKind::Failed,
        message,
    };
    let kv = node
        .etcd
        .get(&key)
        .await?
        .ok_or_else(|| failed(format!("{key} is gone just after it was put")))?;
    let pkcs8 = B64
        .decode(&kv.value)
        .map_err(|err| failed(format!("{key} holds no key: {err}")))?;
    Signer::from_pkcs8(&pkcs8).map_err(|err| failed(format!("{key} holds no key: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_private_and_read_back_after() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let made = load_or_create(dir.path()).unwrap();
        let path = dir.path().join(IDENTITY_KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create(dir.path()).unwrap().public(), made.public());

        std::fs::write(&path, "garbage").unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a key"), "{err}");
        // Never replaced behind the operator's back.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "garbage");
    }
}
