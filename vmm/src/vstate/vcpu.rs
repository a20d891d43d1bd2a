//! vCPUs: creation, boot-state configuration, and the run loop that dispatches exits to the
//! buses. One thread per vCPU.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestAddress;

use crate::arch::{cpuid, interrupts, regs};
use crate::device_manager::DeviceManager;
use crate::exit::VmExit;
use crate::trace::VCPU_EXIT;
use crate::trace_event;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vm::Vm;

/// Errors creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {index}: KVM {what} failed: {source}")]
    Ioctl {
        /// vCPU index.
        index: u8,
        /// Which ioctl.
        what: &'static str,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
    /// Register set-up failed.
    #[error("vCPU {index}: {source}")]
    Regs {
        /// vCPU index.
        index: u8,
        /// Underlying error.
        source: regs::RegsError,
    },
    /// The thread could not be spawned.
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Spawn {
        /// vCPU index.
        index: u8,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// Signal that kicks a vCPU thread out of KVM_RUN (its handler does nothing; the point is
/// that KVM_RUN returns EINTR).
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's handler; call once before starting vCPUs.
pub fn install_kick_handler() -> Result<(), std::io::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

#[derive(Default)]
struct RunInner {
    paused: bool,
    parked: usize,
    live: usize,
    /// Bumped by every VM reset; a vCPU that sees a new value restores its boot state.
    reset_generation: u64,
}

/// The run state every vCPU thread shares: lets the VM be paused (`stop`) and resumed
/// (`cont`) as a whole, and records each vCPU's thread id for `query-cpus`.
pub struct VcpuRunState {
    inner: Mutex<RunInner>,
    cond: Condvar,
    thread_ids: Vec<AtomicI32>,
}

/// How long `pause` waits for every vCPU to leave the guest.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

impl VcpuRunState {
    /// State for `count` vCPUs, running.
    pub fn new(count: u8) -> Arc<Self> {
        Arc::new(VcpuRunState {
            inner: Mutex::new(RunInner {
                live: usize::from(count),
                ..Default::default()
            }),
            cond: Condvar::new(),
            thread_ids: (0..count).map(|_| AtomicI32::new(0)).collect(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// OS thread ids of the vCPUs (0 until a thread has started).
    pub fn thread_ids(&self) -> Vec<i32> {
        self.thread_ids
            .iter()
            .map(|t| t.load(Ordering::SeqCst))
            .collect()
    }

    /// Called by a vCPU thread between KVM_RUNs: blocks while the VM is paused.
    /// Returns the reset generation in force when the vCPU may run again.
    fn park_if_paused(&self) -> u64 {
        let mut inner = self.lock();
        if !inner.paused {
            return inner.reset_generation;
        }
        inner.parked += 1;
        self.cond.notify_all();
        while inner.paused {
            inner = self.cond.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner.parked -= 1;
        inner.reset_generation
    }

    /// Resumes paused vCPUs and makes each restore its boot state first (a VM reset; the
    /// caller reloaded guest memory and the irqchip while they were parked).
    pub fn resume_after_reset(&self) {
        let mut inner = self.lock();
        inner.reset_generation += 1;
        inner.paused = false;
        self.cond.notify_all();
    }

    fn vcpu_exited(&self) {
        let mut inner = self.lock();
        inner.live = inner.live.saturating_sub(1);
        self.cond.notify_all();
    }

    /// Pauses every vCPU: returns once none is executing guest code. Threads are kicked out
    /// of KVM_RUN with a signal, re-sent until they park (a kick that lands just before
    /// KVM_RUN would otherwise be lost while a halted vCPU sleeps in the kernel).
    pub fn pause(&self, threads: &[JoinHandle<()>]) -> Result<(), String> {
        use vmm_sys_util::signal::Killable;
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut inner = self.lock();
        inner.paused = true;
        while inner.parked < inner.live {
            if Instant::now() > deadline {
                return Err(format!(
                    "only {} of {} vCPUs paused",
                    inner.parked, inner.live
                ));
            }
            for t in threads.iter().filter(|t| !t.is_finished()) {
                // A thread that exits between the check and the kill is not an error.
                let _ = t.kill(kick_signal());
            }
            inner = self
                .cond
                .wait_timeout(inner, Duration::from_millis(5))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.cond.notify_all();
    }
}

/// A configured, not yet running vCPU.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    boot_state: Option<BootState>,
}

/// A vCPU's state right after configuration. KVM has no "reset vCPU" call, so a VM reset
/// restores this snapshot (as QEMU re-writes every register on reset).
struct BootState {
    regs: kvm_bindings::kvm_regs,
    sregs: kvm_bindings::kvm_sregs,
    fpu: kvm_bindings::kvm_fpu,
    lapic: kvm_bindings::kvm_lapic_state,
    mp_state: kvm_bindings::kvm_mp_state,
    xcrs: Option<kvm_bindings::kvm_xcrs>,
}

/// KVM paravirtual MSRs pointing into guest memory (kvmclock, steal time, async PF, PV EOI).
/// They must be cleared on reset, or KVM keeps writing into memory the new kernel owns.
const KVM_PV_MSRS: [u32; 8] = [
    0x11,
    0x12,
    0x4b56_4d00,
    0x4b56_4d01,
    0x4b56_4d02,
    0x4b56_4d03,
    0x4b56_4d04,
    0x4b56_4d06,
];

impl Vcpu {
    /// Creates vCPU `index` (its APIC id too).
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Ioctl {
                index,
                what: "KVM_CREATE_VCPU",
                source,
            })?;
        Ok(Vcpu {
            index,
            fd,
            boot_state: None,
        })
    }

    /// Sets CPUID (topology for `count` vCPUs), MSRs, FPU and LAPIC; the boot vCPU also gets
    /// the long-mode registers that enter the kernel at `entry`. Application processors wait
    /// for INIT/SIPI from the guest, handled by the in-kernel LAPIC.
    pub fn configure(
        &mut self,
        vm: &Vm,
        memory: &GuestMemory,
        count: u8,
        entry: GuestAddress,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let ioctl = |what| {
            move |source| VcpuError::Ioctl {
                index,
                what,
                source,
            }
        };
        let regs_err = |source| VcpuError::Regs { index, source };
        let mut cpuid = vm
            .kvm()
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        cpuid::set_topology(&mut cpuid, index, count);
        if vm.kvm().check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
            cpuid::set_tsc_deadline(&mut cpuid);
        }
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(ioctl("KVM_SET_CPUID2"))?;
        regs::setup_msrs(&self.fd).map_err(regs_err)?;
        regs::setup_fpu(&self.fd).map_err(regs_err)?;
        interrupts::set_lint(&self.fd).map_err(ioctl("KVM_SET_LAPIC"))?;
        if index == 0 {
            regs::setup_regs(&self.fd, entry).map_err(regs_err)?;
            regs::setup_sregs(memory, &self.fd).map_err(regs_err)?;
        }
        self.boot_state = Some(BootState {
            regs: self.fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
            fpu: self.fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))?,
            lapic: self.fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?,
            mp_state: self.fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?,
            xcrs: self.fd.get_xcrs().ok(),
        });
        Ok(())
    }

    /// Puts the vCPU back in the state [`configure`](Self::configure) left it in.
    fn restore_boot_state(&self) -> Result<(), String> {
        let state = self
            .boot_state
            .as_ref()
            .ok_or("vCPU was never configured")?;
        let fail = |what: &str, e: kvm_ioctls::Error| format!("reset: {what} failed: {e}");
        self.fd
            .set_regs(&state.regs)
            .map_err(|e| fail("KVM_SET_REGS", e))?;
        self.fd
            .set_fpu(&state.fpu)
            .map_err(|e| fail("KVM_SET_FPU", e))?;
        if let Some(xcrs) = &state.xcrs {
            self.fd
                .set_xcrs(xcrs)
                .map_err(|e| fail("KVM_SET_XCRS", e))?;
        }
        self.fd
            .set_sregs(&state.sregs)
            .map_err(|e| fail("KVM_SET_SREGS", e))?;
        // One MSR per call: KVM stops at the first it refuses, and which PV MSRs exist varies.
        let zeroed_pv = KVM_PV_MSRS
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            });
        for entry in regs::boot_msrs().into_iter().chain(zeroed_pv) {
            if let Ok(msrs) = kvm_bindings::Msrs::from_entries(&[entry]) {
                if self.fd.set_msrs(&msrs) != Ok(1) {
                    log::debug!(
                        "vCPU {}: reset of MSR {:#x} refused",
                        self.index,
                        entry.index
                    );
                }
            }
        }
        self.fd
            .set_lapic(&state.lapic)
            .map_err(|e| fail("KVM_SET_LAPIC", e))?;
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(|e| fail("KVM_SET_MP_STATE", e))?;
        Ok(())
    }

    /// Starts the vCPU thread; it reports why it stopped on `exit`.
    pub fn start(
        self,
        devices: Arc<DeviceManager>,
        run_state: Arc<VcpuRunState>,
        exit: Sender<VmExit>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        // The thread id is published before `start` returns, so that QMP never reports a
        // vCPU thread id of 0 for a VM that is already running.
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                crate::jail::enter_thread(crate::jail::Role::Vcpu);
                if let Some(tid) = run_state.thread_ids.get(usize::from(index)) {
                    // SAFETY: gettid takes no arguments and cannot fail.
                    tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                }
                let _ = started_tx.send(());
                let reason = self.run(&devices, &run_state);
                run_state.vcpu_exited();
                // The receiver is gone only when the VM is already being torn down.
                let _ = exit.send(reason);
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        // Bounded: a thread that dies before publishing (it cannot, short of an abort) must
        // not hang the VMM's start.
        let _ = started_rx.recv_timeout(std::time::Duration::from_secs(5));
        Ok(handle)
    }

    /// Runs the guest until something ends the VM.
    fn run(mut self, devices: &DeviceManager, run_state: &VcpuRunState) -> VmExit {
        let index = self.index;
        let mut generation = run_state.park_if_paused();
        loop {
            let now = run_state.park_if_paused();
            if now != generation {
                generation = now;
                if let Err(e) = self.restore_boot_state() {
                    return self.fatal(&e);
                }
            }
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    devices.pio.read(u64::from(port), data);
                    trace_event!(VCPU_EXIT, "vcpu{index} io-in {port:#x} -> {data:02x?}");
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    trace_event!(VCPU_EXIT, "vcpu{index} io-out {port:#x} <- {data:02x?}");
                    devices.pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    devices.mmio.read(addr, data);
                    trace_event!(VCPU_EXIT, "vcpu{index} mmio-read {addr:#x} -> {data:02x?}");
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    trace_event!(VCPU_EXIT, "vcpu{index} mmio-write {addr:#x} <- {data:02x?}");
                    devices.mmio.write(addr, data);
                }
                // With the in-kernel LAPIC, HLT is handled in KVM; seeing it here is harmless.
                Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => {}
                // A triple fault. Linux resets through the i8042 or the ACPI reset register,
                // so reaching this means the guest crashed (or asked for reboot=t).
                Ok(VcpuExit::Shutdown) => return self.fatal("triple fault (KVM_EXIT_SHUTDOWN)"),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => return VmExit::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => return VmExit::Reset,
                    KVM_SYSTEM_EVENT_CRASH => return self.fatal("guest crash system event"),
                    other => return self.fatal(&format!("unknown system event {other}")),
                },
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return self.fatal(&format!(
                        "KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                    ))
                }
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // active member of the kvm_run exit union.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    return self.fatal(&format!("KVM internal error (suberror {suberror})"));
                }
                Ok(other) => {
                    let what = format!("unexpected exit {other:?}");
                    return self.fatal(&what);
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return self.fatal(&format!("KVM_RUN failed: {e}")),
            }
        }
    }

    fn fatal(&self, what: &str) -> VmExit {
        VmExit::Error(format!(
            "vCPU {}: {what}; {}",
            self.index,
            self.register_dump()
        ))
    }

    /// A one-line register dump for post-mortem logs.
    pub fn register_dump(&self) -> String {
        let regs = match self.fd.get_regs() {
            Ok(r) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
            ),
            Err(e) => format!("regs unavailable: {e}"),
        };
        let sregs = match self.fd.get_sregs() {
            Ok(s) => format!(
                "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}/{:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.base
            ),
            Err(e) => format!("sregs unavailable: {e}"),
        };
        format!("{regs} {sregs}")
    }
}

