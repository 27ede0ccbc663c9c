//! Child processes of a test that must not outlive it.

use std::process::Child;

/// A child process killed (SIGKILL) and reaped when dropped, or earlier by [`kill9`].
///
/// [`kill9`]: KillOnDrop::kill9
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// SIGKILL, and reap (nothing if it is gone already).
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill9();
    }
}
