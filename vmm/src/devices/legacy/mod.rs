//! Legacy PC devices a Linux guest expects: 8250 UART, i8042 (for reset), CMOS RTC.

pub mod cmos;
pub mod i8042;
pub mod serial;

/// COM1 I/O ports.
pub const SERIAL_PORT: u64 = 0x3f8;
/// i8042 data (0x60) to command/status (0x64).
pub const I8042_PORT: u64 = 0x60;
/// CMOS index (0x70) and data (0x71).
pub const CMOS_PORT: u64 = 0x70;
