//! `docs/config.md` against the config structs in `src/config.rs`.
//!
//! The keys come from the structs themselves, not from their source text: the structs
//! deny unknown fields, so loading a config with an unknown key in a section makes serde
//! list that section's fields ("unknown field `x`, expected one of `a`, `b`"), and an
//! unknown value of an enumerated key lists its variants. The page must name exactly
//! those sections and keys (`## [section]`, then `### \`key\``), give each key a type, a
//! default and an example, and name every variant. Each example, applied to a minimal
//! config, must load with `Config::parse`; a default written as a TOML value must load to
//! the same config as leaving the key out. Every TOML block in `docs/`, and every example
//! config in `config/`, must load too.

use std::collections::BTreeMap;
use std::path::Path;

use cutover::config::Config;

const DOC: &str = include_str!("../docs/config.md");

/// The smallest valid config; probes and examples are applied to it.
const BASE: &str = r#"
[source]
kind = "postgres"
url = "postgresql://app@old-host:5432/shop"
[target]
kind = "postgres"
url = "postgresql://app@new-host:5432/shop"
[state]
dir = "/var/lib/cutover/shop"
"#;

/// A key name no struct will have: serde answers with the fields it does have.
const PROBE_KEY: &str = "no_such_key_in_any_cutover_section";
/// A value no enumerated key accepts: serde answers with the variants.
const PROBE_VALUE: &str = "no_such_value_of_any_cutover_key";

/// One `### \`key\`` entry of the page.
struct Entry {
    section: String,
    key: String,
    /// The entry's text, heading excluded.
    text: String,
}

impl Entry {
    /// The rest of the `- name:` line of the entry.
    fn field(&self, name: &str) -> Option<&str> {
        let prefix = format!("- {name}:");
        self.text.lines().find_map(|line| line.trim_start().strip_prefix(prefix.as_str())).map(str::trim)
    }

    fn name(&self) -> String {
        format!("[{}] {}", self.section, self.key)
    }
}

/// The page's sections (in order) and key entries, outside code blocks.
fn read_doc() -> (Vec<String>, Vec<Entry>) {
    let mut sections = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut section: Option<String> = None;
    let mut in_entry = false;
    let mut in_code = false;
    for line in DOC.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        if !in_code && line.starts_with("## ") {
            in_entry = false;
            section = line
                .strip_prefix("## [")
                .and_then(|rest| rest.strip_suffix(']'))
                .filter(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                .map(str::to_string);
            sections.extend(section.clone());
            continue;
        }
        if !in_code && line.starts_with("### ") {
            in_entry = false;
            if let Some(section) = &section {
                let key = line.strip_prefix("### `").and_then(|rest| rest.strip_suffix('`'));
                let key = key.unwrap_or_else(|| {
                    panic!("docs/config.md: `{line}` in [{section}] is not a `### \\`key\\`` heading")
                });
                entries.push(Entry { section: section.clone(), key: key.to_string(), text: String::new() });
                in_entry = true;
            }
            continue;
        }
        if in_entry {
            let entry = entries.last_mut().expect("an entry is open");
            entry.text.push_str(line);
            entry.text.push('\n');
        }
    }
    (sections, entries)
}

/// The inline code spans of a line of Markdown.
fn code_spans(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

fn base() -> toml::Table {
    toml::from_str(BASE).expect("BASE is TOML")
}

fn section_mut<'a>(config: &'a mut toml::Table, section: &str) -> &'a mut toml::Table {
    config
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap_or_else(|| panic!("[{section}] is not a table"))
}

/// Sets `key = value` (one TOML assignment) in `section`; an assignment written
/// `[other] key = value` goes into section `other`.
fn assign(config: &mut toml::Table, section: &str, assignment: &str) {
    let (section, assignment) = match assignment.strip_prefix('[').and_then(|rest| rest.split_once(']')) {
        Some((other, rest)) => (other, rest.trim()),
        None => (section, assignment),
    };
    let pair: toml::Table =
        toml::from_str(assignment).unwrap_or_else(|e| panic!("`{assignment}` is not a TOML assignment: {e}"));
    section_mut(config, section).extend(pair);
}

fn load(config: &toml::Table) -> Result<Config, String> {
    let text = toml::to_string(config).expect("serializes");
    Config::parse(&text, Path::new("config-reference.toml")).map_err(|e| e.to_string())
}

/// The backquoted names after "expected" on the line of serde's message that has it.
fn expected_names(error: &str) -> Vec<String> {
    let line = error.lines().find(|line| line.contains("expected")).unwrap_or("");
    let after = line.split_once("expected").map_or("", |(_, after)| after);
    code_spans(after).into_iter().map(str::to_string).collect()
}

/// The keys the config structs accept: the top level's (`None`) or a section's.
fn struct_keys(section: Option<&str>) -> Vec<String> {
    let mut config = base();
    let table = match section {
        Some(section) => section_mut(&mut config, section),
        None => &mut config,
    };
    table.insert(PROBE_KEY.into(), toml::Value::Integer(1));
    let error = load(&config).expect_err("an unknown key is refused");
    assert!(error.contains(&format!("unknown field `{PROBE_KEY}`")), "{error}");
    let keys = expected_names(&error);
    assert!(!keys.is_empty(), "no field list in: {error}");
    keys
}

/// The config the entry's example asks for besides its own key (`… with \`kind = "sqlite"\``).
fn example_context(entry: &Entry) -> toml::Table {
    let mut config = base();
    let example = entry.field("example").unwrap_or("");
    for assignment in code_spans(example).into_iter().skip(1) {
        assign(&mut config, &entry.section, assignment);
    }
    config
}

