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

    /// The path, and the directory is no longer removed on drop (the caller removes it).
    pub fn keep(self) -> PathBuf {
        let mut me = std::mem::ManuallyDrop::new(self);
        std::mem::take(&mut me.0)
    }

    /// The directory for `prefix` and `tag` in this process, created, after the directories
    /// `PREFIX-*-PID` of processes that no longer exist are removed: a test that was killed
    /// or failed before its guard dropped left its directory behind, and the next run
    /// removes it. Directories of live processes are left alone.
    pub fn fresh(prefix: &str, tag: &str) -> std::io::Result<ScratchDir> {
        sweep_dead(prefix);
        let d = ScratchDir::new(prefix, tag);
        std::fs::create_dir_all(&d.0)?;
        Ok(d)
    }
}

/// Removes `PREFIX-*-PID` under the temp directory for every PID without a process.
fn sweep_dead(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let prefix = format!("{prefix}-");
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.rsplit('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
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

    #[test]
    fn fresh_sweeps_the_directories_of_dead_processes_only() {
        // A pid above the kernel's limit (2^22) belongs to no process.
        let dead = std::env::temp_dir().join("devlend-testkit-sweep-t-4194305");
        let live = std::env::temp_dir().join("devlend-testkit-sweep-t-1");
        std::fs::create_dir_all(dead.join("sub")).unwrap();
        std::fs::create_dir_all(&live).unwrap();
        let d = ScratchDir::fresh("devlend-testkit-sweep", "fresh").unwrap();
        assert!(d.is_dir());
        assert!(!dead.exists(), "a dead process's directory stays");
        assert!(live.exists(), "pid 1's directory was removed");
        let _ = std::fs::remove_dir_all(&live);
    }
}
