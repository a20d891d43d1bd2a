//! Architecture support. Only x86_64 exists today; keeping it behind one module keeps the rest
//! of the core free of x86 details.

pub mod x86_64;
pub use self::x86_64::*;
