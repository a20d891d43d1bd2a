//! ACPI tables for the microvm: RSDP → XSDT → {FADT → DSDT, MADT}.
//!
//! The platform is hardware-reduced ACPI (no PM timer, no GPE blocks, no legacy PIC or i8042
//! advertised), like QEMU's microvm with acpi=on. The DSDT lists every virtio-mmio transport as
//! an `LNRO0005` device, which is how a stock distribution kernel (built without
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`) discovers them, and carries `\_S5` so that
//! `poweroff` reaches the sleep control register.

use acpi_tables::aml::{
    And, Device, EISAName, Equal, Field, FieldAccessType, FieldEntry, FieldLockRule,
    FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method, Name, Notify, OpRegion,
    OpRegionSpace, Package, Path, ResourceTemplate, Scope, Store, IO, ZERO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::{
    ACPI_PM_PORT, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP, ACPI_TABLES_END, GED_IRQ, GED_PORT,
    IOAPIC_START, LAPIC_START, RSDP_START, SERIAL_IRQ,
};
use crate::device_manager::MmioDeviceInfo;
use crate::devices::legacy::SERIAL_PORT;
use crate::devices::{acpi_pm, ged};
use crate::vstate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"FLOTIL";
const OEM_REVISION: u32 = 1;
/// IAPC_BOOT_ARCH: no VGA.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the area reserved for them.
    #[error("ACPI tables ({0} bytes) overflow the reserved BIOS area")]
    TooLarge(u64),
    /// Guest memory write failed.
    #[error("cannot write ACPI table {0} into guest memory")]
    GuestWrite(&'static str),
}

/// The DSDT body: `\_S5` and one device per virtio-mmio transport.
pub fn dsdt(mmio_devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut body = Vec::new();
    let s5 = [ACPI_S5_SLP_TYP, 0u8, 0u8, 0u8];
    let s5_elements: Vec<&dyn Aml> = s5.iter().map(|v| v as &dyn Aml).collect();
    Name::new(Path::new("_S5_"), &Package::new(s5_elements)).to_aml_bytes(&mut body);

    let names: Vec<String> = (0..mmio_devices.len())
        .map(|i| format!("V{i:03X}"))
        .collect();
    let uids: Vec<u32> = (0..mmio_devices.len() as u32).collect();
    let resources: Vec<(Memory32Fixed, Interrupt)> = mmio_devices
        .iter()
        .map(|d| {
            (
                Memory32Fixed::new(true, d.base as u32, d.len as u32),
                // irqfd injects an edge; the line is never shared.
                Interrupt::new(true, true, false, false, d.irq),
            )
        })
        .collect();
    let crs: Vec<ResourceTemplate> = resources
        .iter()
        .map(|(m, i)| ResourceTemplate::new(vec![m, i]))
        .collect();
    let hid = "LNRO0005";
    let hids: Vec<Name> = (0..mmio_devices.len())
        .map(|_| Name::new(Path::new("_HID"), &hid))
        .collect();
    let uid_names: Vec<Name> = uids
        .iter()
        .map(|u| Name::new(Path::new("_UID"), u))
        .collect();
    let crs_names: Vec<Name> = crs
        .iter()
        .map(|c| Name::new(Path::new("_CRS"), c))
        .collect();
    let devices: Vec<Device> = (0..mmio_devices.len())
        .map(|i| {
            Device::new(
                Path::new(&names[i]),
                vec![&hids[i], &uid_names[i], &crs_names[i]],
            )
        })
        .collect();
    // COM1 must be an ACPI device: hardware-reduced ACPI has no legacy PIC, so Linux maps no
    // ISA IRQs by itself, and without this entry ttyS0 would never get its interrupt (console
    // output from printk still works, since it polls, but a shell's output stalls).
    let com1_io = IO::new(SERIAL_PORT as u16, SERIAL_PORT as u16, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = EISAName::new("PNP0501");
    let com1_children: [Name; 3] = [
        Name::new(Path::new("_HID"), &com1_hid),
        Name::new(Path::new("_UID"), &0u8),
        Name::new(Path::new("_CRS"), &com1_crs),
    ];
    let com1 = Device::new(
        Path::new("COM1"),
        com1_children.iter().map(|n| n as &dyn Aml).collect(),
    );
    // The Generic Event Device: its _EVT reads the event selector and turns the power-button
    // bit into a Notify on PWRB, which the guest's ACPI button driver reports as KEY_POWER.
    let ged_irq = Interrupt::new(true, true, false, false, GED_IRQ);
    let ged_crs = ResourceTemplate::new(vec![&ged_irq]);
    let ged_port = u32::from(GED_PORT);
    let ged_len = ged::LEN as u32;
    let ged_region = OpRegion::new(
        Path::new("GDST"),
        OpRegionSpace::SystemIO,
        &ged_port,
        &ged_len,
    );
    let ged_field = Field::new(
        Path::new("GDST"),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 32)],
    );
    let gdat = Path::new("GDAT");
    let read_events = Store::new(&Local(0), &gdat);
    let power_bit = ged::EVENT_POWER_BUTTON;
    let pressed = And::new(&ZERO, &Local(0), &power_bit);
    let is_pressed = Equal::new(&pressed, &power_bit);
    let pwrb = Path::new("\\_SB_.PWRB");
    let notify_value = 0x80u8;
    let notify = Notify::new(&pwrb, &notify_value);
    let on_power = If::new(&is_pressed, vec![&notify]);
    let evt = Method::new(Path::new("_EVT"), 1, true, vec![&read_events, &on_power]);
    let ged_hid = Name::new(Path::new("_HID"), &"ACPI0013");
    let ged_uid = Name::new(Path::new("_UID"), &0u8);
    let ged_crs_name = Name::new(Path::new("_CRS"), &ged_crs);
    let ged_dev = Device::new(
        Path::new("GED0"),
        vec![
            &ged_hid,
            &ged_uid,
            &ged_crs_name,
            &ged_region,
            &ged_field,
            &evt,
        ],
    );
    let pwrb_hid_id = EISAName::new("PNP0C0C");
    let pwrb_hid = Name::new(Path::new("_HID"), &pwrb_hid_id);
    let pwrb_uid = Name::new(Path::new("_UID"), &0u8);
    let pwrb_dev = Device::new(Path::new("PWRB"), vec![&pwrb_hid, &pwrb_uid]);

    let mut children: Vec<&dyn Aml> = vec![&com1, &ged_dev, &pwrb_dev];
    children.extend(devices.iter().map(|d| d as &dyn Aml));
    Scope::new(Path::new("\\_SB_"), children).to_aml_bytes(&mut body);

    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"FLOTDSDT", OEM_REVISION);
    table.append_slice(&body);
    table.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, *b"FLOTFADT", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_VGA_NOT_PRESENT.into();
    fadt.reset_reg = io(ACPI_PM_PORT + acpi_pm::RESET as u16);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io(ACPI_PM_PORT + acpi_pm::SLEEP_CONTROL as u16);
    fadt.sleep_status_reg = io(ACPI_PM_PORT + acpi_pm::SLEEP_STATUS as u16);
    let mut bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}

/// The MADT: one enabled LAPIC per vCPU (APIC id = index) and the IOAPIC.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"FLOTMADT",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for i in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    let mut bytes = Vec::new();
    madt.to_aml_bytes(&mut bytes);
    bytes
}

/// Writes every table into the BIOS area and returns the RSDP address.
pub fn create_acpi_tables(
    memory: &GuestMemory,
    vcpus: u8,
    mmio_devices: &[MmioDeviceInfo],
) -> Result<GuestAddress, AcpiError> {
    let align = |a: u64| (a + 15) & !15;
    let mut next = align(RSDP_START + Rsdp::len() as u64);
    let mut place = |bytes: &[u8], what: &'static str| -> Result<u64, AcpiError> {
        let addr = next;
        let end = addr + bytes.len() as u64;
        if end > ACPI_TABLES_END {
            return Err(AcpiError::TooLarge(end - RSDP_START));
        }
        memory
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|_| AcpiError::GuestWrite(what))?;
        next = align(end);
        Ok(addr)
    };
    let dsdt_addr = place(&dsdt(mmio_devices), "DSDT")?;
    let fadt_addr = place(&fadt(dsdt_addr), "FADT")?;
    let madt_addr = place(&madt(vcpus), "MADT")?;
    let mut xsdt = XSDT::new(OEM_ID, *b"FLOTXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(&xsdt_bytes, "XSDT")?;
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    memory
        .write_slice(&rsdp, GuestAddress(RSDP_START))
        .map_err(|_| AcpiError::GuestWrite("RSDP"))?;
    Ok(GuestAddress(RSDP_START))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestRam;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn find(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    #[test]
    fn dsdt_describes_each_mmio_device_and_s5() {
        let devs = [
            MmioDeviceInfo {
                base: 0xd000_0000,
                len: 0x1000,
                irq: 5,
            },
            MmioDeviceInfo {
                base: 0xd000_1000,
                len: 0x1000,
                irq: 6,
            },
        ];
        let t = dsdt(&devs);
        assert_eq!(&t[..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert!(checksum_ok(&t));
        assert_eq!(find(&t, b"LNRO0005"), 2);
        assert_eq!(find(&t, b"_S5_"), 1);
        assert_eq!(find(&t, b"COM1"), 1);
        assert_eq!(find(&t, b"ACPI0013"), 1);
        assert_eq!(find(&t, b"_EVT"), 1);
        // PNP0C0C (power button) as an EISA id.
        assert_eq!(find(&t, &[0x0c, 0x41, 0xd0, 0x0c, 0x0c]), 1);
        // PNP0501 compressed as an EISA id, with IRQ 4.
        assert_eq!(find(&t, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), 1);
        assert_eq!(find(&t, &[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0, 0, 0]), 1);
        assert_eq!(find(&t, b"V001"), 1);
        // Memory32Fixed descriptor (0x86) carrying the second window's base.
        assert_eq!(find(&t, &0xd000_1000u32.to_le_bytes()), 1);
        assert!(
            find(&t, &[0x89, 0x06, 0x00, 0x03, 0x01, 0x06, 0, 0, 0]) == 1,
            "edge, active-high IRQ 6"
        );
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let ram = GuestRam::new(256 << 20).unwrap();
        let devs = [MmioDeviceInfo {
            base: 0xd000_0000,
            len: 0x1000,
            irq: 5,
        }];
        let rsdp_addr = create_acpi_tables(&ram.memory, 4, &devs).unwrap();
        let mut rsdp = [0u8; 36];
        ram.memory.read_slice(&mut rsdp, rsdp_addr).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let read_table = |addr: u64| {
            let mut hdr = [0u8; 8];
            ram.memory.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; len];
            ram.memory.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert!(checksum_ok(&t), "{}", String::from_utf8_lossy(&t[..4]));
            t
        };
        let xsdt = read_table(xsdt_addr);
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = read_table(entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        assert_eq!(&read_table(dsdt_addr)[..4], b"DSDT");
        let madt = read_table(entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        // Four LAPIC entries (type 0) and one IOAPIC (type 1) after the 44-byte header.
        let mut types = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            types.push(madt[off]);
            off += madt[off + 1] as usize;
        }
        assert_eq!(types, vec![0, 0, 0, 0, 1]);
    }

    #[test]
    fn max_vcpus_fit() {
        let ram = GuestRam::new(256 << 20).unwrap();
        let devs: Vec<_> = (0..32)
            .map(|i| MmioDeviceInfo {
                base: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                irq: 5 + i as u32 % 19,
            })
            .collect();
        create_acpi_tables(&ram.memory, 254, &devs).unwrap();
    }
}
