use std::process::ExitCode;

use clap::Parser;
use vubd::Config;
use vubd::{Args, CAPABILITIES_JSON};

fn main() -> ExitCode {
    vubd::init_logging();
    // A panicking reactor would leave its queues hanging while the process looks alive:
    // exit instead, so a supervisor restarts the server.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let args = Args::parse();
    if args.print_capabilities {
        println!("{CAPABILITIES_JSON}");
        return ExitCode::SUCCESS;
    }
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vubd: {e}");
            return ExitCode::from(2);
        }
    };
    match vubd::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vubd: {e}");
            ExitCode::FAILURE
        }
    }
}
