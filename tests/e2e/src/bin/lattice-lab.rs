//! The lab as a command: `demo` (a coordinator and three nodes in namespaces) and
//! `bench-throughput`.
#![allow(clippy::print_stdout)]

fn main() -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
