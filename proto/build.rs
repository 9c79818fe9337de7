//! Generates the rewind.v1 types, tonic services and canonical protobuf-JSON serde impls.
//!
//! protoc comes from `protoc-bin-vendored` and is handed to prost-build directly rather than through
//! a global `PROTOC`, so a fresh clone builds with no apt step and other crates' builds are untouched.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "rewind/v1/types.proto",
        "rewind/v1/agent.proto",
        "rewind/v1/control.proto",
        "rewind/v1/raft.proto",
        "rewind/v1/join.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("rewind_descriptor.bin");

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        .compile_with_config(config, &protos, &["."])?;

    let descriptors = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .build(&[".rewind.v1"])?;
    Ok(())
}
