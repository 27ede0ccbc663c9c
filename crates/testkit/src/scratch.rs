//! [`ScratchDir`]: a test's own directory under the system temp directory, removed when the
//! test lets go of it, also when it fails.

use std::path::{Path, PathBuf};

/// A directory named `PREFIX-TAG-PID` under the system temp directory. Whatever was there
/// from an earlier run of the same process id is removed first; the directory itself is not
/// created (the code under test may create it). Declare it before what uses it, so that it is
/// dropped after them.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// The directory for `prefix` and `tag` in this process.
    pub fn new(prefix: &str, tag: &str) -> ScratchDir {
        let d = std::env::temp_dir().join(format!("{prefix}-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        ScratchDir(d)
    }
}

impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_on_drop_and_fresh_on_new() {
        let d = ScratchDir::new("devlend-testkit", "scratch");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        let again = ScratchDir::new("devlend-testkit", "scratch");
        assert!(!again.exists(), "a new one starts empty");
        std::fs::create_dir_all(&*again).unwrap();
        let path = again.to_path_buf();
        drop(again);
        drop(d);
        assert!(!path.exists());
    }
}
