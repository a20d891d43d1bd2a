//! Turns a validated [`VmConfig`] into a running microvm, one step per function: memory, VM,
//! devices, kernel, ACPI, vCPUs.

use std::fs::OpenOptions;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use crate::devices::ged::{Ged, EVENT_POWER_BUTTON};
use std::thread::JoinHandle;

use crate::acpi::{self, AcpiError};
use crate::arch::boot::{self, BootError, BootImage};
use crate::config::{BackendSocket, SerialConfig, VhostUserConfig, VhostUserKind, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::devices::legacy::serial::{spawn_input_thread, SerialOut};
use crate::events::EventRelay;
use crate::exit::VmExit;
use crate::hotplug::{SlotDevice, SlotKind, BLK_SLOTS, NET_SLOTS};
use crate::vhost_user::balloon::{vhost_user_balloon, BalloonHandle};
use crate::vhost_user::net;
use crate::vhost_user::{blk, memory::MemoryTable, FrontendError, VhostUserDevice};
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::vcpu::{install_kick_handler, Vcpu, VcpuError, VcpuRunState};
use crate::vstate::vm::{IrqchipSnapshot, Vm, VmError};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;

/// Errors building the VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// KVM VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Kernel, initrd, command line.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Devices.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// vCPUs.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A vhost-user backend could not be set up.
    #[error("device '{id}': {reason}")]
    Backend {
        /// Device id.
        id: String,
        /// What went wrong.
        reason: String,
    },
    /// The vCPU kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] std::io::Error),
    /// The core's jail could not be entered.
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    /// The serial output file.
    #[error("cannot open serial output '{path}': {source}")]
    SerialFile {
        /// The path.
        path: std::path::PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
}

impl BuildError {
    /// Whether the user's input (a file, a size) is at fault rather than the host: such errors
    /// exit with status 2 like other command-line errors.
    pub fn is_user_error(&self) -> bool {
        matches!(self, BuildError::Boot(_) | BuildError::SerialFile { .. })
    }
}

/// What other threads (the control channel) may do to a running VM.
#[derive(Clone)]
pub struct VmHandle {
    exit_tx: Sender<VmExit>,
    ged: Option<Arc<Mutex<Ged>>>,
    run_state: Arc<VcpuRunState>,
    vcpus: Arc<Vec<JoinHandle<()>>>,
    reset: Arc<ResetContext>,
}

/// What a VM reset needs: reload the guest into memory and put the irqchip back.
struct ResetContext {
    config: VmConfig,
    images: Mutex<GuestImages>,
    ram: Arc<GuestRam>,
    vm: Arc<Vm>,
    devices: Arc<DeviceManager>,
    irqchip: IrqchipSnapshot,
}

impl VmHandle {
    /// Ends the VM with `reason` (e.g. [`VmExit::Quit`]).
    pub fn end(&self, reason: VmExit) {
        // Only fails when the VM is already ending.
        let _ = self.exit_tx.send(reason);
    }

    /// Stops every vCPU (QMP `stop`).
    pub fn pause(&self) -> Result<(), String> {
        self.run_state.pause(&self.vcpus)
    }

    /// Resumes every vCPU (QMP `cont`).
    pub fn resume(&self) {
        self.run_state.resume()
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.run_state.is_paused()
    }

    /// OS thread id of each vCPU, by index.
    pub fn vcpu_thread_ids(&self) -> Vec<i32> {
        self.run_state.thread_ids()
    }

    /// Attaches the backend connected over `stream` to device slot `slot` (hotplug, or the
    /// supervisor's replacement for a backend that died).
    pub fn attach_backend(&self, slot: &str, stream: UnixStream) -> Result<(), String> {
        self.reset
            .devices
            .slots
            .attach(slot, stream)
            .map_err(|e| e.to_string())
    }

    /// Drops slot `slot`'s backend; `unplug` empties the slot, otherwise it waits for a new one.
    pub fn detach_backend(&self, slot: &str, unplug: bool) -> Result<(), String> {
        self.reset
            .devices
            .slots
            .detach(slot, unplug)
            .map_err(|e| e.to_string())
    }

    /// QMP `balloon`: leave the guest `value` bytes.
    pub fn set_balloon(&self, value: u64) -> Result<(), String> {
        self.balloon()?.set_target(value)
    }

    /// QMP `query-balloon`: the bytes the guest has.
    pub fn query_balloon(&self) -> Result<u64, String> {
        Ok(self.balloon()?.actual())
    }

    fn balloon(&self) -> Result<&BalloonHandle, String> {
        self.reset
            .devices
            .balloon
            .as_ref()
            .ok_or_else(|| "No balloon device has been activated".to_string())
    }

    /// Every device slot and its state.
    pub fn slots(&self) -> Vec<crate::hotplug::SlotStatus> {
        self.reset.devices.slots.status()
    }

    /// A snapshot of slot `slot`'s virtqueues (QMP `x-flotilla-query-virtqueues`).
    pub fn virtqueues(&self, slot: &str) -> Result<crate::hotplug::SlotQueues, String> {
        self.reset
            .devices
            .slots
            .virtqueues(slot, crate::hotplug::QUERY_LOCK_TIMEOUT)
            .map_err(|e| e.to_string())
    }

    /// Resets the machine (QMP `system_reset`): vCPUs stop, the kernel, initrd and boot tables
    /// are loaded again, interrupt controllers and vCPUs return to their boot state, and the
    /// guest boots afresh. Guest RAM is not cleared, as on real hardware.
    pub fn reset(&self) -> Result<(), String> {
        self.pause()?;
        let ctx = &self.reset;
        let result = ctx
            .vm
            .restore_irqchip(&ctx.irqchip)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                let mut images = crate::devices::bus::lock(&ctx.images);
                load_guest(&ctx.config, &mut images, &ctx.ram, &ctx.devices)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        match result {
            Ok(()) => {
                self.run_state.resume_after_reset();
                log::info!("VM reset");
                Ok(())
            }
            Err(e) => {
                // Guest memory may be half rewritten: the guest cannot safely go on.
                let msg = format!("reset failed: {e}");
                self.end(VmExit::Error(msg.clone()));
                Err(msg)
            }
        }
    }

    /// Reads the 64-bit value at guest-physical address `gpa`.
    pub fn read_gpa(&self, gpa: u64) -> Result<u64, String> {
        use vm_memory::Bytes;
        self.reset
            .ram
            .memory
            .read_obj::<u64>(vm_memory::GuestAddress(gpa))
            .map_err(|_| format!("address {gpa:#x} is outside guest memory"))
    }

    /// Presses the ACPI power button (the guest decides what to do about it).
    pub fn powerdown(&self) -> Result<(), String> {
        let ged = self
            .ged
            .as_ref()
            .ok_or("the machine has no ACPI power button")?;
        crate::devices::bus::lock(ged)
            .notify(EVENT_POWER_BUTTON)
            .map_err(|e| e.to_string())
    }
}

/// A booted VM.
pub struct RunningVm {
    exit_rx: Receiver<VmExit>,
    handle: VmHandle,
    events: EventRelay,
}

impl RunningVm {
    /// Where device events (BALLOON_CHANGED) go: connect it to the control channel.
    pub fn events(&self) -> &EventRelay {
        &self.events
    }

    /// Blocks until the guest powers off, resets, fails, or the host asks to quit.
    pub fn wait(&self) -> VmExit {
        self.exit_rx
            .recv()
            .unwrap_or_else(|_| VmExit::Error("every vCPU and device is gone".into()))
    }

    /// A handle for controlling the VM from other threads.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }
}

fn serial_output(config: &VmConfig) -> Result<SerialOut, BuildError> {
    Ok(match &config.serial {
        Some(SerialConfig::Stdio) => Box::new(std::io::stdout()),
        Some(SerialConfig::File(path)) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BuildError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        ),
        None => Box::new(std::io::sink()),
    })
}

