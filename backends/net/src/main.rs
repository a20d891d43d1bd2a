//! flotilla-net entry point: parse, set up the process, serve.

use clap::Parser;

fn main() {
    let args = flotilla_net::Args::parse();
    if args.vhost_user.print_capabilities {
        println!("{}", flotilla_net::capabilities());
        return;
    }
    if let Err(e) = flotilla_backend::daemon::prepare("flotilla-net", &args.vhost_user) {
        eprintln!("flotilla-net: {e}");
        std::process::exit(1);
    }
    if let Err(e) = flotilla_net::run(&args) {
        log::error!("{e}");
        eprintln!("flotilla-net: {e}");
        std::process::exit(1);
    }
}
