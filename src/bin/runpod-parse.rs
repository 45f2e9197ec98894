//! `runpod-parse`: the document parser's child process, started by the worker (see the
//! `docparse` crate). It links no libtorch, so its memory limit is the document's alone.

fn main() -> std::process::ExitCode {
    docparse::child::main()
}