/// The kernel command line: the user's, plus `virtio_mmio.device=` entries when asked.
fn kernel_cmdline(config: &VmConfig, devices: &DeviceManager) -> String {
    let mut cmdline = config.cmdline.trim().to_string();
    if config.mmio_cmdline && !devices.mmio_devices.is_empty() {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&devices.mmio_cmdline());
    }
    cmdline
}

/// The files the guest boots from, kept open for resets.
pub struct GuestImages {
    kernel: BootImage,
    initrd: Option<BootImage>,
}

impl GuestImages {
    /// Opens the kernel and initrd named in `config`.
    pub fn open(config: &VmConfig) -> Result<Self, BootError> {
        Ok(GuestImages {
            kernel: BootImage::open("kernel", &config.kernel)?,
            initrd: config
                .initrd
                .as_deref()
                .map(|p| BootImage::open("initrd", p))
                .transpose()?,
        })
    }
}

/// Loads kernel, command line, initrd, zero page and ACPI tables.
fn load_guest(
    config: &VmConfig,
    images: &mut GuestImages,
    ram: &GuestRam,
    devices: &DeviceManager,
) -> Result<vm_memory::GuestAddress, BuildError> {
    let kernel = boot::load_kernel(&ram.memory, &mut images.kernel)?;
    let cmdline = kernel_cmdline(config, devices);
    boot::load_cmdline(&ram.memory, &cmdline)?;
    let initrd = images
        .initrd
        .as_mut()
        .map(|image| boot::load_initrd(&ram.memory, &ram.ranges, &kernel, image))
        .transpose()?;
    boot::write_zero_page(&ram.memory, &ram.ranges, &kernel, cmdline.len(), initrd)?;
    acpi::create_acpi_tables(&ram.memory, config.vcpus, &devices.mmio_devices)?;
    log::info!(
        "kernel entry {:#x}, initrd {:?}, cmdline '{cmdline}'",
        kernel.entry.0,
        initrd.map(|i| (i.addr, i.size))
    );
    Ok(kernel.entry)
}

