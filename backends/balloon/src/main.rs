//! flotilla-balloon entry point: parse, set up the process, serve.

use clap::Parser;

fn main() {
    let args = flotilla_balloon::Args::parse();
    if args.vhost_user.print_capabilities {
        println!("{}", flotilla_balloon::capabilities());
        return;
    }
    if let Err(e) = flotilla_backend::daemon::prepare("flotilla-balloon", &args.vhost_user) {
        eprintln!("flotilla-balloon: {e}");
        std::process::exit(1);
    }
    if let Err(e) = flotilla_balloon::run(&args) {
        log::error!("{e}");
        eprintln!("flotilla-balloon: {e}");
        std::process::exit(1);
    }
}
