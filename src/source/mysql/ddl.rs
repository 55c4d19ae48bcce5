//! Which tables a DDL statement in the binlog touches, and how, read from its text.
//!
//! A `QUERY` event carries the statement as the client sent it. Only its head is read:
//! the statement kind and the table names, with MySQL's lexical rules (comments,
//! executable comments `/*! … */` whose text runs, backtick-quoted names with doubled
//! backticks, `db.table`). What the statement does to a table's columns is not guessed
//! from its text: the binlog stream compares the table's definition before and after.

/// A table as a statement names it; `schema` is `None` for the session's default database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRef {
    pub schema: Option<String>,
    pub name: String,
}

/// What a statement does to tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ddl {
    Truncate(TableRef),
    /// `ALTER TABLE t …`, with the new name when one of its clauses renames it.
    Alter {
        table: TableRef,
        renamed_to: Option<TableRef>,
    },
    /// `RENAME TABLE a TO b, c TO d`.
    Rename(Vec<(TableRef, TableRef)>),
    Drop(Vec<TableRef>),
    /// `CREATE TABLE` (`OR REPLACE` too: the table is new either way).
    Create(TableRef),
    /// Anything else: no table of a session's own changes (temporary tables included).
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    /// A bare word, upper-cased for keywords, with its text as written.
    Word {
        upper: String,
        text: String,
    },
    /// A backtick-quoted identifier, unquoted.
    Quoted(String),
    Symbol(char),
    /// A string literal or anything else a statement head never needs.
    Other,
}

/// The statement's tokens, comments left out (an executable comment's text is kept).
fn tokens(sql: &str) -> Vec<Token> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut in_executable_comment = false;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            _ if c.is_whitespace() => i += 1,
            '*' if next == Some('/') && in_executable_comment => {
                in_executable_comment = false;
                i += 2;
            }
            '/' if next == Some('*') => {
                let executable = match chars.get(i + 2) {
                    Some('!') => Some(i + 3),
                    Some('M') if chars.get(i + 3) == Some(&'!') => Some(i + 4),
                    _ => None,
                };
                match executable {
                    // `/*!50100 … */`: the server runs the text (from that version on).
                    Some(start) => {
                        i = start;
                        while chars.get(i).is_some_and(char::is_ascii_digit) {
                            i += 1;
                        }
                        in_executable_comment = true;
                    }
                    None => {
                        i += 2;
                        while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                            i += 1;
                        }
                        i += 2;
                    }
                }
            }
            // `-- ` (a dash dash and a space or control character) and `#` run to the line's end.
            '-' if next == Some('-') && chars.get(i + 2).is_none_or(|c| c.is_whitespace() || c.is_control()) => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '`' => {
                let mut name = String::new();
                i += 1;
                while i < chars.len() {
                    if chars[i] == '`' {
                        if chars.get(i + 1) == Some(&'`') {
                            name.push('`');
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    name.push(chars[i]);
                    i += 1;
                }
                i += 1;
                out.push(Token::Quoted(name));
            }
            '\'' | '"' => {
                // A string (or, under ANSI_QUOTES, a name: never a table this reads).
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
                out.push(Token::Other);
            }
            _ if c.is_alphanumeric() || c == '_' || c == '$' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$') {
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                out.push(Token::Word { upper: text.to_uppercase(), text });
            }
            _ => {
                out.push(Token::Symbol(c));
                i += 1;
            }
        }
    }
    out
}