/// Connects to (or takes over) a vhost-user backend's socket.
fn backend_stream(socket: &BackendSocket) -> Result<UnixStream, String> {
    match socket {
        BackendSocket::Path(path) => UnixStream::connect(path)
            .map_err(|e| format!("cannot connect to '{}': {e}", path.display())),
        BackendSocket::Fd(fd) => {
            let fd = *fd;
            // SAFETY: fstat only writes into the buffer it is given; a bad fd fails with EBADF.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: valid pointer to a stat buffer owned by this frame.
            if unsafe { libc::fstat(fd, &mut st) } != 0
                || st.st_mode & libc::S_IFMT != libc::S_IFSOCK
            {
                return Err(format!("fd {fd} is not an open socket"));
            }
            // SAFETY: the fd was inherited for this device alone; nothing else owns it.
            Ok(UnixStream::from(unsafe {
                std::os::fd::OwnedFd::from_raw_fd(fd)
            }))
        }
    }
}

/// Refuses more cold-plugged devices of one kind than the machine has slots for.
fn check_slot_count(
    configured: &[&VhostUserConfig],
    slots: usize,
    what: &str,
) -> Result<(), BuildError> {
    match configured.get(slots) {
        Some(extra) => Err(BuildError::Backend {
            id: extra.id.clone(),
            reason: format!("microvm has {slots} {what} slots, hot-plugged ones included"),
        }),
        None => Ok(()),
    }
}

