//! The `berth` binary: parse, build, run; everything else lives in the library.
//!
//! Architecture: docs/ARCHITECTURE.md, "Commands".

/// mimalloc instead of glibc's malloc: a cache hit allocates and frees a few dozen small
/// objects (headers, keys, the response), and on the hot manifest path glibc's allocator cost
/// about a tenth of berth's CPU per request more (benches/load/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(berth::cli::main());
}
