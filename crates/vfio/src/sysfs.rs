//! Finding a PCI function in sysfs, checking that VFIO can own it, and binding it to
//! `vfio-pci` (and back to the driver it had).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The driver VFIO needs.
pub const VFIO_PCI: &str = "vfio-pci";

/// What went wrong looking up or binding a function.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// Not a PCI address.
    #[error("{0:?} is not a PCI address (DDDD:BB:DD.F or BB:DD.F)")]
    BadBdf(String),
    /// No such function.
    #[error("no PCI function {0} (nothing at {1})")]
    NoDevice(Bdf, PathBuf),
    /// Bound to another driver and `--bind` not given.
    #[error("{bdf} is bound to {driver}; give --bind to move it to vfio-pci (devlend gives it back to {driver} when it is removed)")]
    BoundElsewhere {
        /// The function.
        bdf: Bdf,
        /// Its driver.
        driver: String,
    },
    /// Not in an IOMMU group.
    #[error("{0} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on) so VFIO can isolate its DMA")]
    NoIommuGroup(Bdf),
    /// Another function in the group is used by a driver.
    #[error("IOMMU group {group} of {bdf} also holds {other}, bound to {driver}: VFIO needs every function of the group unbound or on vfio-pci")]
    GroupInUse {
        /// The function.
        bdf: Bdf,
        /// Its group.
        group: u32,
        /// The other function.
        other: String,
        /// Its driver.
        driver: String,
    },
    /// Binding did not take.
    #[error("{bdf} did not bind to vfio-pci (it is on {now}): is the vfio-pci module loaded?")]
    BindFailed {
        /// The function.
        bdf: Bdf,
        /// What it is bound to now.
        now: String,
    },
    /// A sysfs file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A PCI function address: domain, bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus.
    pub bus: u8,
    /// Device, 0 to 31.
    pub device: u8,
    /// Function, 0 to 7.
    pub function: u8,
}

impl FromStr for Bdf {
    type Err = SysfsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SysfsError::BadBdf(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, rest) = match parts.as_slice() {
            [d, b, r] => (u16::from_str_radix(d, 16).map_err(|_| bad())?, *b, *r),
            [b, r] => (0, *b, *r),
            _ => return Err(bad()),
        };
        let (dev, fun) = rest.split_once('.').ok_or_else(bad)?;
        let hex = |v: &str, digits: usize| {
            (v.len() <= digits && !v.is_empty())
                .then(|| u8::from_str_radix(v, 16).ok())
                .flatten()
        };
        let bdf = Bdf {
            domain,
            bus: hex(bus, 2).ok_or_else(bad)?,
            device: hex(dev, 2).filter(|d| *d < 32).ok_or_else(bad)?,
            function: hex(fun, 1).filter(|f| *f < 8).ok_or_else(bad)?,
        };
        Ok(bdf)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// What a function says about itself in sysfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (base, sub, programming interface).
    pub class: u32,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:04x}:{:04x}] class {:06x}",
            self.vendor, self.device, self.class
        )
    }
}

/// The PCI part of sysfs (normally `/sys/bus/pci`; tests use a directory of their own).
#[derive(Clone, Debug)]
pub struct PciSysfs {
    root: PathBuf,
}

impl Default for PciSysfs {
    fn default() -> Self {
        Self::new("/sys/bus/pci")
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SysfsError + '_ {
    move |source| SysfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

impl PciSysfs {
    /// Sysfs rooted at `root` (the directory holding `devices/`, `drivers/`, `drivers_probe`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The function's directory (`ROOT/devices/BDF`), which must exist.
    pub fn device_dir(&self, bdf: Bdf) -> Result<PathBuf, SysfsError> {
        let dir = self.root.join("devices").join(bdf.to_string());
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(SysfsError::NoDevice(bdf, dir))
        }
    }

    fn hex(&self, bdf: Bdf, file: &str) -> Result<u32, SysfsError> {
        let path = self.device_dir(bdf)?.join(file);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let t = text.trim();
        u32::from_str_radix(t.trim_start_matches("0x"), 16).map_err(|_| SysfsError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{t:?}")),
        })
    }

