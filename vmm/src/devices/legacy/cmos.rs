//! Enough of the MC146818 CMOS RTC for the guest clock: the current UTC time in BCD with
//! "update not in progress", plus 128 bytes of NVRAM. Alarms and periodic interrupts are not
//! modelled (Linux uses kvm-clock and the LAPIC timer).

use crate::devices::bus::BusDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// 32.768 kHz time base, 1024 Hz rate, update not in progress.
const STATUS_A_VALUE: u8 = 0x26;
/// 24-hour mode, BCD.
const STATUS_B_VALUE: u8 = 0x02;
/// "Valid RAM and time".
const STATUS_D_VALUE: u8 = 0x80;

/// The time fields the RTC reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtcTime {
    /// 0..=59
    pub second: u8,
    /// 0..=59
    pub minute: u8,
    /// 0..=23
    pub hour: u8,
    /// 1 = Sunday
    pub weekday: u8,
    /// 1..=31
    pub day: u8,
    /// 1..=12
    pub month: u8,
    /// e.g. 2026
    pub year: u16,
}

impl RtcTime {
    /// The host's current UTC time.
    pub fn now() -> Self {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self::from_unix(secs)
    }

    /// Converts seconds since the epoch (civil-from-days, proleptic Gregorian).
    pub fn from_unix(secs: u64) -> Self {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        // Howard Hinnant's days-to-civil algorithm.
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u16;
        RtcTime {
            second: (rem % 60) as u8,
            minute: (rem / 60 % 60) as u8,
            hour: (rem / 3600) as u8,
            // 1970-01-01 was a Thursday (weekday 5 with Sunday = 1).
            weekday: ((days + 4) % 7 + 1) as u8,
            day,
            month,
            year,
        }
    }
}

fn bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// The CMOS device on ports 0x70 (index) and 0x71 (data).
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    clock: fn() -> RtcTime,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::with_clock(RtcTime::now)
    }
}

impl Cmos {
    /// A CMOS reading time from `clock` (tests use a fixed one).
    pub fn with_clock(clock: fn() -> RtcTime) -> Self {
        Cmos {
            index: 0,
            nvram: [0; 128],
            clock,
        }
    }

    fn read_register(&self) -> u8 {
        let t = (self.clock)();
        match self.index {
            REG_SECONDS => bcd(t.second),
            REG_MINUTES => bcd(t.minute),
            REG_HOURS => bcd(t.hour),
            REG_WEEKDAY => bcd(t.weekday),
            REG_DAY => bcd(t.day),
            REG_MONTH => bcd(t.month),
            REG_YEAR => bcd((t.year % 100) as u8),
            REG_CENTURY => bcd((t.year / 100) as u8),
            REG_STATUS_A => STATUS_A_VALUE,
            REG_STATUS_B => STATUS_B_VALUE,
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D_VALUE,
            i => self.nvram[usize::from(i)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = if offset == 1 {
                self.read_register()
            } else {
                self.index
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port gates NMIs on real hardware; it is not part of the index.
            0 => self.index = value & 0x7f,
            // Time registers are read-only here: the guest cannot move the host's clock.
            1 if self.index > REG_STATUS_D => self.nvram[usize::from(self.index)] = value,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> RtcTime {
        // 2026-11-22 04:50:58 UTC, a Sunday.
        RtcTime::from_unix(1_795_323_058)
    }

    #[test]
    fn civil_time() {
        let t = fixed();
        assert_eq!((t.year, t.month, t.day), (2026, 11, 22));
        assert_eq!((t.hour, t.minute, t.second, t.weekday), (4, 50, 58, 1));
        assert_eq!(RtcTime::from_unix(951_782_400).day, 29); // 2000-02-29
    }

    #[test]
    fn registers_read_bcd() {
        let mut cmos = Cmos::with_clock(fixed);
        let mut read = |index: u8| {
            cmos.write(0, &[index | 0x80]);
            let mut v = [0u8];
            cmos.read(1, &mut v);
            v[0]
        };
        assert_eq!(read(REG_YEAR), 0x26);
        assert_eq!(read(REG_CENTURY), 0x20);
        assert_eq!(read(REG_MONTH), 0x11);
        assert_eq!(read(REG_SECONDS), 0x58);
        assert_eq!(read(REG_STATUS_A) & 0x80, 0, "no update in progress");
        assert_eq!(read(REG_STATUS_D), 0x80);
        cmos.write(0, &[0x40]);
        cmos.write(1, &[0xab]);
        let mut v = [0u8];
        cmos.read(1, &mut v);
        assert_eq!(v[0], 0xab);
    }
}
