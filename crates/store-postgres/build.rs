//! Lists `migrations/NNNN_<name>.sql` as the `MIGRATIONS` table, so that a new migration is
//! its file alone. The numbers must run from 1 without a gap, each once: a build that finds
//! otherwise fails, rather than leaving a schema change out.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir =
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("migrations");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut found: Vec<(i32, String, String)> = std::fs::read_dir(&dir)
        .expect("the migrations directory reads")
        .map(|entry| entry.expect("a directory entry reads").file_name())
        .filter_map(|name| name.to_str().map(str::to_string))
        .filter(|file| file.ends_with(".sql"))
        .map(|file| {
            let stem = file.strip_suffix(".sql").expect("filtered above");
            let (number, name) = stem
                .split_once('_')
                .unwrap_or_else(|| panic!("{file}: a migration is named NNNN_<name>.sql"));
            assert!(
                number.len() == 4 && number.bytes().all(|b| b.is_ascii_digit()),
                "{file}: a migration's number has four digits"
            );
            let version: i32 = number.parse().expect("four digits parse");
            (version, name.to_string(), file)
        })
        .collect();
    found.sort();
    let mut table = String::from("&[\n");
    for (index, (version, name, file)) in found.iter().enumerate() {
        let expected = i32::try_from(index).expect("few migrations") + 1;
        assert_eq!(
            *version, expected,
            "{file}: migrations are numbered 1, 2, 3… without a gap"
        );
        writeln!(
            table,
            "    Migration {{ version: {version}, name: {name:?}, sql: include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/migrations/{file}\")) }},"
        )
        .expect("a string takes writes");
    }
    table.push(']');
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets it")).join("migrations.rs");
    std::fs::write(out, table).expect("the table writes");
}
