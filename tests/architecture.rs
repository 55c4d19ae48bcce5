//! The house rules that hold the module map together, checked on the source tree:
//! only the factory names concrete sources and sinks, no sink reads a source's types,
//! and no two modules import each other except a parent and its own children.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, with its text up to its unit tests.
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("source dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("source file");
                let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default().to_string();
                files.push((path, code));
            }
        }
    }
    files.sort();
    files
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `src/source/mysql/mod.rs` → `source::mysql`.
fn module_of(path: &Path) -> String {
    let relative = path.strip_prefix(src()).expect("under src");
    let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if let Some(last) = parts.last_mut() {
        *last = last.trim_end_matches(".rs").to_string();
    }
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

#[test]
fn only_the_factory_names_concrete_sources_and_sinks() {
    let concrete = [
        "source::postgres",
        "source::mysql",
        "source::sqlite",
        "source::mongodb",
        "sink::postgres",
        "sink::mysql",
        "PostgresSource",
        "MysqlSource",
        "SqliteSource",
        "MongoSource",
        "PostgresSink",
        "MysqlSink",
        "tokio_postgres",
        "mysql_async",
    ];
    for (path, code) in sources(&src().join("pipeline")) {
        for name in concrete {
            assert!(!code.contains(name), "{} names {name}: ask crate::connect or a trait method", path.display());
        }
    }
}

#[test]
fn no_sink_reads_a_source_module() {
    for (path, code) in sources(&src().join("sink")) {
        assert!(!code.contains("crate::source"), "{} imports from crate::source", path.display());
    }
}

#[test]
fn modules_import_each_other_only_as_parent_and_children() {
    let files = sources(&src());
    let modules: BTreeSet<String> = files.iter().map(|(path, _)| module_of(path)).collect();
    // Module → the modules it names through `crate::…` paths (the longest that is a module).
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, code) in &files {
        let from = module_of(path);
        let named = imports.entry(from.clone()).or_default();
        for (at, _) in code.match_indices("crate::") {
            let path: String =
                code[at + 7..].chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
            let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
            if let Some(to) = (1..=parts.len()).rev().map(|k| parts[..k].join("::")).find(|m| modules.contains(m)) {
                if to != from {
                    named.insert(to);
                }
            }
        }
    }
    let related = |a: &str, b: &str| a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"));
    // A circle is a pair of modules each reaching the other; report the first such pair.
    let reaches = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut pending = vec![from.to_string()];
        while let Some(module) = pending.pop() {
            for next in imports.get(&module).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    pending.push(next.clone());
                }
            }
        }
        seen
    };
    for module in &modules {
        for other in reaches(module) {
            if &other != module && !related(module, &other) && reaches(&other).contains(module) {
                panic!("{module} and {other} import each other (through crate:: paths)");
            }
        }
    }
}
