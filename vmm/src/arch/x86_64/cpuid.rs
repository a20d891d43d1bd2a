//! CPUID as the guest sees it: what KVM supports, with the topology rewritten to match `-smp`
//! (one socket, one thread per core, N cores) and the hypervisor bit set.
//!
//! The guest's scheduler and `lscpu` read topology from CPUID, not from the MADT; leaving the
//! host's values in would describe a different machine on every host.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// CPUID.1:ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:ECX bit 24: the LAPIC timer has TSC-deadline mode. KVM emulates it but leaves
/// the bit out of KVM_GET_SUPPORTED_CPUID (it depends on the in-kernel irqchip), so the VMM
/// sets it when KVM_CAP_TSC_DEADLINE_TIMER is present.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:EDX bit 28: the logical-processor count in EBX[23:16] is valid.
const EDX_HTT: u32 = 1 << 28;
/// CPUID.8000_0001:ECX bit 1: CmpLegacy (multi-core, AMD).
const ECX_CMP_LEGACY: u32 = 1 << 1;
/// Leaf 0xB/0x1F level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `count` cores in an APIC id.
fn core_id_bits(count: u8) -> u32 {
    u32::from(count).next_power_of_two().trailing_zeros()
}

/// Rewrites `cpuid` for vCPU `index` of `count`.
pub fn set_topology(cpuid: &mut CpuId, index: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, index, count);
    }
}

/// Advertises the TSC-deadline timer (call only when KVM has KVM_CAP_TSC_DEADLINE_TIMER).
pub fn set_tsc_deadline(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
        entry.ecx |= ECX_TSC_DEADLINE;
    }
}

fn patch_entry(entry: &mut kvm_cpuid_entry2, index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count32 = u32::from(count);
    let shift = core_id_bits(count);
    match entry.function {
        0x1 => {
            // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
            entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((count32 & 0xff) << 16);
            entry.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        0x4 => {
            // Deterministic cache parameters (Intel): EAX[31:26] cores per package - 1,
            // EAX[25:14] logical processors sharing this cache - 1 (L3 is shared by all).
            let cache_level = (entry.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { count32 - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | ((count32 - 1) << 26) | ((sharing & 0xfff) << 14);
        }
        0xb | 0x1f => {
            let (eax, ebx, ecx) = match entry.index {
                0 => (0, 1, (LEVEL_TYPE_SMT << 8)),
                1 => (shift, count32, (LEVEL_TYPE_CORE << 8) | 1),
                n => (0, 0, n & 0xff),
            };
            entry.eax = eax;
            entry.ebx = ebx;
            entry.ecx = ecx;
            entry.edx = apic_id;
        }
        0x8000_0001 => {
            if count > 1 {
                entry.ecx |= ECX_CMP_LEGACY;
            } else {
                entry.ecx &= !ECX_CMP_LEGACY;
            }
        }
        0x8000_0008 => {
            // AMD: ECX[7:0] cores - 1, ECX[15:12] APIC id bits for the core.
            entry.ecx = (entry.ecx & !0xf0ff) | (shift << 12) | ((count32 - 1) & 0xff);
        }
        0x8000_001e => {
            // AMD extended APIC id, compute unit (core) id with one thread per unit, node 0.
            entry.eax = apic_id;
            entry.ebx = apic_id & 0xff;
            entry.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_and_count() {
        let mut e = entry(1, 0);
        e.ebx = 0xffff_ffff;
        patch_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0xffff);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_describes_cores() {
        let mut smt = entry(0xb, 0);
        let mut core = entry(0xb, 1);
        let mut end = entry(0xb, 2);
        for e in [&mut smt, &mut core, &mut end] {
            patch_entry(e, 5, 6);
        }
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
            (0, 1, LEVEL_TYPE_SMT, 5)
        );
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (3, 6, LEVEL_TYPE_CORE, 5)
        );
        assert_eq!(end.ebx, 0);
        assert_eq!((end.ecx >> 8) & 0xff, 0);
    }

    #[test]
    fn amd_core_count() {
        let mut e = entry(0x8000_0008, 0);
        patch_entry(&mut e, 0, 2);
        assert_eq!(e.ecx & 0xff, 1);
        assert_eq!((e.ecx >> 12) & 0xf, 1);
        assert_eq!(core_id_bits(1), 0);
        assert_eq!(core_id_bits(254), 8);
    }
}
