//! `fifobus-bench` (also run as `fifobus bench`): the broker measured
//! against the bare FIFO ceiling (throughput, latency, handshakes, memory,
//! idle CPU). The scenarios are in `bench.rs`; this is the command line.

use std::process::ExitCode;

use clap::Parser;

mod alloc_count;
mod bench;
mod wire;

/// Counts the allocations of the in-process broker's threads for
/// `--only allocs`; costs every other thread one thread-local read.
#[global_allocator]
static ALLOCATOR: alloc_count::Counting = alloc_count::Counting;

use bench::BenchOptions;

const EXAMPLES: &str = "\
Examples:
  fifobus bench                # the full run, a few minutes
  fifobus bench --quick --json # a smoke run, machine-readable
  FIFOBUS_BENCH_BROKER=/path/to/old/fifobus fifobus bench --only \"1 -> 1\"   # A/B against another build

Starts its own brokers on a temporary directory. The broker binary: $FIFOBUS_BENCH_BROKER, else
the fifobus next to this program, else the one on PATH.";

/// Measure the broker against the bare FIFO ceiling (throughput, latency, handshakes, memory, idle CPU)
#[derive(Debug, Parser)]
#[command(name = "fifobus-bench", version, after_help = EXAMPLES)]
struct BenchArgs {
    /// Small counts: seconds instead of minutes (for smoke tests)
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON on stdout, notes included (no progress bar)
    #[arg(long)]
    json: bool,
    /// Payload bytes per message
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Messages in the 1 -> 1 scenario (others scale from it) [default: 2000000, --quick: 20000]
    #[arg(long)]
    messages: Option<u64>,
    /// Offered rate for the fixed-rate latency figures, messages per second
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Run only the scenario groups whose name contains this ("1 -> 1", "1 -> 10", "10 -> 1", "100 topics", "latency", "saturation", "clients", "memory", "handshake flood"; "floods", "allocs" and "redis" run only when named here)
    #[arg(long)]
    only: Option<String>,
}

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    if let Some(only) = args.only.as_deref().filter(|o| !bench::only_matches(o)) {
        use clap::CommandFactory;
        BenchArgs::command()
            .error(
                clap::error::ErrorKind::InvalidValue,
                format!(
                    "--only '{only}' matches no scenario group; the groups are: {}",
                    bench::GROUPS.map(|g| format!("'{g}'")).join(", ")
                ),
            )
            .exit();
    }
    let mut opts = if args.quick {
        BenchOptions::quick()
    } else {
        BenchOptions::full()
    };
    opts.payload = args.payload.max(12);
    opts.rate = args.rate.max(1);
    opts.progress = !args.json;
    opts.only = args.only.clone();
    if let Some(m) = args.messages {
        opts.messages = m.max(100);
    }
    match bench::run(&opts) {
        Ok(rows) if args.json => {
            let json: Vec<_> = rows.iter().map(bench::Measurement::to_json).collect();
            println!("{}", serde_json::Value::Array(json));
            ExitCode::SUCCESS
        }
        Ok(rows) => {
            print!("{}", bench::render(&rows));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fifobus bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::BenchArgs::command().debug_assert();
    }
}
