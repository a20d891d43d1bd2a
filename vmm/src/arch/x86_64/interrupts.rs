//! Local APIC set-up: LINT0 delivers the PIC's ExtINT and LINT1 NMIs, as firmware would leave
//! it. Linux relies on this to run its early timer checks through the legacy PIC.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = b as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Programs LINT0 as ExtINT and LINT1 as NMI.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut lapic = vcpu.get_lapic()?;
    let lint0 = get_reg(&lapic, APIC_LVT_LINT0);
    set_reg(
        &mut lapic,
        APIC_LVT_LINT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = get_reg(&lapic, APIC_LVT_LINT1);
    set_reg(
        &mut lapic,
        APIC_LVT_LINT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_bits() {
        let mut lapic = kvm_lapic_state::default();
        set_reg(&mut lapic, APIC_LVT_LINT0, 0x0001_0000);
        let v = with_delivery_mode(get_reg(&lapic, APIC_LVT_LINT0), APIC_MODE_EXTINT);
        assert_eq!(v, 0x0001_0700);
        assert_eq!(with_delivery_mode(0xffff_ffff, APIC_MODE_NMI), 0xffff_fcff);
    }
}
