//! The `berth` binary: parse, build, run; everything else lives in the library.
//!
//! Architecture: docs/ARCHITECTURE.md, "Commands".

fn main() {
    std::process::exit(berth::cli::main());
}