/// A cursor over the tokens.
struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek_word(&self) -> Option<&str> {
        match self.tokens.get(self.at) {
            Some(Token::Word { upper, .. }) => Some(upper),
            _ => None,
        }
    }

    /// Takes the next token if it is the keyword `word`.
    fn keyword(&mut self, word: &str) -> bool {
        let found = self.peek_word() == Some(word);
        if found {
            self.at += 1;
        }
        found
    }

    fn symbol(&mut self, symbol: char) -> bool {
        let found = self.tokens.get(self.at) == Some(&Token::Symbol(symbol));
        if found {
            self.at += 1;
        }
        found
    }

    fn identifier(&mut self) -> Option<String> {
        let name = match self.tokens.get(self.at)? {
            Token::Word { text, .. } => text.clone(),
            Token::Quoted(name) => name.clone(),
            _ => return None,
        };
        self.at += 1;
        Some(name)
    }

    /// `name` or `schema.name`.
    fn table(&mut self) -> Option<TableRef> {
        let first = self.identifier()?;
        if self.symbol('.') {
            let name = self.identifier()?;
            return Some(TableRef { schema: Some(first), name });
        }
        Some(TableRef { schema: None, name: first })
    }

    /// `a, b, …`.
    fn tables(&mut self) -> Option<Vec<TableRef>> {
        let mut tables = vec![self.table()?];
        while self.symbol(',') {
            tables.push(self.table()?);
        }
        Some(tables)
    }

    /// An `ALTER TABLE`'s clauses, outside parentheses: the new name a `RENAME [TO|AS]`
    /// gives the table (not `RENAME COLUMN`, `RENAME INDEX` or `RENAME KEY`).
    fn renamed_to(&mut self) -> Option<TableRef> {
        let mut depth = 0usize;
        while self.at < self.tokens.len() {
            match &self.tokens[self.at] {
                Token::Symbol('(') => depth += 1,
                Token::Symbol(')') => depth = depth.saturating_sub(1),
                Token::Word { upper, .. } if depth == 0 && upper == "RENAME" => {
                    self.at += 1;
                    if matches!(self.peek_word(), Some("COLUMN" | "INDEX" | "KEY")) {
                        continue;
                    }
                    let _ = self.keyword("TO") || self.keyword("AS");
                    return self.table();
                }
                _ => {}
            }
            self.at += 1;
        }
        None
    }
}

/// What `sql` does to tables.
pub fn parse(sql: &str) -> Ddl {
    let mut p = Parser { tokens: tokens(sql), at: 0 };
    parse_tokens(&mut p).unwrap_or(Ddl::Other)
}

fn parse_tokens(p: &mut Parser) -> Option<Ddl> {
    let verb = p.peek_word()?.to_string();
    p.at += 1;
    Some(match verb.as_str() {
        "TRUNCATE" => {
            p.keyword("TABLE");
            Ddl::Truncate(p.table()?)
        }
        "ALTER" => {
            let _ = p.keyword("ONLINE") || p.keyword("OFFLINE");
            p.keyword("IGNORE");
            if !p.keyword("TABLE") {
                return Some(Ddl::Other);
            }
            if p.keyword("IF") && !p.keyword("EXISTS") {
                return None;
            }
            let table = p.table()?;
            Ddl::Alter { table, renamed_to: p.renamed_to() }
        }
        "RENAME" => {
            if !(p.keyword("TABLE") || p.keyword("TABLES")) {
                return Some(Ddl::Other);
            }
            let mut pairs = Vec::new();
            loop {
                let from = p.table()?;
                // MariaDB: `RENAME TABLE t WAIT n TO u`.
                if p.keyword("WAIT") || p.keyword("NOWAIT") {
                    p.at += usize::from(matches!(p.tokens.get(p.at), Some(Token::Word { .. })));
                }
                if !p.keyword("TO") {
                    return None;
                }
                pairs.push((from, p.table()?));
                if !p.symbol(',') {
                    break;
                }
            }
            Ddl::Rename(pairs)
        }
        "DROP" => {
            if p.keyword("INDEX") {
                return index_statement(p);
            }
            if p.keyword("TEMPORARY") || !p.keyword("TABLE") {
                return Some(Ddl::Other);
            }
            if p.keyword("IF") && !p.keyword("EXISTS") {
                return None;
            }
            Ddl::Drop(p.tables()?)
        }
        "CREATE" => {
            if p.keyword("OR") && !p.keyword("REPLACE") {
                return None;
            }
            let _ = p.keyword("UNIQUE") || p.keyword("FULLTEXT") || p.keyword("SPATIAL");
            if p.keyword("INDEX") {
                return index_statement(p);
            }
            if p.keyword("TEMPORARY") || !p.keyword("TABLE") {
                return Some(Ddl::Other);
            }
            if p.keyword("IF") && !(p.keyword("NOT") && p.keyword("EXISTS")) {
                return None;
            }
            Ddl::Create(p.table()?)
        }
        _ => Ddl::Other,
    })
}

