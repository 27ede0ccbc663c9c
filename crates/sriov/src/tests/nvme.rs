//! The procedure against a model of QEMU's emulated NVMe (hw/nvme/ctrl.c): all flexible
//! resources start with the primary; releasing them takes effect at the primary's function
//! reset, which also takes every secondary offline and disables the VFs; a secondary is
//! assigned resources only while offline and goes online only with at least 2 queues and 1
//! interrupt and an enabled VF.

use std::cell::RefCell;

use super::*;
use crate::admin::Encoded;

#[derive(Clone, Debug)]
struct Sec {
    online: bool,
    nvq: u16,
    nvi: u16,
}

struct Model {
    total_vfs: u16,
    numvfs: u16,
    vq_total: u32,
    vi_total: u32,
    vq_prim: u16,
    vi_prim: u16,
    next_vq_prim: u16,
    next_vi_prim: u16,
    max_vq: u16,
    max_vi: u16,
    secs: Vec<Sec>,
    drivers: Vec<Option<String>>,
    resets: u32,
    virt_cmds: Vec<Encoded>,
    refuse_online: bool,
}

struct Qemu(RefCell<Model>);

impl Qemu {
    fn new() -> Self {
        Qemu(RefCell::new(Model {
            total_vfs: 2,
            numvfs: 0,
            vq_total: 6,
            vi_total: 4,
            vq_prim: 6,
            vi_prim: 4,
            next_vq_prim: 6,
            next_vi_prim: 4,
            max_vq: 3,
            max_vi: 2,
            secs: vec![
                Sec {
                    online: false,
                    nvq: 0,
                    nvi: 0
                };
                2
            ],
            drivers: vec![None, None],
            resets: 0,
            virt_cmds: Vec::new(),
            refuse_online: false,
        }))
    }
}

const INVALID_CTRL_ID: u16 = 0x411f;
const INVALID_SEC_STATE: u16 = 0x4120;
const INVALID_NUM: u16 = 0x4121;
const INVALID_RES: u16 = 0x4122;

