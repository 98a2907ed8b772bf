//! The `shop-mesh` binary: parse the command line, load the configuration,
//! start logging, and hand off to one role.

use clap::Parser;

/// jemalloc, with its background thread purging freed pages: glibc's
/// malloc keeps what thousands of closed streams used (the registry held
/// 111 MiB a minute after 8000 abandoned streams, from 37 MiB); this gives
/// it back within seconds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = shop_mesh::cli::Cli::parse();
    match shop_mesh::cli::main(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