    /// Vendor, device and class.
    pub fn identity(&self, bdf: Bdf) -> Result<Identity, SysfsError> {
        Ok(Identity {
            vendor: self.hex(bdf, "vendor")? as u16,
            device: self.hex(bdf, "device")? as u16,
            class: self.hex(bdf, "class")? & 0xff_ffff,
        })
    }

    /// The driver bound to the function, if any.
    pub fn driver(&self, bdf: Bdf) -> Result<Option<String>, SysfsError> {
        Ok(link_name(&self.device_dir(bdf)?.join("driver")))
    }

    /// The function's IOMMU group.
    pub fn iommu_group(&self, bdf: Bdf) -> Result<u32, SysfsError> {
        link_name(&self.device_dir(bdf)?.join("iommu_group"))
            .and_then(|g| g.parse().ok())
            .ok_or(SysfsError::NoIommuGroup(bdf))
    }

    /// Checks that VFIO may own the function's group: every other function in it is unbound or
    /// on vfio-pci (PCIe ports, which VFIO tolerates, excepted). Returns the group.
    pub fn check_group(&self, bdf: Bdf) -> Result<u32, SysfsError> {
        let group = self.iommu_group(bdf)?;
        let members = self.device_dir(bdf)?.join("iommu_group").join("devices");
        let entries = std::fs::read_dir(&members).map_err(io(&members))?;
        for e in entries.flatten() {
            let other = e.file_name().to_string_lossy().into_owned();
            if other == bdf.to_string() {
                continue;
            }
            if let Some(driver) = link_name(&e.path().join("driver")) {
                if driver != VFIO_PCI && driver != "pcieport" {
                    return Err(SysfsError::GroupInUse {
                        bdf,
                        group,
                        other,
                        driver,
                    });
                }
            }
        }
        Ok(group)
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), SysfsError> {
        std::fs::write(path, value).map_err(io(path))
    }

    /// Puts the function on vfio-pci: `driver_override`, unbind from its driver, probe.
    /// Returns a binding that gives it back when dropped. A function already on vfio-pci gets
    /// a binding that leaves it there. Without `allow_move`, a function bound to another
    /// driver is refused (nothing changed).
    pub fn bind_vfio(&self, bdf: Bdf, allow_move: bool) -> Result<VfioBinding, SysfsError> {
        let dir = self.device_dir(bdf)?;
        let previous = self.driver(bdf)?;
        if previous.as_deref() == Some(VFIO_PCI) {
            return Ok(VfioBinding {
                sysfs: self.clone(),
                bdf,
                previous: None,
                moved: false,
            });
        }
        if let (Some(driver), false) = (&previous, allow_move) {
            return Err(SysfsError::BoundElsewhere {
                bdf,
                driver: driver.clone(),
            });
        }
        let binding = VfioBinding {
            sysfs: self.clone(),
            bdf,
            previous: previous.clone(),
            moved: true,
        };
        // From here, dropping `binding` undoes whatever was done.
        self.write(&dir.join("driver_override"), VFIO_PCI)?;
        if previous.is_some() {
            self.write(&dir.join("driver").join("unbind"), &bdf.to_string())?;
        }
        self.write(&self.root.join("drivers_probe"), &bdf.to_string())?;
        match self.driver(bdf)? {
            Some(d) if d == VFIO_PCI => Ok(binding),
            now => Err(SysfsError::BindFailed {
                bdf,
                now: now.unwrap_or_else(|| "no driver".into()),
            }),
        }
    }
}

/// A function devlend moved to vfio-pci: dropping it clears `driver_override`, unbinds
/// vfio-pci and binds the driver it had before (if any).
#[derive(Debug)]
pub struct VfioBinding {
    sysfs: PciSysfs,
    bdf: Bdf,
    previous: Option<String>,
    moved: bool,
}

impl VfioBinding {
    /// The driver the function had before.
    pub fn previous(&self) -> Option<&str> {
        self.previous.as_deref()
    }
}