impl AdminChannel for Qemu {
    fn admin(&self, cmd: &AdminCmd, data: &mut [u8]) -> Result<u32, AdminError> {
        let mut m = self.0.borrow_mut();
        let fail = |code: u16| {
            Err(AdminError::Status {
                cmd: *cmd,
                status: Status(code),
            })
        };
        match *cmd {
            AdminCmd::IdentifyPrimaryCaps => {
                data.fill(0);
                data[4] = 0b11;
                let vq_sec: u32 = m.secs.iter().map(|s| u32::from(s.nvq)).sum();
                let vi_sec: u32 = m.secs.iter().map(|s| u32::from(s.nvi)).sum();
                data[32..36].copy_from_slice(&m.vq_total.to_le_bytes());
                data[36..40].copy_from_slice(&vq_sec.to_le_bytes());
                data[40..42].copy_from_slice(&m.vq_prim.to_le_bytes());
                data[44..46].copy_from_slice(&m.max_vq.to_le_bytes());
                data[64..68].copy_from_slice(&m.vi_total.to_le_bytes());
                data[68..72].copy_from_slice(&vi_sec.to_le_bytes());
                data[72..74].copy_from_slice(&m.vi_prim.to_le_bytes());
                data[76..78].copy_from_slice(&m.max_vi.to_le_bytes());
                Ok(0)
            }
            AdminCmd::IdentifySecondaryList { .. } => {
                data.fill(0);
                data[0] = m.secs.len() as u8;
                for (i, s) in m.secs.iter().enumerate() {
                    let e = 32 * (i + 1);
                    data[e..e + 2].copy_from_slice(&(i as u16 + 1).to_le_bytes());
                    data[e + 4] = u8::from(s.online);
                    data[e + 8..e + 10].copy_from_slice(&(i as u16 + 1).to_le_bytes());
                    data[e + 10..e + 12].copy_from_slice(&s.nvq.to_le_bytes());
                    data[e + 12..e + 14].copy_from_slice(&s.nvi.to_le_bytes());
                }
                Ok(0)
            }
            AdminCmd::VirtMgmt {
                action,
                resource,
                cntlid,
                count,
            } => {
                m.virt_cmds.push(cmd.encode());
                let vq_sec: u32 = m.secs.iter().map(|s| u32::from(s.nvq)).sum();
                let vi_sec: u32 = m.secs.iter().map(|s| u32::from(s.nvi)).sum();
                if action == VirtAction::PrimaryFlexible {
                    if cntlid != CntlId(0) {
                        return fail(INVALID_CTRL_ID);
                    }
                    match resource {
                        Resource::Queue if u32::from(count) <= m.vq_total - vq_sec => {
                            m.next_vq_prim = count
                        }
                        Resource::Interrupt if u32::from(count) <= m.vi_total - vi_sec => {
                            m.next_vi_prim = count
                        }
                        _ => return fail(INVALID_RES),
                    }
                    return Ok(u32::from(count));
                }
                let Some(i) = usize::from(cntlid.0)
                    .checked_sub(1)
                    .filter(|i| *i < m.secs.len())
                else {
                    return fail(INVALID_CTRL_ID);
                };
                match action {
                    VirtAction::SecondaryAssign => {
                        if m.secs[i].online {
                            return fail(INVALID_SEC_STATE);
                        }
                        let (limit, total, prim, sec, cur) = match resource {
                            Resource::Queue => {
                                (m.max_vq, m.vq_total, m.vq_prim, vq_sec, m.secs[i].nvq)
                            }
                            Resource::Interrupt => {
                                (m.max_vi, m.vi_total, m.vi_prim, vi_sec, m.secs[i].nvi)
                            }
                        };
                        if count > limit {
                            return fail(INVALID_NUM);
                        }
                        let free = i64::from(total) - i64::from(prim) - i64::from(sec);
                        if i64::from(count) - i64::from(cur) > free {
                            return fail(INVALID_RES);
                        }
                        match resource {
                            Resource::Queue => m.secs[i].nvq = count,
                            Resource::Interrupt => m.secs[i].nvi = count,
                        }
                        Ok(u32::from(count))
                    }
                    VirtAction::SecondaryOnline => {
                        let s = &m.secs[i];
                        if m.refuse_online || s.nvi == 0 || s.nvq < 2 || i >= usize::from(m.numvfs)
                        {
                            return fail(INVALID_SEC_STATE);
                        }
                        m.secs[i].online = true;
                        Ok(0)
                    }
                    VirtAction::SecondaryOffline => {
                        m.secs[i] = Sec {
                            online: false,
                            nvq: 0,
                            nvi: 0,
                        };
                        Ok(0)
                    }
                    VirtAction::PrimaryFlexible => unreachable!(),
                }
            }
        }
    }
}

impl PfHost for Qemu {
    fn pf(&self) -> Bdf {
        "00:04.0".parse().unwrap()
    }
    fn total_vfs(&self) -> Result<u16, SriovError> {
        Ok(self.0.borrow().total_vfs)
    }
    fn num_vfs(&self) -> Result<u16, SriovError> {
        Ok(self.0.borrow().numvfs)
    }
    fn set_num_vfs(&self, n: u16) -> Result<(), SriovError> {
        self.0.borrow_mut().numvfs = n;
        Ok(())
    }
    fn vf(&self, index: u16) -> Result<(String, Option<String>), SriovError> {
        let m = self.0.borrow();
        assert!(index < m.numvfs, "asked for VF {index} of {}", m.numvfs);
        Ok((
            format!("0000:00:04.{}", index + 1),
            m.drivers[usize::from(index)].clone(),
        ))
    }
    fn reset_function(&self) -> Result<(), SriovError> {
        let mut m = self.0.borrow_mut();
        m.resets += 1;
        m.vq_prim = m.next_vq_prim;
        m.vi_prim = m.next_vi_prim;
        for s in &mut m.secs {
            *s = Sec {
                online: false,
                nvq: 0,
                nvi: 0,
            };
        }
        m.numvfs = 0;
        Ok(())
    }
}

fn plan(vfs: u16) -> Plan {
    Plan {
        vfs,
        queues: None,
        interrupts: None,
    }
}

