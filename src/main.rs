//! The `herald` binary: everything lives in the library.

fn main() {
    std::process::exit(herald::cli::main());
}
