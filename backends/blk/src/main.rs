//! flotilla-blk entry point: parse, set up the process, serve.

use clap::Parser;

fn main() {
    let args = flotilla_blk::Args::parse();
    if args.vhost_user.print_capabilities {
        println!("{}", flotilla_blk::capabilities());
        return;
    }
    if let Err(e) = flotilla_backend::daemon::prepare("flotilla-blk", &args.vhost_user) {
        eprintln!("flotilla-blk: {e}");
        std::process::exit(1);
    }
    if let Err(e) = flotilla_blk::run(&args) {
        log::error!("{e}");
        eprintln!("flotilla-blk: {e}");
        std::process::exit(1);
    }
}
