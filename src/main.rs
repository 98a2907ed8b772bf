//! The `shop-mesh` binary: parse the command line, load the configuration,
//! start logging, and hand off to one role.

use clap::Parser;

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
