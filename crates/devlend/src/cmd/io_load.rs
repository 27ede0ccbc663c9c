//! `devlend io-load`: random reads or writes on a block device (or a regular file) with
//! O_DIRECT, at queue depth N as N threads each keeping one synchronous I/O outstanding; every
//! I/O's latency on the monotonic clock; one JSON line with IOPS, median, p99 and the count.
//!
//! `bench vm` runs it inside its guests (a load generator with latency percentiles that needs
//! nothing but this binary), and `bench nvme`'s file baseline is the same loop ([`run`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use devlend_nvme_driver::workload::{Limit, Offsets, Pattern, Summary, Workload};
use rustix::fs::{FileType, Mode, OFlags, SeekFrom};

use super::serve::parse_size;

/// Buffers are aligned to this (O_DIRECT needs the device's logical block size; 4 KiB covers
/// 512-byte and 4 KiB sectors).
const ALIGN: usize = 4096;

/// Most threads one run starts.
const MAX_QD: u32 = 256;

/// Arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Block device (or regular file) to load. randwrite overwrites the range.
    #[arg(long)]
    device: PathBuf,
    /// randread or randwrite.
    #[arg(long, value_parser = parse_pattern)]
    pattern: Pattern,
    /// Queue depth: threads, each with one synchronous I/O outstanding.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_QD)))]
    qd: u32,
    /// Bytes per I/O (a non-zero multiple of 512; K, M suffixes).
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    block: u64,
    /// Seconds to run (unless --ios is given).
    #[arg(long, default_value_t = 2.0, conflicts_with = "ios")]
    secs: f64,
    /// Run this many I/Os in all (over every thread) instead of for --secs.
    #[arg(long)]
    ios: Option<u64>,
    /// First byte of the range the I/Os fall in (a multiple of --block).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    offset: u64,
    /// Bytes of that range; default: from --offset to the end of the device.
    #[arg(long, value_parser = parse_size)]
    range: Option<u64>,
    /// Seed of the offsets (thread i draws from seed + 7919 i): same seed, same offsets.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
}

fn parse_pattern(s: &str) -> Result<Pattern, String> {
    match s {
        "randread" => Ok(Pattern::RandRead),
        "randwrite" => Ok(Pattern::RandWrite),
        _ => Err(format!("{s:?} is not a pattern (randread, randwrite)")),
    }
}

/// What can go wrong before or during a run.
#[derive(Debug, thiserror::Error)]
pub enum IoLoadError {
    /// The path is neither a block device nor a regular file.
    #[error("{0} is not a block device (nor a regular file)")]
    NotBlockDevice(PathBuf),
    /// The file system refuses O_DIRECT (tmpfs, for one).
    #[error("{0}: O_DIRECT is not supported here")]
    NoDirect(PathBuf),
    /// The block size is not a non-zero multiple of 512.
    #[error("block size {0} is not a non-zero multiple of 512")]
    BadBlock(u64),
    /// The time limit is not a positive number of seconds.
    #[error("--secs {0} is not a positive number of seconds")]
    BadSecs(f64),
    /// The range's start is not aligned to the block size.
    #[error("offset {offset} is not a multiple of the block size {block}")]
    Unaligned {
        /// Range start.
        offset: u64,
        /// Block size.
        block: u64,
    },
    /// The range ends past the device.
    #[error("range {offset}+{len} ends past the end of the device ({size} bytes)")]
    OutOfRange {
        /// Range start.
        offset: u64,
        /// Range length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// The range holds no whole block.
    #[error("range of {len} bytes is too small for one {block}-byte block")]
    RangeTooSmall {
        /// Range length.
        len: u64,
        /// Block size.
        block: u64,
    },
    /// An I/O or system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A worker thread panicked.
    #[error("an I/O thread panicked")]
    Panicked,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IoLoadError {
    let what = what.into();
    move |source| IoLoadError::Io { what, source }
}

/// Opens `path` with O_DIRECT (read-write for writes) after checking it is a block device or
/// a regular file; returns it with its size in bytes.
pub fn open_direct(path: &Path, write: bool) -> Result<(File, u64), IoLoadError> {
    let st = rustix::fs::stat(path).map_err(|e| io_err(format!("{}", path.display()))(e.into()))?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::BlockDevice | FileType::RegularFile => {}
        _ => return Err(IoLoadError::NotBlockDevice(path.to_path_buf())),
    }
    let access = if write { OFlags::RDWR } else { OFlags::RDONLY };
    let fd = rustix::fs::open(
        path,
        access | OFlags::DIRECT | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::INVAL => IoLoadError::NoDirect(path.to_path_buf()),
        e => io_err(format!("opening {}", path.display()))(e.into()),
    })?;
    // A block device's size is where its end is (stat says 0 for it).
    let size = rustix::fs::seek(&fd, SeekFrom::End(0))
        .map_err(|e| io_err(format!("finding the size of {}", path.display()))(e.into()))?;
    Ok((File::from(fd), size))
}

