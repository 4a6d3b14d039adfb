//! The integration tests' harness: `TempBus` (a real `fifobus serve` on a
//! private temporary directory) and the bounded, event-driven waits, all
//! from the workspace's one harness, `crates/testkit` (shared with the
//! benchmark). `bin()` there is the `fifobus` binary cargo built for these
//! tests.

pub use fifobus_testkit::*;
