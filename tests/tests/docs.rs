//! The README stays true to the workspace it describes.

use std::path::PathBuf;

#[test]
fn the_readme_lists_every_workspace_member() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let members = manifest
        .lines()
        .find_map(|line| line.trim().strip_prefix("members = ["))
        .expect("a members line")
        .trim_end_matches(']')
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_owned())
        .filter(|m| !m.is_empty())
        .collect::<Vec<_>>();
    assert!(members.len() >= 10, "{members:?}");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let table = readme.split("## Repository").nth(1).expect("a Repository section");
    for member in members {
        assert!(table.contains(&format!("| `{member}/` |")), "README's Repository table lacks `{member}/`");
    }
}
