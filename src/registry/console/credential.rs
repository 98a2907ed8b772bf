//! The console user's credential: the user `admin` and a password of
//! which only an Argon2id hash is kept. There is no default password. The
//! password is either configuration's (`registry.console.password`), or
//! the one whose hash is in the data dir: the first start makes a random
//! one, writes its hash (`console.password.hash`) and the password itself
//! to `console.initial-password` for the operator to read, both readable
//! by the registry's user alone, and logs where it is. Changing the
//! password through the console removes that file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use parking_lot::RwLock;

use crate::registry::Error;

/// The console's one user.
pub const USER: &str = "admin";

/// The file the password's hash is kept in, in the data dir.
pub const HASH_FILE: &str = "console.password.hash";

/// The file the first start writes the password it made to.
pub const INITIAL_PASSWORD_FILE: &str = "console.initial-password";

/// The shortest password taken.
pub const MIN_PASSWORD_LEN: usize = 12;

/// The longest: what Argon2 hashes, a person types.
pub const MAX_PASSWORD_LEN: usize = 1024;

/// The console user's credential. Cheap to clone.
#[derive(Clone)]
pub struct Credential {
    inner: Arc<Inner>,
}

struct Inner {
    /// The PHC string of the password's hash.
    hash: RwLock<String>,
    /// Where the hash is kept; None when configuration gives the password.
    dir: Option<PathBuf>,
}

impl Credential {
    /// The credential configuration gives (`password` set), or the one in
    /// `dir`, made there on the first start.
    pub async fn open(password: &crate::auth::Secret, dir: &Path) -> anyhow::Result<Credential> {
        if password.is_set() {
            check_new(password.expose())?;
            let hash = hash(password.expose().to_string()).await?;
            return Ok(Credential::with(hash, None));
        }
        let path = dir.join(HASH_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let hash = text.trim().to_string();
                PasswordHash::new(&hash).map_err(|err| {
                    anyhow::anyhow!(
                        "{} does not hold a password hash ({err}); remove it and restart to make a new password",
                        path.display()
                    )
                })?;
                Ok(Credential::with(hash, Some(dir.to_path_buf())))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Credential::first(dir).await,
            Err(err) => Err(anyhow::anyhow!("cannot read {}: {err}", path.display())),
        }
    }

    fn with(hash: String, dir: Option<PathBuf>) -> Credential {
        Credential {
            inner: Arc::new(Inner {
                hash: RwLock::new(hash),
                dir,
            }),
        }
    }

    /// The first start: a random password, its hash put in place only if
    /// no other node sharing the data dir put one there first.
    async fn first(dir: &Path) -> anyhow::Result<Credential> {
        let password = random_password();
        let hash = hash(password.clone()).await?;
        let nonce: u64 = rand::random();
        let cannot = |what: &Path, err: std::io::Error| {
            anyhow::anyhow!("cannot write {}: {err}", what.display())
        };
        let password_tmp = dir.join(format!("{INITIAL_PASSWORD_FILE}.{nonce:016x}.tmp"));
        let hash_tmp = dir.join(format!("{HASH_FILE}.{nonce:016x}.tmp"));
        crate::auth::write_private(&password_tmp, &password)
            .map_err(|err| cannot(&password_tmp, err))?;
        crate::auth::write_private(&hash_tmp, &hash).map_err(|err| cannot(&hash_tmp, err))?;
        // A link fails when the name is taken: the hash goes in place once
        // however many nodes start together over one data dir.
        let path = dir.join(HASH_FILE);
        let linked = std::fs::hard_link(&hash_tmp, &path);
        let _ = std::fs::remove_file(&hash_tmp);
        match linked {
            Ok(()) => {
                let initial = dir.join(INITIAL_PASSWORD_FILE);
                crate::auth::publish(&password_tmp, &initial)
                    .map_err(|err| cannot(&initial, err))?;
                tracing::warn!(
                    file = %initial.display(),
                    user = USER,
                    "made the console's password; read it from this file to log in, then change it in the console"
                );
                Ok(Credential::with(hash, Some(dir.to_path_buf())))
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                let _ = std::fs::remove_file(&password_tmp);
                Box::pin(Credential::open(&crate::auth::Secret::default(), dir)).await
            }
            Err(err) => {
                let _ = std::fs::remove_file(&password_tmp);
                Err(cannot(&path, err))
            }
        }
    }

    /// Whether `user` and `password` are the console user's, checked
    /// off the async threads (a check costs Argon2's work on purpose).
    /// The user is compared after the hash, so a wrong user costs what a
    /// wrong password does.
    pub async fn verify(&self, user: &str, password: &str) -> bool {
        if password.len() > MAX_PASSWORD_LEN {
            return false;
        }
        let hash = self.inner.hash.read().clone();
        let password = password.to_string();
        let matched = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash).is_ok_and(|parsed| {
                argon2::Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false);
        matched && user == USER
    }