#[cfg(test)]
mod tests {
    //! These create a real KVM VM (no guest code runs), so they need /dev/kvm; PVM suffices.
    use super::*;
    use crate::arch::layout::ZERO_PAGE_START;
    use crate::vstate::memory::GuestRam;

    #[test]
    fn vcpus_get_their_topology_and_boot_state() {
        let vm = Vm::new().expect("KVM VM (needs /dev/kvm)");
        let ram = GuestRam::new(256 << 20).unwrap();
        vm.register_memory(&ram.memory).unwrap();
        let entry = GuestAddress(0x100200);
        let mut vcpus: Vec<Vcpu> = (0..2).map(|i| Vcpu::new(&vm, i).unwrap()).collect();
        for v in &mut vcpus {
            v.configure(&vm, &ram.memory, 2, entry).unwrap();
        }
        let cpuid = vcpus[1].fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 1, "APIC id of vCPU 1");
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
        let regs = vcpus[0].fd.get_regs().unwrap();
        assert_eq!((regs.rip, regs.rsi), (0x100200, ZERO_PAGE_START));
        let sregs = vcpus[0].fd.get_sregs().unwrap();
        assert_ne!(sregs.efer & 0x400, 0, "long mode active");
        assert!(vcpus[0].register_dump().contains("rip=0x100200"));
    }
}