impl Drop for VfioBinding {
    fn drop(&mut self) {
        if !self.moved {
            return;
        }
        let Ok(dir) = self.sysfs.device_dir(self.bdf) else {
            return;
        };
        let bdf = self.bdf.to_string();
        let steps = || -> Result<(), SysfsError> {
            self.sysfs.write(&dir.join("driver_override"), "\n")?;
            if self.sysfs.driver(self.bdf)?.as_deref() == Some(VFIO_PCI) {
                self.sysfs.write(&dir.join("driver").join("unbind"), &bdf)?;
            }
            if let Some(prev) = &self.previous {
                let bind = self.sysfs.root.join("drivers").join(prev).join("bind");
                self.sysfs.write(&bind, &bdf)?;
            }
            Ok(())
        };
        match steps() {
            Ok(()) => tracing::info!(
                "{bdf} given back to {}",
                self.previous.as_deref().unwrap_or("no driver")
            ),
            Err(e) => tracing::warn!("giving {bdf} back to its driver: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_forms() {
        let b: Bdf = "0000:00:03.0".parse().unwrap();
        assert_eq!(
            b,
            Bdf {
                domain: 0,
                bus: 0,
                device: 3,
                function: 0
            }
        );
        assert_eq!(b.to_string(), "0000:00:03.0");
        assert_eq!(
            "3a:1f.7".parse::<Bdf>().unwrap().to_string(),
            "0000:3a:1f.7"
        );
        assert_eq!(
            "10000:00:00.0".parse::<Bdf>().ok(),
            None,
            "domain wider than 16 bits"
        );
        for bad in [
            "",
            "00:03",
            "00:20.0",
            "00:03.8",
            "0:0:0:0.0",
            "xx:00.0",
            "000:00.0",
            "00:03.0 ",
        ] {
            assert!(bad.parse::<Bdf>().is_err(), "{bad:?}");
        }
    }

    /// A fake sysfs: two functions in group 7, one bound to `nvme`, one to `other`.
    fn fake(dir: &Path, other_driver: Option<&str>) -> PciSysfs {
        let root = dir.join("pci");
        let groups = dir.join("groups/7/devices");
        std::fs::create_dir_all(&groups).unwrap();
        std::fs::create_dir_all(root.join("drivers/nvme")).unwrap();
        std::fs::create_dir_all(root.join("drivers/other")).unwrap();
        for (bdf, driver) in [
            ("0000:00:03.0", Some("nvme")),
            ("0000:00:04.0", other_driver),
        ] {
            let d = root.join("devices").join(bdf);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("vendor"), "0x1b36\n").unwrap();
            std::fs::write(d.join("device"), "0x0010\n").unwrap();
            std::fs::write(d.join("class"), "0x010802\n").unwrap();
            std::os::unix::fs::symlink(dir.join("groups/7"), d.join("iommu_group")).unwrap();
            std::os::unix::fs::symlink(&d, groups.join(bdf)).unwrap();
            if let Some(drv) = driver {
                std::os::unix::fs::symlink(root.join("drivers").join(drv), d.join("driver"))
                    .unwrap();
            }
        }
        PciSysfs::new(root)
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("devlend-vfio-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn identity_driver_and_group_checks() {
        let dir = tempdir("sysfs");
        let s = fake(&dir, Some("other"));
        let b: Bdf = "00:03.0".parse().unwrap();
        assert_eq!(
            s.identity(b).unwrap(),
            Identity {
                vendor: 0x1b36,
                device: 0x0010,
                class: 0x010802
            }
        );
        assert_eq!(s.driver(b).unwrap().as_deref(), Some("nvme"));
        assert_eq!(s.iommu_group(b).unwrap(), 7);
        let e = s.check_group(b).unwrap_err().to_string();
        assert!(e.contains("0000:00:04.0") && e.contains("other"), "{e}");
        // Without --bind, a bound function is refused and nothing is written.
        let e = s.bind_vfio(b, false).unwrap_err();
        assert!(matches!(e, SysfsError::BoundElsewhere { .. }), "{e}");
        assert!(!s.device_dir(b).unwrap().join("driver_override").exists());
        // Missing function, missing group.
        let none: Bdf = "00:05.0".parse().unwrap();
        assert!(matches!(s.identity(none), Err(SysfsError::NoDevice(..))));
        std::fs::remove_file(s.device_dir(b).unwrap().join("iommu_group")).unwrap();
        assert!(matches!(s.check_group(b), Err(SysfsError::NoIommuGroup(_))));
        std::fs::remove_dir_all(&dir).unwrap();

        let dir = tempdir("sysfs2");
        let s = fake(&dir, None);
        assert_eq!(s.check_group(b).unwrap(), 7, "an unbound neighbour is fine");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
