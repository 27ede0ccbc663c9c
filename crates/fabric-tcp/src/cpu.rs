//! CPU placement of threads (`sched_setaffinity`), for [`crate::ThreadCpus`] and the benchmark.
//!
//! A bulk transfer keeps three threads busy: the caller sealing records, the writer thread in
//! the kernel's send path (which on a veth or loopback link also runs the receiving side's TCP
//! processing), and the peer's reader opening records. On a machine with two CPUs the
//! scheduler tends to wake the caller on the writer's CPU, where it takes a quarter of the
//! CPU that limits the stream. Giving the writer a CPU of its own avoids that; this module
//! does the pinning.

use std::io;

use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// The CPUs the calling thread may run on, in ascending order.
pub fn allowed() -> io::Result<Vec<usize>> {
    let set = sched_getaffinity(None)?;
    Ok((0..CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect())
}

/// Restricts the calling thread to `cpus` (which must not be empty).
pub fn pin(cpus: &[usize]) -> io::Result<()> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        if cpu >= CpuSet::MAX_CPU {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {cpu} is beyond the largest CPU set"),
            ));
        }
        set.set(cpu);
    }
    sched_setaffinity(None, &set)?;
    Ok(())
}

/// Pins the calling thread to `cpu` if one is given; a failure is logged, and the thread runs
/// wherever the scheduler puts it.
pub(crate) fn place(cpu: Option<usize>, thread: &str) {
    if let Some(cpu) = cpu {
        if let Err(e) = pin(&[cpu]) {
            tracing::warn!(thread, cpu, error = %e, "could not pin a fabric thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_restricts_the_thread_and_can_be_undone() {
        std::thread::spawn(|| {
            let all = allowed().unwrap();
            assert!(!all.is_empty());
            let last = *all.last().unwrap();
            pin(&[last]).unwrap();
            assert_eq!(allowed().unwrap(), vec![last]);
            pin(&all).unwrap();
            assert_eq!(allowed().unwrap(), all);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn impossible_sets_are_refused() {
        assert_eq!(
            pin(&[libc::CPU_SETSIZE as usize]).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        // An empty set: no CPU to run on.
        std::thread::spawn(|| assert!(pin(&[]).is_err()))
            .join()
            .unwrap();
    }
}
