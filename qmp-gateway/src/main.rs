//! `flotilla`: StratoVirt-compatible front end (being built; see the library).

fn main() {}