/// Checks `w` against a file of `size` bytes: the block size, the region's alignment and that
/// it lies inside the file and holds a block. Returns the region `(start, len)`.
pub fn check(w: &Workload, size: u64) -> Result<(u64, u64), IoLoadError> {
    let block = w.block_bytes as u64;
    if block == 0 || !block.is_multiple_of(512) {
        return Err(IoLoadError::BadBlock(block));
    }
    if let Limit::Duration(d) = w.limit {
        if d.is_zero() {
            return Err(IoLoadError::BadSecs(d.as_secs_f64()));
        }
    }
    let (offset, len) = w.region.unwrap_or((0, size));
    if !offset.is_multiple_of(block) {
        return Err(IoLoadError::Unaligned { offset, block });
    }
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(IoLoadError::OutOfRange { offset, len, size });
    }
    if len < block {
        return Err(IoLoadError::RangeTooSmall { len, block });
    }
    Ok((offset, len))
}

/// A `len`-byte slice of `buf` aligned to [`ALIGN`] (`buf` holds `len + ALIGN` bytes).
fn aligned(buf: &mut [u8], len: usize) -> Result<&mut [u8], IoLoadError> {
    let skip = buf.as_ptr().align_offset(ALIGN);
    skip.checked_add(len)
        .and_then(|end| buf.get_mut(skip..end))
        .ok_or_else(|| io_err("aligning a buffer")(std::io::ErrorKind::OutOfMemory.into()))
}

/// Runs `w` on `file` with `w.queue_depth` threads, each one synchronous `pread`/`pwrite` at a
/// time at offsets from [`Offsets`] (thread i seeded `w.seed + 7919 i`) inside `w.region`
/// (default: the whole file), from buffers aligned for O_DIRECT. [`Limit::Ops`] counts I/Os
/// over all threads; [`Limit::Duration`] stops every thread at the same instant (an I/O in
/// flight then completes and is counted).
pub fn run(file: &File, w: &Workload) -> Result<Summary, IoLoadError> {
    // Where the end is: a block device's stat says 0 bytes. (pread/pwrite ignore the position.)
    let size = rustix::fs::seek(file, SeekFrom::End(0))
        .map_err(|e| io_err("finding the file's size")(e.into()))?;
    let (start, len) = check(w, size)?;
    let write = w.pattern == Pattern::RandWrite;
    let block = w.block_bytes;
    let left = AtomicU64::new(match w.limit {
        Limit::Ops(n) => n,
        Limit::Duration(_) => u64::MAX,
    });
    let begin = Instant::now();
    // One end for every thread, however late the scheduler starts it.
    let end = match w.limit {
        Limit::Duration(d) => begin.checked_add(d),
        Limit::Ops(_) => None,
    };
    let results: Vec<Result<Vec<f64>, IoLoadError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..w.queue_depth.max(1))
            .map(|i| {
                let left = &left;
                s.spawn(move || -> Result<Vec<f64>, IoLoadError> {
                    let seed = w.seed.wrapping_add((i as u64).wrapping_mul(7919));
                    let mut offsets = Offsets::new(seed, start, len, block as u64).ok_or(
                        IoLoadError::RangeTooSmall {
                            len,
                            block: block as u64,
                        },
                    )?;
                    let mut storage = vec![i as u8 | 1; block + ALIGN];
                    let buf = aligned(&mut storage, block)?;
                    let mut lat = Vec::new();
                    loop {
                        if end.is_some_and(|e| Instant::now() >= e) {
                            break;
                        }
                        let took = left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            n.checked_sub(1)
                        });
                        if took.is_err() {
                            break;
                        }
                        let at = offsets.next().unwrap_or(start);
                        let t = Instant::now();
                        if write {
                            file.write_all_at(buf, at)
                        } else {
                            file.read_exact_at(buf, at)
                        }
                        .map_err(io_err(format!(
                            "{} of {block} bytes at {at}",
                            w.pattern.name()
                        )))?;
                        lat.push(devlend_bench::micros(t.elapsed()));
                    }
                    Ok(lat)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(IoLoadError::Panicked)))
            .collect()
    });
    let elapsed = begin.elapsed();
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    Ok(Summary::from_latencies(all, block as u64, elapsed))
}

