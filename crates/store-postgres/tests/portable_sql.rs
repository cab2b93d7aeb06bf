//! The portable-SQL rules of ARCHITECTURE.md, checked over every migration and every source
//! file of this crate: nothing that PostgreSQL-compatible distributed engines lack.

/// Every migration and source file of this crate, by path within the crate, with its text.
fn files() -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["migrations", "src"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("a directory of the crate") {
            let path = entry.expect("a directory entry").path();
            if path
                .extension()
                .is_some_and(|ext| ext == "sql" || ext == "rs")
            {
                let name = path.strip_prefix(root).unwrap().display().to_string();
                files.push((
                    name,
                    std::fs::read_to_string(&path).expect("a readable file"),
                ));
            }
        }
    }
    files.sort();
    files
}

/// Word sequences that must not appear (upper case), and why.
const FORBIDDEN: &[(&[&str], &str)] = &[
    (&["PG_ADVISORY_LOCK"], "advisory locks"),
    (&["PG_ADVISORY_XACT_LOCK"], "advisory locks"),
    (&["PG_TRY_ADVISORY_LOCK"], "advisory locks"),
    (&["LISTEN"], "LISTEN/NOTIFY"),
    (&["NOTIFY"], "LISTEN/NOTIFY"),
    (&["PG_NOTIFY"], "LISTEN/NOTIFY"),
    (&["CREATE", "TRIGGER"], "triggers"),
    (&["CREATE", "FUNCTION"], "stored functions"),
    (&["CREATE", "OR", "REPLACE", "FUNCTION"], "stored functions"),
    (&["CREATE", "PROCEDURE"], "stored procedures"),
    (
        &["CREATE", "OR", "REPLACE", "PROCEDURE"],
        "stored procedures",
    ),
    (&["CREATE", "SEQUENCE"], "sequences"),
    (&["NEXTVAL"], "sequences"),
    (&["SERIAL"], "sequences"),
    (&["BIGSERIAL"], "sequences"),
    (&["SMALLSERIAL"], "sequences"),
    (&["GENERATED", "ALWAYS", "AS", "IDENTITY"], "sequences"),
    (
        &["GENERATED", "BY", "DEFAULT", "AS", "IDENTITY"],
        "sequences",
    ),
    (&["CREATE", "EXTENSION"], "extensions"),
    (&["OFFSET"], "OFFSET pagination (use keyset cursors)"),
];

/// The text without comments: `--` in SQL, `//` in Rust.
fn code_of(name: &str, text: &str) -> String {
    let marker = if name.ends_with(".sql") { "--" } else { "//" };
    text.lines()
        .map(|line| line.split(marker).next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| !word.is_empty())
        .map(str::to_ascii_uppercase)
        .collect()
}

/// Each forbidden construct found in `text`.
fn violations(name: &str, text: &str) -> Vec<String> {
    let words = words(&code_of(name, text));
    let mut found = Vec::new();
    for (sequence, why) in FORBIDDEN {
        if words
            .windows(sequence.len())
            .any(|window| window.iter().zip(sequence.iter()).all(|(a, b)| a == b))
        {
            found.push(format!("{name}: {} ({why})", sequence.join(" ")));
        }
    }
    found
}

#[test]
fn no_migration_or_query_uses_what_distributed_engines_lack() {
    let files = files();
    assert!(files.len() >= 5, "{files:?}");
    let found: Vec<String> = files
        .iter()
        .flat_map(|(name, text)| violations(name, text))
        .collect();
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn the_check_finds_each_forbidden_construct() {
    let samples = [
        "SELECT pg_advisory_xact_lock(1)",
        "LISTEN payments",
        "SELECT pg_notify('a', 'b')",
        "CREATE TRIGGER t AFTER INSERT ON payments",
        "create or replace function f() returns int",
        "CREATE SEQUENCE ids",
        "id BIGSERIAL PRIMARY KEY",
        "id BIGINT GENERATED ALWAYS AS IDENTITY",
        "CREATE EXTENSION pgcrypto",
        "SELECT * FROM payments LIMIT 10 OFFSET 20",
    ];
    for sample in samples {
        assert!(
            !violations("sample.sql", sample).is_empty(),
            "not caught: {sample}"
        );
    }
    assert!(violations("sample.sql", "-- LISTEN in a comment is fine").is_empty());
    assert!(violations("sample.sql", "SELECT id FROM payments FOR UPDATE").is_empty());
}

#[test]
fn every_migration_is_checked() {
    let files = files();
    for migration in farthing_store_postgres::MIGRATIONS {
        let file = format!("migrations/{:04}_{}.sql", migration.version, migration.name);
        let checked = files.iter().find(|(name, _)| *name == file);
        assert_eq!(
            checked.map(|(_, text)| text.as_str()),
            Some(migration.sql),
            "{file} is checked, and is the migration the binary embeds"
        );
    }
}
