use node::cli::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

/// mimalloc: the data plane allocates and frees a buffer per packet (each sealed message) on
/// several threads; glibc's allocator cost about a tenth of the node's time in a bulk transfer.
/// It is built without transparent huge pages (`no_thp`), and `main` turns them off for the
/// process where the system hands them out unasked: see `no_huge_pages`.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    no_huge_pages();
    // A --config file stands for flags given before the command line's own.
    let cli: Cli = match relay::config::parse("up", "lattice") {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lattice: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(node::run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lattice: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A node is a small daemon on every device: transparent huge pages made its heap resident in
/// 2 MiB steps (32 MB of huge pages for 15 MB of live heap with 1,000 peers, and no measurable
/// gain in throughput). Where the system gives them to every process ("always"), this turns
/// them off for the node's pages from here on. Best effort: a kernel without the call
/// changes nothing.
fn no_huge_pages() {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("LATTICE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
