//! flotilla-net entry point: parse, set up the process, serve.

use clap::Parser;

fn main() {
    let args = flotilla_net::Args::parse();
    if args.vhost_user.print_capabilities {
        println!("{}", flotilla_net::capabilities());
        return;
    }
    // Before the jail's namespaces: a tap opened by name must be the host's.
    let tap = match flotilla_net::open_tap(&args) {
        Ok(tap) => tap,
        Err(e) => {
            eprintln!("flotilla-net: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = flotilla_backend::daemon::prepare("flotilla-net", &args.vhost_user) {
        eprintln!("flotilla-net: {e}");
        std::process::exit(1);
    }
    if let Err(e) = flotilla_net::run(&args, tap) {
        log::error!("{e}");
        eprintln!("flotilla-net: {e}");
        std::process::exit(1);
    }
}