/// Places one replaceable slot: the frontend `device` behind a new virtio-mmio transport,
/// with the backend of `cold` attached when the command line names one.
fn add_slot(
    vm: &Vm,
    devices: &mut DeviceManager,
    kind: SlotKind,
    slot: String,
    cold: Option<&VhostUserConfig>,
    device: Result<VhostUserDevice, FrontendError>,
) -> Result<Arc<Mutex<VhostUserDevice>>, BuildError> {
    let backend_err = |reason: String| BuildError::Backend {
        id: cold.map_or(slot.clone(), |d| d.id.clone()),
        reason,
    };
    let mut device = device.map_err(|e| backend_err(e.to_string()))?;
    if let Some(cold) = cold {
        let stream = backend_stream(&cold.socket).map_err(&backend_err)?;
        device
            .attach(stream)
            .map_err(|e| backend_err(e.to_string()))?;
    }
    let shared = Arc::new(Mutex::new(device));
    let transport = SlotDevice::new(shared.clone())
        .map_err(|e| backend_err(format!("cannot share the device: {e}")))?;
    let (info, _) = devices.add_virtio_mmio(vm.fd(), Box::new(transport))?;
    log::info!(
        "{slot}{}: vhost-user {} at {:#x}, IRQ {}",
        cold.map(|d| format!(" ({})", d.id)).unwrap_or_default(),
        kind.prefix(),
        info.base,
        info.irq
    );
    devices.slots.push(slot, kind, info, shared.clone());
    Ok(shared)
}

/// Creates the six block slots: cold-plugged disks (`-device vhost-user-blk-device`) fill the
/// first ones, in command-line order, with their backends attached; the rest start empty.
fn add_blk_slots(
    config: &VmConfig,
    vm: &Vm,
    ram: &GuestRam,
    table: &MemoryTable,
    devices: &mut DeviceManager,
) -> Result<(), BuildError> {
    let disks = config.disks();
    check_slot_count(&disks, BLK_SLOTS, "disk")?;
    for index in 0..BLK_SLOTS {
        let slot = format!("{}{index}", SlotKind::Blk.prefix());
        let disk = disks.get(index).copied();
        let queues = match disk.map(|d| &d.kind) {
            Some(VhostUserKind::Blk { num_queues }) => *num_queues,
            _ => 1,
        };
        let device = blk::vhost_user_blk(&slot, queues, &ram.memory, table);
        add_slot(vm, devices, SlotKind::Blk, slot, disk, device)?;
    }
    Ok(())
}

/// Creates the two NIC slots: cold-plugged NICs fill the first ones with their backends
/// attached (link up), the rest start empty (link down) with a MAC made up for this VM.
fn add_net_slots(
    config: &VmConfig,
    vm: &Vm,
    ram: &GuestRam,
    table: &MemoryTable,
    devices: &mut DeviceManager,
) -> Result<(), BuildError> {
    let nics = config.nics();
    check_slot_count(&nics, NET_SLOTS, "NIC")?;
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for index in 0..NET_SLOTS {
        let slot = format!("{}{index}", SlotKind::Net.prefix());
        let nic = nics.get(index).copied();
        let mac = match nic.map(|n| &n.kind) {
            Some(VhostUserKind::Net { mac: Some(mac) }) => *mac,
            _ => net::slot_mac(seed, index as u8),
        };
        let device = net::vhost_user_net(&slot, mac, &ram.memory, table);
        add_slot(vm, devices, SlotKind::Net, slot, nic, device)?;
    }
    Ok(())
}

/// Adds the balloon, when one is configured, with its backend attached.
fn add_balloon(
    config: &VmConfig,
    vm: &Vm,
    ram: &GuestRam,
    table: &MemoryTable,
    devices: &mut DeviceManager,
    events: &EventRelay,
) -> Result<(), BuildError> {
    let Some(balloon) = config.balloon() else {
        return Ok(());
    };
    let deflate_on_oom = matches!(
        balloon.kind,
        VhostUserKind::Balloon {
            deflate_on_oom: true
        }
    );
    let mem_bytes = config.mem_mib << 20;
    let device = vhost_user_balloon(
        deflate_on_oom,
        mem_bytes,
        &ram.memory,
        table,
        events.clone(),
    );
    let slot = format!("{}0", SlotKind::Balloon.prefix());
    let shared = add_slot(vm, devices, SlotKind::Balloon, slot, Some(balloon), device)?;
    devices.balloon = Some(BalloonHandle::new(shared, mem_bytes));
    Ok(())
}

