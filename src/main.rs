//! The `berth` binary: parse, build, run; everything else lives in the library.
//!
//! Architecture: docs/ARCHITECTURE.md, "Commands".

/// jemalloc instead of glibc's malloc: a cache hit allocates and frees a few dozen small
/// objects (headers, keys, the response), and on the hot manifest path glibc's allocator cost
/// about a tenth more CPU per request (benches/load/README.md). mimalloc saved as much but
/// tripled the peak RSS of serving hot 64 MiB blobs (80 MiB against 25-29 MiB).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    std::process::exit(berth::cli::main());
}
