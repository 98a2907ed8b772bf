//! The process's open-file limit, raised at start: every connection is a
//! file descriptor, and the usual soft limit is far below both what the
//! hard limit allows and what `connections.max_per_port` means to hold.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Raises the soft RLIMIT_NOFILE to the hard limit, where that is allowed,
/// and says at debug level what the limit is now.
pub fn raise_file_limit() {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(err) => {
            tracing::debug!(%err, "cannot read the open-file limit");
            return;
        }
    };
    if soft >= hard {
        tracing::debug!(soft, hard, "the open-file limit is at its hard limit");
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
        // An unlimited hard limit is refused on some systems (Linux caps
        // it at fs.nr_open, macOS at OPEN_MAX); the soft limit stays.
        Err(err) => tracing::debug!(%err, soft, hard, "cannot raise the open-file limit"),
    }
}
