//! Generates the `ferry.v1` code with the pure-Rust `protox` compiler, so no system `protoc` is needed.

use std::{env, error::Error, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] =
    &["ferry/v1/registry.proto", "ferry/v1/discovery.proto", "ferry/v1/config.proto", "ferry/v1/security.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let encoded = descriptors.encode_to_vec();
    fs::write(out.join("ferry_descriptor.bin"), &encoded)?;

    // Maps of the routing resources are ordered, so their YAML, JSON and diffs are stable.
    const ORDERED: &[&str] = &[
        ".ferry.v1.RouteMatch",
        ".ferry.v1.HeaderRewrite",
        ".ferry.v1.ServicePolicy",
        ".ferry.v1.Subset",
        ".ferry.v1.TrafficResponse",
    ];
    let mut builder = tonic_prost_build::configure();
    for path in ORDERED {
        builder = builder.btree_map(path);
    }
    builder.compile_well_known_types(true).extern_path(".google.protobuf", "::pbjson_types").compile_fds(descriptors)?;

    // The JSON form of every message is the proto3 JSON mapping, with the proto field names.
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .preserve_proto_field_names()
        .btree_map(ORDERED.iter().copied())
        .build(&[".ferry.v1"])?;
    Ok(())
}
