//! The `berth` binary: parse, build, run; everything else lives in the library.

fn main() {
    std::process::exit(berth::cli::main());
}
