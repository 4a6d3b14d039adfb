//! Fuzz target: [`fifobus_fuzz::check_command`]. Built by `cargo afl build`
//! it is an AFL++ persistent-mode target; built by plain `cargo build` it
//! replays the files (or directories of files) named on its command line.

#[cfg(fuzzing)]
fn main() {
    afl::fuzz!(|data: &[u8]| fifobus_fuzz::check_command(data));
}

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    fifobus_fuzz::replay_args(fifobus_fuzz::check_command)
}
