//! Why a VM stops, and how devices and vCPUs report it.
//!
//! Any thread (a vCPU on a triple fault, the i8042 on a reset command, the ACPI power
//! management device on S5) may end the VM; they all send a [`VmExit`] to the one place that
//! tears the VM down.

use std::sync::mpsc::Sender;

use vm_superio::Trigger;

/// The reason the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5 or KVM system event).
    PowerOff,
    /// The guest reset (i8042, ACPI reset register, triple fault).
    Reset,
    /// The management side asked the VMM to quit (QMP `quit`).
    Quit,
    /// The VM cannot go on: KVM internal error, failed entry, crashed vCPU.
    Error(String),
}

impl VmExit {
    /// The process exit status for this reason: a guest that shut itself down is a success.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::PowerOff | VmExit::Reset | VmExit::Quit => 0,
            VmExit::Error(_) => 1,
        }
    }
}

/// Sends one fixed [`VmExit`] when triggered; lets vm-superio devices end the VM.
#[derive(Clone, Debug)]
pub struct ExitTrigger {
    tx: Sender<VmExit>,
    reason: VmExit,
}

impl ExitTrigger {
    /// A trigger that reports `reason` on `tx`.
    pub fn new(tx: Sender<VmExit>, reason: VmExit) -> Self {
        ExitTrigger { tx, reason }
    }
}

impl Trigger for ExitTrigger {
    type E = std::sync::mpsc::SendError<VmExit>;

    fn trigger(&self) -> Result<(), Self::E> {
        self.tx.send(self.reason.clone())
    }
}