/// The one line `io-load` prints.
fn line(w: &Workload, s: &Summary) -> serde_json::Value {
    serde_json::json!({
        "pattern": w.pattern.name(),
        "qd": w.queue_depth,
        "block_bytes": w.block_bytes,
        "ios": s.ops,
        "secs": s.elapsed.as_secs_f64(),
        "iops": s.iops,
        "median_us": s.median_us,
        "p99_us": s.p99_us,
        "max_us": s.max_us,
    })
}

impl Args {
    /// The workload these arguments ask for (the region not yet checked against a device).
    fn workload(&self, size: u64) -> Result<Workload, IoLoadError> {
        if !(self.secs.is_finite() && self.secs > 0.0) {
            return Err(IoLoadError::BadSecs(self.secs));
        }
        let block = usize::try_from(self.block).map_err(|_| IoLoadError::BadBlock(self.block))?;
        let len = match self.range {
            Some(r) => r,
            None => size.saturating_sub(self.offset),
        };
        Ok(Workload {
            pattern: self.pattern,
            block_bytes: block,
            queue_depth: self.qd as usize,
            limit: match self.ios {
                Some(n) => Limit::Ops(n),
                None => Limit::Duration(Duration::from_secs_f64(self.secs)),
            },
            region: Some((self.offset, len)),
            queue: 0,
            seed: self.seed,
            sequential: false,
        })
    }
}