/// Builds and starts a microvm.
pub fn build_microvm(config: &VmConfig) -> Result<RunningVm, BuildError> {
    let mut images = GuestImages::open(config)?;
    let serial_out = serial_output(config)?;
    let ram = GuestRam::new(config.mem_mib << 20)?;
    let vm = Vm::new()?;
    vm.register_memory(&ram.memory)?;
    let irqchip = vm.irqchip_snapshot()?;
    // Every file is open and guest memory exists; no thread runs yet (the first ones start
    // with the cold-plugged backends below): the only moment namespaces can be entered.
    crate::jail::isolate()?;
    let (exit_tx, exit_rx): (Sender<VmExit>, Receiver<VmExit>) = channel();

    let mut devices = DeviceManager::new();
    devices.add_legacy_devices(vm.fd(), serial_out, exit_tx.clone())?;
    let table = MemoryTable::new(&ram);
    add_blk_slots(config, &vm, &ram, &table, &mut devices)?;
    add_net_slots(config, &vm, &ram, &table, &mut devices)?;
    let events = EventRelay::default();
    add_balloon(config, &vm, &ram, &table, &mut devices, &events)?;
    let entry = load_guest(config, &mut images, &ram, &devices)?;

    let vcpus = (0..config.vcpus)
        .map(|index| {
            let mut vcpu = Vcpu::new(&vm, index)?;
            vcpu.configure(&vm, &ram.memory, config.vcpus, entry)?;
            Ok(vcpu)
        })
        .collect::<Result<Vec<_>, VcpuError>>()?;

    if let (Some(SerialConfig::Stdio), Some(serial)) = (&config.serial, &devices.serial) {
        if let Err(e) = spawn_input_thread(serial.clone(), std::io::stdin()) {
            log::warn!("no serial input: {e}");
        }
    }
    let devices = Arc::new(devices);
    install_kick_handler().map_err(BuildError::Signal)?;
    let run_state = VcpuRunState::new(config.vcpus);
    let handles = vcpus
        .into_iter()
        .map(|vcpu| vcpu.start(devices.clone(), run_state.clone(), exit_tx.clone()))
        .collect::<Result<Vec<_>, VcpuError>>()?;
    log::info!("started {} vCPU(s), {} MiB", config.vcpus, config.mem_mib);
    // The handle keeps memory, VM and devices alive for as long as the vCPUs run: KVM memory
    // slots point into the guest RAM mapping.
    let reset = ResetContext {
        config: config.clone(),
        images: Mutex::new(images),
        ram: Arc::new(ram),
        vm: Arc::new(vm),
        devices: devices.clone(),
        irqchip,
    };
    Ok(RunningVm {
        events,
        exit_rx,
        handle: VmHandle {
            exit_tx,
            ged: devices.ged.clone(),
            run_state,
            vcpus: Arc::new(handles),
            reset: Arc::new(reset),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_manager::MmioDeviceInfo;

    fn config() -> VmConfig {
        VmConfig {
            name: None,
            kernel: "k".into(),
            initrd: None,
            cmdline: " console=ttyS0 ".into(),
            mem_mib: 256,
            vcpus: 1,
            serial: None,
            mmio_cmdline: false,
            log: None,
            control_fd: None,
            vhost_user: Vec::new(),
        }
    }

    #[test]
    fn mmio_cmdline_only_when_asked() {
        let mut devices = DeviceManager::new();
        devices.mmio_devices.push(MmioDeviceInfo {
            base: 0xd000_0000,
            len: 0x1000,
            irq: 5,
        });
        let mut c = config();
        assert_eq!(kernel_cmdline(&c, &devices), "console=ttyS0");
        c.mmio_cmdline = true;
        assert_eq!(
            kernel_cmdline(&c, &devices),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        );
    }
}
