//! Progress on stderr for anything that takes more than a second: after [`Progress::DELAY`]
//! (or `DEVLEND_PROGRESS_DELAY_MS` milliseconds) a line `devlend: WHAT... N s` is redrawn in
//! place until the work ends, then erased. Only when stderr is a terminal: a pipe or a log file
//! gets no progress bytes.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// An elapsed-time indicator that lives as long as the work.
pub struct Progress {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// How long work runs before progress shows, unless `DEVLEND_PROGRESS_DELAY_MS` says otherwise.
    pub const DELAY: Duration = Duration::from_secs(1);

    /// The delay in force: `DEVLEND_PROGRESS_DELAY_MS` when it is a number, else [`Self::DELAY`].
    fn delay() -> Duration {
        std::env::var("DEVLEND_PROGRESS_DELAY_MS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(Self::DELAY, Duration::from_millis)
    }

    /// Starts showing `what` (silent unless stderr is a terminal).
    pub fn start(what: String) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let thread = std::io::stderr().is_terminal().then(|| {
            let done = done.clone();
            let delay = Self::delay();
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut shown = false;
                while !done.load(Ordering::Acquire) {
                    let t = start.elapsed();
                    if t >= delay && (t.subsec_millis() < 100 || !shown) {
                        let mut e = std::io::stderr().lock();
                        let _ = write!(e, "\r\x1b[2Kdevlend: {what}... {} s", t.as_secs());
                        let _ = e.flush();
                        shown = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                if shown {
                    let _ = write!(std::io::stderr(), "\r\x1b[2K");
                }
            })
        });
        Self { done, thread }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