    /// Changes the password from `current` to `new`: stored durably
    /// before it is taken, and the initial password's file removed.
    pub async fn change(&self, current: &str, new: &str) -> Result<(), Error> {
        let Some(dir) = &self.inner.dir else {
            return Err(Error::FailedPrecondition(
                "the console's password is set by configuration (registry.console.password); change it there".into(),
            ));
        };
        if !self.verify(USER, current).await {
            return Err(Error::PermissionDenied(
                "the current password is not right; nothing was changed".into(),
            ));
        }
        check_new(new).map_err(|err| Error::invalid("new", err.to_string()))?;
        if new == current {
            return Err(Error::invalid("new", "is the current password"));
        }
        let hash = hash(new.to_string())
            .await
            .map_err(|err| Error::Unavailable(format!("cannot hash the password: {err}")))?;
        let path = dir.join(HASH_FILE);
        let tmp = dir.join(format!("{HASH_FILE}.{:016x}.tmp", rand::random::<u64>()));
        let stored = crate::auth::write_private(&tmp, &hash)
            .and_then(|()| crate::auth::publish(&tmp, &path));
        if let Err(err) = stored {
            let _ = std::fs::remove_file(&tmp);
            tracing::error!(file = %path.display(), %err, "cannot store the console's new password");
            return Err(Error::Unavailable(format!(
                "cannot store the new password in the data dir ({err}); the old one stands"
            )));
        }
        *self.inner.hash.write() = hash;
        let _ = std::fs::remove_file(dir.join(INITIAL_PASSWORD_FILE));
        tracing::info!(user = USER, "the console's password was changed");
        Ok(())
    }
}

/// A new password must be long enough to resist guessing, and short
/// enough to hash.
fn check_new(password: &str) -> anyhow::Result<()> {
    let chars = password.chars().count();
    anyhow::ensure!(
        chars >= MIN_PASSWORD_LEN,
        "a console password needs at least {MIN_PASSWORD_LEN} characters"
    );
    anyhow::ensure!(
        password.len() <= MAX_PASSWORD_LEN,
        "a console password has at most {MAX_PASSWORD_LEN} bytes"
    );
    Ok(())
}

/// 20 characters from a 58-letter alphabet with no look-alikes: about
/// 117 bits.
fn random_password() -> String {
    const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    use rand::Rng;
    let mut rng = rand::rng();
    (0..20)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The Argon2id hash of `password` with a fresh salt, as a PHC string.
async fn hash(password: String) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
            .map_err(|err| anyhow::anyhow!("cannot make a salt: {err}"))?;
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|err| anyhow::anyhow!("cannot hash the console's password: {err}"))
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn the_first_start_makes_a_password_keeps_its_hash_and_hands_it_out_privately() {
        let dir = tempfile::tempdir().unwrap();
        let credential = Credential::open(&Default::default(), dir.path())
            .await
            .unwrap();
        let initial = dir.path().join(INITIAL_PASSWORD_FILE);
        let password = std::fs::read_to_string(&initial).unwrap();
        let password = password.trim();
        assert_eq!(password.len(), 20);
        let hash = std::fs::read_to_string(dir.path().join(HASH_FILE)).unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(!hash.contains(password));
        for file in [HASH_FILE, INITIAL_PASSWORD_FILE] {
            let mode = std::fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        assert!(credential.verify(USER, password).await);
        assert!(!credential.verify(USER, "not-the-password").await);
        assert!(!credential.verify("root", password).await);
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        // The next start keeps it; a change replaces it and removes the
        // handed-out file.
        let again = Credential::open(&Default::default(), dir.path())
            .await
            .unwrap();
        assert!(again.verify(USER, password).await);
        assert!(matches!(
            again.change("wrong", "a-new-long-password").await,
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            again.change(password, "short").await,
            Err(Error::InvalidArgument { .. })
        ));
        again.change(password, "a-new-long-password").await.unwrap();
        assert!(!initial.exists());
        let third = Credential::open(&Default::default(), dir.path())
            .await
            .unwrap();
        assert!(third.verify(USER, "a-new-long-password").await);
        assert!(!third.verify(USER, password).await);
    }

    #[tokio::test]
    async fn configuration_gives_the_password_and_the_data_dir_holds_none() {
        let dir = tempfile::tempdir().unwrap();
        let secret = crate::auth::Secret::from("configured-password".to_string());
        let credential = Credential::open(&secret, dir.path()).await.unwrap();
        assert!(credential.verify(USER, "configured-password").await);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(matches!(
            credential
                .change("configured-password", "another-long-one")
                .await,
            Err(Error::FailedPrecondition(_))
        ));
        let short = crate::auth::Secret::from("short".to_string());
        let err = Credential::open(&short, dir.path())
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("at least 12 characters"), "{err}");
    }

    #[tokio::test]
    async fn nodes_starting_together_over_one_data_dir_share_one_password() {
        let dir = tempfile::tempdir().unwrap();
        let unset = crate::auth::Secret::default();
        let opened =
            futures::future::join_all((0..4).map(|_| Credential::open(&unset, dir.path()))).await;
        let password = std::fs::read_to_string(dir.path().join(INITIAL_PASSWORD_FILE)).unwrap();
        for credential in opened {
            assert!(credential.unwrap().verify(USER, password.trim()).await);
        }
    }
}