#[test]
fn fresh_controller_releases_the_primary_then_brings_each_vf_online() {
    let q = Qemu::new();
    let r = bring_online(&q, plan(2)).unwrap();
    assert_eq!(
        r,
        vec![
            VfReport {
                vf: "0000:00:04.1".into(),
                scid: CntlId(1),
                queues: 3,
                interrupts: 2
            },
            VfReport {
                vf: "0000:00:04.2".into(),
                scid: CntlId(2),
                queues: 3,
                interrupts: 2
            }
        ]
    );
    let m = q.0.borrow();
    assert_eq!(
        m.resets, 1,
        "one function reset releases the primary's resources"
    );
    assert_eq!((m.vq_prim, m.vi_prim), (0, 0));
    assert_eq!(m.numvfs, 2);
    // Primary VQ 0, primary VI 0, then per VF: assign VQ, assign VI, online.
    let acts: Vec<u32> = m.virt_cmds.iter().map(|e| e.cdw10 & 0xf).collect();
    assert_eq!(acts, vec![1, 1, 8, 8, 9, 8, 8, 9]);
}

#[test]
fn a_second_run_changes_nothing() {
    let q = Qemu::new();
    bring_online(&q, plan(2)).unwrap();
    let sent = q.0.borrow().virt_cmds.len();
    q.0.borrow_mut().drivers = vec![Some("vfio-pci".into()), Some("vfio-pci".into())];
    let r = bring_online(&q, plan(2)).unwrap();
    assert_eq!(r.len(), 2);
    let m = q.0.borrow();
    assert_eq!(m.virt_cmds.len(), sent, "no command when all is as asked");
    assert_eq!(m.resets, 1);
}

#[test]
fn a_bound_vf_that_would_change_is_refused_and_nothing_is_sent() {
    let q = Qemu::new();
    bring_online(&q, plan(2)).unwrap();
    q.0.borrow_mut().drivers[1] = Some("vfio-pci".into());
    let sent = q.0.borrow().virt_cmds.len();
    let e = bring_online(
        &q,
        Plan {
            vfs: 2,
            queues: Some(2),
            interrupts: Some(1),
        },
    )
    .unwrap_err();
    assert!(
        matches!(&e, SriovError::VfBusy { vf, driver } if vf == "0000:00:04.2" && driver == "vfio-pci"),
        "{e}"
    );
    assert_eq!(q.0.borrow().virt_cmds.len(), sent);
    // Fewer VFs renumbers them all: refused too while one is bound.
    assert!(matches!(
        bring_online(&q, plan(1)),
        Err(SriovError::VfBusy { .. })
    ));
}

#[test]
fn reconfiguring_online_vfs_takes_them_offline_first_without_another_reset() {
    let q = Qemu::new();
    bring_online(&q, plan(2)).unwrap();
    let r = bring_online(
        &q,
        Plan {
            vfs: 2,
            queues: Some(2),
            interrupts: Some(1),
        },
    )
    .unwrap();
    assert!(r.iter().all(|v| v.queues == 2 && v.interrupts == 1));
    assert_eq!(
        q.0.borrow().resets,
        1,
        "the primary holds nothing: no reset"
    );
}

#[test]
fn requests_that_cannot_fit_are_refused_before_any_command() {
    let q = Qemu::new();
    let e = bring_online(&q, plan(3)).unwrap_err();
    assert!(
        matches!(
            e,
            SriovError::VfCount {
                want: 3,
                total: 2,
                ..
            }
        ),
        "{e}"
    );
    let e = bring_online(&q, plan(0)).unwrap_err();
    assert!(matches!(e, SriovError::VfCount { want: 0, .. }), "{e}");
    for (queues, interrupts) in [
        (Some(4), None),
        (Some(1), None),
        (None, Some(3)),
        (None, Some(0)),
    ] {
        let e = bring_online(
            &q,
            Plan {
                vfs: 2,
                queues,
                interrupts,
            },
        )
        .unwrap_err();
        assert!(matches!(e, SriovError::NotEnough { .. }), "{e}");
        assert!(e.to_string().contains("do not fit"), "{e}");
    }
    let m = q.0.borrow();
    assert!(m.virt_cmds.is_empty());
    assert_eq!(m.resets, 0);
}

#[test]
fn a_controller_error_names_the_command_and_status() {
    let q = Qemu::new();
    q.0.borrow_mut().refuse_online = true;
    let e = bring_online(&q, plan(1)).unwrap_err().to_string();
    assert!(
        e.contains("secondary controller 1 online") && e.contains("0x120"),
        "{e}"
    );
}