#[test]
fn every_section_and_key_of_the_config_structs_is_documented_and_no_other() {
    let (sections, entries) = read_doc();
    let mut documented: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for entry in &entries {
        documented.entry(entry.section.as_str()).or_default().push(entry.key.as_str());
    }
    let mut problems = Vec::new();
    let real_sections = struct_keys(None);
    for section in &real_sections {
        if !sections.contains(section) {
            problems.push(format!("section [{section}] is missing: add a `## [{section}]` heading"));
            continue;
        }
        let real_keys = struct_keys(Some(section));
        let keys = documented.get(section.as_str()).cloned().unwrap_or_default();
        for key in &real_keys {
            if !keys.contains(&key.as_str()) {
                problems.push(format!(
                    "[{section}] {key} is missing: add a `### \\`{key}\\`` entry with type, default and example"
                ));
            }
        }
        for key in &keys {
            if !real_keys.iter().any(|real| real == key) {
                problems.push(format!("[{section}] {key} is documented but src/config.rs has no such key"));
            }
            if keys.iter().filter(|other| *other == key).count() > 1 {
                problems.push(format!("[{section}] {key} is documented more than once"));
            }
        }
    }
    for section in &sections {
        if !real_sections.contains(section) {
            problems.push(format!("section [{section}] is documented but src/config.rs has no such section"));
        }
    }
    assert!(problems.is_empty(), "docs/config.md and src/config.rs disagree:\n{}", problems.join("\n"));
}

#[test]
fn every_key_has_a_type_a_default_and_an_example_that_loads() {
    let (_, entries) = read_doc();
    assert!(!entries.is_empty(), "docs/config.md has no key entries");
    let mut problems = Vec::new();
    for entry in &entries {
        for field in ["type", "default", "example"] {
            if entry.field(field).is_none_or(str::is_empty) {
                problems.push(format!("{}: no `- {field}:` line", entry.name()));
            }
        }
        let Some(example) = entry.field("example") else { continue };
        let spans = code_spans(example);
        let Some(own) = spans.first() else {
            problems.push(format!("{}: the example has no `key = value`", entry.name()));
            continue;
        };
        if own.split('=').next().map(str::trim) != Some(entry.key.as_str()) {
            problems.push(format!("{}: the example `{own}` does not set {}", entry.name(), entry.key));
            continue;
        }
        let mut config = example_context(entry);
        assign(&mut config, &entry.section, own);
        if let Err(e) = load(&config) {
            problems.push(format!("{}: the example `{own}` does not load: {e}", entry.name()));
        }
    }
    assert!(problems.is_empty(), "docs/config.md:\n{}", problems.join("\n"));
}

#[test]
fn literal_defaults_are_the_real_defaults() {
    let (_, entries) = read_doc();
    let mut problems = Vec::new();
    let mut checked = 0;
    for entry in &entries {
        // Only a default written as a TOML value (`- default: \`5000\``) is checked; "required"
        // and "none, which behaves as …" describe the absence of a value.
        let Some(default) = entry.field("default").filter(|d| d.starts_with('`')) else { continue };
        let value = code_spans(default)[0];
        let without = example_context(entry);
        let mut with = without.clone();
        assign(&mut with, &entry.section, &format!("{} = {value}", entry.key));
        match (load(&without), load(&with)) {
            (Ok(without), Ok(with)) if format!("{without:?}") == format!("{with:?}") => checked += 1,
            (Ok(_), Ok(_)) => {
                problems.push(format!("{}: `{value}` is documented as the default but is not", entry.name()))
            }
            (Err(e), _) | (_, Err(e)) => problems.push(format!("{}: default `{value}`: {e}", entry.name())),
        }
    }
    assert!(problems.is_empty(), "docs/config.md:\n{}", problems.join("\n"));
    assert!(checked > 0, "no literal default was checked");
}

#[test]
fn every_value_of_an_enumerated_key_is_named() {
    let (_, entries) = read_doc();
    let mut problems = Vec::new();
    let mut enumerated = 0;
    for entry in &entries {
        let mut config = example_context(entry);
        section_mut(&mut config, &entry.section).insert(entry.key.clone(), toml::Value::String(PROBE_VALUE.into()));
        let Err(error) = load(&config) else { continue };
        if !error.contains("unknown variant") {
            continue;
        }
        enumerated += 1;
        for variant in expected_names(&error) {
            if !entry.text.contains(&format!("`\"{variant}\"`")) {
                problems.push(format!("{}: the value `\"{variant}\"` is not named", entry.name()));
            }
        }
    }
    assert!(problems.is_empty(), "docs/config.md:\n{}", problems.join("\n"));
    assert!(enumerated > 0, "no enumerated key was found");
}

/// The ```toml blocks of a Markdown text.
fn toml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut block: Option<String> = None;
    for line in markdown.lines() {
        match (&mut block, line.trim_start()) {
            (None, "```toml") => block = Some(String::new()),
            (Some(_), "```") => blocks.extend(block.take()),
            (Some(text), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn complete_examples_in_docs_and_config_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(!toml_blocks(DOC).is_empty(), "docs/config.md has no ```toml block");
    for page in std::fs::read_dir(root.join("docs")).expect("docs/") {
        let path = page.expect("entry").path();
        if path.extension().is_none_or(|e| e != "md") {
            continue;
        }
        let markdown = std::fs::read_to_string(&path).expect("readable");
        for text in toml_blocks(&markdown) {
            if let Err(e) = Config::parse(&text, Path::new("config-reference.toml")) {
                panic!("a ```toml block of {} does not load: {e}\n{text}", path.display());
            }
        }
    }
    let mut files = 0;
    for file in std::fs::read_dir(root.join("config")).expect("config/") {
        let path = file.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            files += 1;
        }
    }
    assert!(files > 0, "no example config in config/");
}
