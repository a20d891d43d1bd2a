//! flotilla-net entry point: parse, set up the process, serve.

use clap::Parser;

fn main() {
    let args = flotilla_net::Args::parse();
    if args.vhost_user.print_capabilities {
        println!("{}", flotilla_net::capabilities());
        return;
    }
    // A tap opened by name must be the host's: open it before the jail's
    // namespaces.
    let tap = match flotilla_backend::daemon::prepare_with("flotilla-net", &args.vhost_user, || {
        flotilla_net::open_tap(&args).map_err(|e| e.to_string())
    }) {
        Ok(tap) => tap,
        Err(e) => {
            log::error!("{e}");
            eprintln!("flotilla-net: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = flotilla_net::run(&args, tap) {
        log::error!("{e}");
        eprintln!("flotilla-net: {e}");
        std::process::exit(1);
    }
}
