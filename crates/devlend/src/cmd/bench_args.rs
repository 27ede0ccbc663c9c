//! The options every interleaved-sample benchmark takes (`bench lending`, `bench sharing`,
//! `bench cmb`), flattened first into each command's own `Args` (which keeps `--dir` last, so
//! that `--help` lists the options in the order it always did).

/// Sample length and count, and the output form. A command renames what one of
/// its "sides" is in `--reps`'s help (`mut_arg`).
#[derive(clap::Args)]
pub struct SampleArgs {
    /// Seconds per sample.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Samples per side (interleaved with the baseline's); medians are reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// A short run (for smoke tests).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Print JSON (docs/BENCH.md) instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

impl SampleArgs {
    /// Seconds per sample and samples per side: one sample of 0.2 s when `--quick`, otherwise
    /// at least 0.1 s and one sample.
    pub(crate) fn plan(&self) -> (f64, usize) {
        if self.quick {
            (0.2, 1)
        } else {
            (self.seconds.max(0.1), self.reps.max(1))
        }
    }
}
