//! The units of every flag: [`ferry_core::units`], one parser for the command line, the
//! codec specs and the control socket.

pub use ferry_core::units::*;