/// Runs the subcommand.
pub fn run_cmd(args: Args) -> anyhow::Result<()> {
    let (file, size) = open_direct(&args.device, args.pattern == Pattern::RandWrite)?;
    let w = args.workload(size)?;
    check(&w, size)?;
    let summary = run(&file, &w)?;
    println!("{}", line(&w, &summary));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(words: &[&str]) -> Result<Args, clap::Error> {
        Cli::try_parse_from(std::iter::once("io-load").chain(words.iter().copied())).map(|c| c.args)
    }

    /// A scratch file of `len` zero bytes, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str, len: u64) -> Self {
            let p =
                std::env::temp_dir().join(format!("devlend-io-load-{tag}-{}", std::process::id()));
            let f = File::create(&p).expect("creating a scratch file");
            f.set_len(len).expect("sizing it");
            Self(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn arguments_parse_and_bad_ones_are_refused() {
        let a = parse(&["--device", "/x", "--pattern", "randwrite", "--qd", "32"]).expect("parses");
        assert_eq!(a.pattern, Pattern::RandWrite);
        assert_eq!((a.qd, a.block, a.offset, a.range), (32, 4096, 0, None));
        let w = a.workload(1 << 20).expect("a workload");
        assert_eq!(w.region, Some((0, 1 << 20)));
        assert_eq!(w.limit, Limit::Duration(Duration::from_secs(2)));
        let b = parse(&[
            "--device",
            "/x",
            "--pattern",
            "randread",
            "--ios",
            "100",
            "--offset",
            "8K",
            "--range",
            "64K",
        ])
        .expect("parses");
        let w = b.workload(1 << 20).expect("a workload");
        assert_eq!((w.limit, w.region), (Limit::Ops(100), Some((8192, 65536))));
        for bad in [
            &["--device", "/x", "--pattern", "read"][..],
            &["--device", "/x", "--pattern", "randread", "--qd", "0"],
            &["--device", "/x", "--pattern", "randread", "--qd", "257"],
            &["--device", "/x", "--pattern", "randread", "--block", "4Q"],
            &[
                "--device",
                "/x",
                "--pattern",
                "randread",
                "--secs",
                "1",
                "--ios",
                "5",
            ],
            &["--pattern", "randread"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
        let zero =
            parse(&["--device", "/x", "--pattern", "randread", "--secs", "0"]).expect("parses");
        assert!(matches!(
            zero.workload(1 << 20),
            Err(IoLoadError::BadSecs(_))
        ));
    }

    #[test]
    fn bad_devices_and_ranges_are_refused_with_their_reason() {
        assert!(matches!(
            open_direct(Path::new("/dev/null"), false),
            Err(IoLoadError::NotBlockDevice(_))
        ));
        assert!(matches!(
            open_direct(&std::env::temp_dir(), false),
            Err(IoLoadError::NotBlockDevice(_))
        ));
        assert!(matches!(
            open_direct(Path::new("/nonexistent/devlend-io-load"), false),
            Err(IoLoadError::Io { .. })
        ));
        let f = Scratch::new("ranges", 1 << 20);
        let (_, size) = open_direct(&f.0, false).expect("a regular file on a disk opens");
        assert_eq!(size, 1 << 20);
        let w = |block: usize, region: (u64, u64)| Workload {
            block_bytes: block,
            region: Some(region),
            ..Workload::new(Pattern::RandRead, 1, Limit::Ops(1))
        };
        assert!(matches!(
            check(&w(4096, (0, 2048)), size),
            Err(IoLoadError::RangeTooSmall { .. })
        ));
        assert!(matches!(
            check(&w(4096, (4096, 1 << 20)), size),
            Err(IoLoadError::OutOfRange { .. })
        ));
        assert!(matches!(
            check(&w(4096, (u64::MAX, 4096)), size),
            Err(IoLoadError::Unaligned { .. })
        ));
        assert!(matches!(
            check(&w(4096, (512, 4096)), size),
            Err(IoLoadError::Unaligned { .. })
        ));
        assert!(matches!(
            check(&w(1000, (0, 4096)), size),
            Err(IoLoadError::BadBlock(1000))
        ));
        assert_eq!(
            check(&w(4096, (4096, 8192)), size).expect("fits"),
            (4096, 8192)
        );
    }

    /// Writes land only inside the range and on block boundaries, and a count limit runs
    /// exactly that many I/Os over every thread.
    #[test]
    fn writes_stay_inside_the_range_aligned_and_the_count_is_exact() {
        let f = Scratch::new("writes", 1 << 20);
        let (file, size) = open_direct(&f.0, true).expect("opens with O_DIRECT");
        let region = (64 << 10, 128 << 10);
        let w = Workload {
            region: Some(region),
            ..Workload::new(Pattern::RandWrite, 4, Limit::Ops(200))
        };
        let s = run(&file, &w).expect("runs");
        assert_eq!(s.ops, 200);
        assert!(
            s.iops > 0.0 && s.median_us > 0.0 && s.p99_us >= s.median_us,
            "{s:?}"
        );
        drop(file);
        let data = std::fs::read(&f.0).expect("reading back");
        assert_eq!(data.len() as u64, size);
        let (lo, hi) = (region.0 as usize, (region.0 + region.1) as usize);
        assert!(
            data.iter().take(lo).all(|&b| b == 0),
            "written before the range"
        );
        assert!(
            data.iter().skip(hi).all(|&b| b == 0),
            "written after the range"
        );
        let mut touched = 0;
        for block in data.get(lo..hi).expect("range inside").chunks(4096) {
            // Each block is all one thread's fill byte (odd) or untouched: never a torn or
            // shifted write.
            let first = block.first().copied().unwrap_or(0);
            assert!(block.iter().all(|&b| b == first), "unaligned write");
            if first != 0 {
                assert_eq!(first & 1, 1);
                touched += 1;
            }
        }
        assert!(
            touched > 1,
            "random offsets spread over the range: {touched} blocks"
        );
    }

    #[test]
    fn a_timed_read_run_reports_its_figures_in_one_line() {
        let f = Scratch::new("reads", 256 << 10);
        let (file, size) = open_direct(&f.0, false).expect("opens");
        let w = Workload::new(
            Pattern::RandRead,
            2,
            Limit::Duration(Duration::from_millis(50)),
        );
        check(&w, size).expect("the whole file is the range");
        let s = run(&file, &w).expect("runs");
        assert!(s.ops > 0);
        let j = line(&w, &s);
        assert_eq!(j["pattern"], "randread");
        assert_eq!(j["qd"], 2);
        assert_eq!(j["ios"], s.ops);
        let iops = j["iops"].as_f64().expect("iops");
        let secs = j["secs"].as_f64().expect("secs");
        assert!((iops * secs - s.ops as f64).abs() < 1.0, "{j}");
        assert!(j["p99_us"].as_f64() >= j["median_us"].as_f64(), "{j}");
        assert!(!j.to_string().contains('\n'));
    }
}