/// The rest of `CREATE [UNIQUE|FULLTEXT|SPATIAL] INDEX` or `DROP INDEX`: `[IF [NOT]
/// EXISTS] name [USING type] ON t`, a change of t.
fn index_statement(p: &mut Parser) -> Option<Ddl> {
    if p.keyword("IF") {
        let _ = p.keyword("NOT");
        if !p.keyword("EXISTS") {
            return None;
        }
    }
    // The index's name.
    p.at += 1;
    if p.keyword("USING") {
        p.at += 1;
    }
    Some(match p.keyword("ON") {
        true => Ddl::Alter { table: p.table()?, renamed_to: None },
        false => Ddl::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::{parse, Ddl, TableRef};

    fn t(name: &str) -> TableRef {
        match name.split_once('.') {
            Some((schema, name)) => TableRef { schema: Some(schema.into()), name: name.into() },
            None => TableRef { schema: None, name: name.into() },
        }
    }

    #[test]
    fn statement_heads_name_their_tables() {
        let cases = [
            ("TRUNCATE t", Ddl::Truncate(t("t"))),
            ("truncate table `shop`.`order items`", Ddl::Truncate(t("shop.order items"))),
            ("ALTER TABLE t ADD COLUMN c int", Ddl::Alter { table: t("t"), renamed_to: None }),
            (
                "/* by the app */ ALTER ONLINE IGNORE TABLE `we``ird` RENAME COLUMN a TO b, RENAME INDEX i TO j",
                Ddl::Alter { table: t("we`ird"), renamed_to: None },
            ),
            (
                "ALTER TABLE t ADD CHECK (x > 0), RENAME AS db2.u",
                Ddl::Alter { table: t("t"), renamed_to: Some(t("db2.u")) },
            ),
            ("alter table t rename u", Ddl::Alter { table: t("t"), renamed_to: Some(t("u")) }),
            ("ALTER TABLE IF EXISTS t MODIFY c bigint", Ddl::Alter { table: t("t"), renamed_to: None }),
            ("RENAME TABLE a TO b, db.c TO db.d", Ddl::Rename(vec![(t("a"), t("b")), (t("db.c"), t("db.d"))])),
            ("RENAME TABLE a WAIT 5 TO b", Ddl::Rename(vec![(t("a"), t("b"))])),
            ("DROP TABLE IF EXISTS `a`, b /* generated by server */", Ddl::Drop(vec![t("a"), t("b")])),
            ("DROP TEMPORARY TABLE IF EXISTS a", Ddl::Other),
            ("CREATE TABLE IF NOT EXISTS n (id int primary key)", Ddl::Create(t("n"))),
            ("CREATE OR REPLACE TABLE n AS SELECT 1", Ddl::Create(t("n"))),
            ("/*!40101 CREATE TABLE x (a int) */", Ddl::Create(t("x"))),
            ("/*M!100100 DROP TABLE y */", Ddl::Drop(vec![t("y")])),
            ("-- a note\nDROP TABLE z", Ddl::Drop(vec![t("z")])),
            ("# a note\nTRUNCATE z", Ddl::Truncate(t("z"))),
            ("CREATE TEMPORARY TABLE tmp (a int)", Ddl::Other),
            ("CREATE INDEX i ON t (a)", Ddl::Alter { table: t("t"), renamed_to: None }),
            (
                "create unique index if not exists `i` using btree on db.`t t` (a)",
                Ddl::Alter { table: t("db.t t"), renamed_to: None },
            ),
            ("CREATE OR REPLACE FULLTEXT INDEX i ON t (a)", Ddl::Alter { table: t("t"), renamed_to: None }),
            ("DROP INDEX IF EXISTS `i` ON t", Ddl::Alter { table: t("t"), renamed_to: None }),
            ("DROP INDEX i", Ddl::Other),
            ("CREATE VIEW v AS SELECT 1", Ddl::Other),
            ("GRANT ALL ON *.* TO 'u'@'%'", Ddl::Other),
            ("ALTER TABLE", Ddl::Other),
            ("RENAME TABLE a", Ddl::Other),
            ("", Ddl::Other),
        ];
        for (sql, expected) in cases {
            assert_eq!(parse(sql), expected, "{sql}");
        }
    }
}
